"""Per-row allowed-token masks: the rule a constrained request's next token follows (`TokenConstraint`, e.g.
a grammar or token healing), the tokens a step's constrained rows took (`start_advances`) and the bitmask of a
step's rows built from those rules (`StepMasks`). Rules kept in another process (grammars: the mask worker)
are asked for a step's work at once, early, and waited for only when the answer is needed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

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

    # Optionally, for a rule kept elsewhere, static methods taking a step's rows of its class at once:
    #   start_advance(entries: [(constraint, token)]) -> finish() -> [None, or why the token was refused]
    #   start_fill(entries: [(constraint, row index)]) -> finish(mask) -> ([(row index, why it failed)], seconds
    #   the rule spent building the rows)
    # and release(): the request ended (the engine calls it once).


def empty_mask(words: int) -> np.ndarray:
    """One row that allows nothing (a constraint's scratch row)."""
    return np.zeros(words, np.int32)


def allow(row: np.ndarray, token_ids) -> None:
    """Set the bits of `token_ids` in row."""
    ids = np.asarray(token_ids, np.int64)
    np.bitwise_or.at(row.view(np.uint32), ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))


def release_constraint(request) -> None:
    """A request ended: its constraint lets go of what it holds elsewhere (a grammar's matcher in the worker)."""
    release = getattr(request.constraint, "release", None)
    if release is not None:
        release()


def start_advances(entries: list[tuple[TokenConstraint, int]]) -> Callable[[], list[str | None]]:
    """Each constraint takes its token: rules kept here at once, the others asked now. Returns what gives, per
    entry, None or why its token was refused (waiting for the answers of rules kept elsewhere)."""
    errors: list[str | None] = [None] * len(entries)
    remote: dict = {}  # start_advance → [(entry index, constraint, token)]
    for k, (constraint, token) in enumerate(entries):
        start = getattr(type(constraint), "start_advance", None)
        if start is not None:
            remote.setdefault(start, []).append((k, constraint, token))
            continue
        try:
            constraint.advance(token)
        except ValueError as exc:
            errors[k] = str(exc)
    pending = [([k for k, _, _ in group], start([(c, t) for _, c, t in group])) for start, group in remote.items()]

    def finish() -> list[str | None]:
        for indices, answer in pending:
            for k, error in zip(indices, answer()):
                errors[k] = error
        return errors

    return finish


class StepMasks:
    """A step's allowed-token masks in the making: the rows of rules kept elsewhere asked for at once when made;
    result() fills the others here and waits for those. Row i is batch.chunks[i]: each sampled row with an active
    constraint gets its rule's set, every other row (and padding) all tokens."""

    def __init__(self, batch: SchedulerOutput):
        self._local: list[tuple[TokenConstraint, int]] = []
        remote: dict = {}  # start_fill → [(constraint, row)]
        for i, chunk in enumerate(batch.chunks):
            constraint = chunk.request.constraint
            if chunk.samples and constraint is not None and constraint.active and not chunk.request.finished:
                start = getattr(type(constraint), "start_fill", None)
                if start is None:
                    self._local.append((constraint, i))
                else:
                    remote.setdefault(start, []).append((constraint, i))
        self._pending = [start(entries) for start, entries in remote.items()]
        self.build_s = 0.0  # time spent building the rows, here and elsewhere (known once result() returns)

    def result(self, rows: int, words: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """The mask [rows, words], and the rows whose rule could not give its set (row index, why): those
        rows allow every token, their requests must end."""
        started = time.perf_counter()
        mask = np.full((rows, words), ALL_ALLOWED, np.int32)
        for constraint, i in self._local:
            constraint.fill(mask[i])
        self.build_s = time.perf_counter() - started
        failed = []
        for finish in self._pending:
            failures, build_s = finish(mask)
            failed += failures
            self.build_s += build_s
        for i, _ in failed:
            mask[i] = ALL_ALLOWED
        return mask, failed


def step_masks(batch: SchedulerOutput, rows: int, words: int) -> np.ndarray:
    """The allowed-token mask of a step's rows [rows, words] (StepMasks at once; ValueError if a rule failed)."""
    mask, failed = StepMasks(batch).result(rows, words)
    if failed:
        raise ValueError(failed[0][1])
    return mask
