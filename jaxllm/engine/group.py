"""Sequence groups: the best_of sequences of one prompt, which share its KV. The group's leader prefills the
prompt once; the others then fork from it (its prompt slots shared by reference, see KVCache.fork) and sample
their first token from the leader's logits. Groups are admitted, paused and ended as a whole.
"""

from __future__ import annotations

import dataclasses

from jaxllm.engine.request import Request, SamplingParams

SEED_LIMIT = 2**64  # seeds are 64-bit; member i of a seeded group samples with seed + i modulo this


def member_params(params: SamplingParams, index: int) -> SamplingParams:
    """Member `index`'s own parameters: the group's, with seed + index when seeded."""
    if params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % SEED_LIMIT)


class SequenceGroup:
    """best_of > 1 sequences of one prompt. Each member is a Request with its own row, seed, penalties, output
    and stream; positions [0, prompt_len) are computed once, by the leader, and shared by reference."""

    def __init__(self, members: list[Request], beam=None):
        if len(members) < 2 or len({len(m.prompt_ids) for m in members}) != 1:
            raise ValueError("a group has at least two members with the same prompt")
        self.members = members
        self.prompt_len = members[0].prompt_len
        self.beam = beam  # BeamSearch (beam.py) under --beam_mode, else None: members sample on their own
        for m in members:
            m.group = self

    @property
    def leader(self) -> Request:
        """The member that computes (and holds, for the accounting) the shared prompt: the first unfinished."""
        return next((m for m in self.members if not m.finished), self.members[0])

    def holds_a_sequence(self, member: Request) -> bool:
        """False for the members a beam search left without a beam (fewer live beams than members)."""
        return self.beam is None or self.members.index(member) < self.beam.live

    def shared_prefix(self, req: Request) -> int:
        """Positions of `req` held by the leader for the whole group (the prompt), counted once: the leader's."""
        return 0 if req is self.leader else self.prompt_len

    @property
    def top_logprobs(self) -> int:
        """Alternatives each member's sampled rows must report: beam search keeps 2 × width candidates."""
        return 2 * len(self.members) if self.beam is not None else 0
