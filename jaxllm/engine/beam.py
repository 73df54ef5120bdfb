"""Beam search over a sequence group (--beam_mode): after each step, the best 2 × width continuations of the
live beams by summed log-probability; those among the best `width` that end (eos, or max_new_tokens) become
finished hypotheses, scored by summed log-probability ÷ generated length; the best `width` others continue.
The search ends when `width` hypotheses are finished (transformers' early_stopping=True) or no candidate can
continue. Pure host logic: the engine feeds it each live beam's top logprobs and applies its moves.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.engine.request import Request


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A finished beam: its generated tokens (the ending one included) and their logprobs."""

    tokens: list[int]
    logprobs: list[float]

    @property
    def score(self) -> float:
        return sum(self.logprobs) / len(self.tokens)


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Beam `parent` extended by `token`: the next content of the member it is assigned to."""

    parent: Request
    token: int
    logprob: float


@dataclasses.dataclass(frozen=True)
class Round:
    """What one step decided: the continuations (beam j goes to the group's member j), or done."""

    continuations: list[Continuation]
    done: bool


class BeamSearch:
    """The search state of one group: the finished hypotheses and the live beams' step results."""

    def __init__(self, width: int, eos_ids, max_new_tokens: int, ignore_eos: bool):
        self.width = width
        self.eos = frozenset(eos_ids) if not ignore_eos else frozenset()
        self.max_new_tokens = max_new_tokens
        self.live = width  # members [0, live) hold the live beams; the others wait, holding nothing
        self.finished: list[Hypothesis] = []
        self._results: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(member) → (top ids, top logprobs)

    def record(self, member: Request, top_ids: np.ndarray, top_logprobs: np.ndarray) -> None:
        """A live beam's most likely next tokens (best first) and their logprobs, from the step just read."""
        self._results[id(member)] = (top_ids, top_logprobs)

    def ready(self, live: list[Request]) -> bool:
        """Every live beam has its results of this round."""
        return all(id(m) in self._results for m in live)

    def advance(self, live: list[Request]) -> Round:
        """Choose the next beams from the live beams' results (each beam's tokens are its output_ids so far).
        At the first round every beam holds the same prompt: only the first beam's candidates count."""
        k = 2 * self.width
        sources = live[:1] if all(m.num_output == 0 for m in live) else live
        candidates = []  # (total, order, parent, token, logprob)
        for order, beam in enumerate(sources):
            ids, logprobs = self._results[id(beam)]
            base = sum(beam.output_logprobs)
            for j in range(min(k, len(ids))):
                candidates.append((base + float(logprobs[j]), order * k + j, beam, int(ids[j]), float(logprobs[j])))
        self._results.clear()
        candidates.sort(key=lambda c: (-c[0], c[1]))
        continuing: list[Continuation] = []
        all_end = True
        for rank, (_, _, beam, token, logprob) in enumerate(candidates[:k]):
            generated = beam.num_output + 1
            if token in self.eos or generated >= self.max_new_tokens:
                if rank < self.width:
                    self.finished.append(Hypothesis(beam.output_ids + [token], beam.output_logprobs + [logprob]))
            else:
                all_end = False
                if len(continuing) < self.width:
                    continuing.append(Continuation(beam, token, logprob))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width :]
        done = len(self.finished) >= self.width or all_end or not continuing
        if not done:
            self.live = len(continuing)
        return Round(continuing, done)

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best score first."""
        return list(self.finished)


@dataclasses.dataclass(frozen=True)
class Move:
    """What a member holds after a round: its new beam's KV slots (its parent's, shared) and tokens."""

    member: Request
    slots: list[int]
    output_ids: list[int]
    output_logprobs: list[float]


def reassignments(members: list[Request], continuations: list[Continuation]) -> list[Move]:
    """Member j takes continuation j (its parent's computed slots and tokens, plus the new token); members left
    without one wait, holding nothing. Read from the parents before any member changes."""
    moves = [Move(member, c.parent.slots[: c.parent.num_computed], c.parent.output_ids + [c.token],
                  c.parent.output_logprobs + [c.logprob]) for member, c in zip(members, continuations)]
    return moves + [Move(member, [], [], []) for member in members[len(continuations):]]
