"""Per-row allowed-token masks: the rule a constrained request's next token follows (`TokenConstraint`, e.g.
a grammar or token healing) and the bitmask of a step's rows built from those rules on the host."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler imports JAX; the frontend process imports this module without it
    from jaxllm.engine.scheduler import SchedulerOutput

ALL_ALLOWED = -1  # an int32 word with every bit set


class TokenConstraint(Protocol):
    """What the engine asks of a request's constraint (Request.constraint)."""

    @property
    def active(self) -> bool:
        """Whether the next token is constrained (False once the rule no longer applies)."""

    @property
    def complete(self) -> bool:
        """Whether the text is finished: no token may follow (the request stops with "stop")."""

    def fill(self, row: np.ndarray) -> None:
        """Write the next token's allowed set into row [mask words] int32 (bit t % 32 of word t // 32)."""

    def advance(self, token: int) -> None:
        """Take the sampled token; ValueError if the rule forbade it."""

    # Optionally, a static `fill_many(rows: list[(constraint, row index)], mask)` filling several rows of one
    # kind at once (e.g. in parallel threads); step_masks uses it when the constraint's class has one.


def empty_mask(words: int) -> np.ndarray:
    """One row that allows nothing (a constraint's scratch row)."""
    return np.zeros(words, np.int32)


def allow(row: np.ndarray, token_ids) -> None:
    """Set the bits of `token_ids` in row."""
    ids = np.asarray(token_ids, np.int64)
    np.bitwise_or.at(row.view(np.uint32), ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))


def step_masks(batch: SchedulerOutput, rows: int, words: int) -> np.ndarray:
    """The allowed-token mask of a step's rows [rows, words]: each sampled row with an active constraint gets
    its rule's set, every other row (and padding) all tokens. Row i is batch.chunks[i]."""
    mask = np.full((rows, words), ALL_ALLOWED, np.int32)
    together: dict = {}  # fill_many → its rows
    for i, chunk in enumerate(batch.chunks):
        constraint = chunk.request.constraint
        if chunk.samples and constraint is not None and constraint.active and not chunk.request.finished:
            fill_many = getattr(type(constraint), "fill_many", None)
            if fill_many is None:
                constraint.fill(mask[i])
            else:
                together.setdefault(fill_many, []).append((constraint, i))
    for fill_many, entries in together.items():
        fill_many(entries, mask)
    return mask
