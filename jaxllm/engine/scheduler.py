"""Admission, batching and preemption with LightLLM's router semantics (the `--router_*`, `--batch_max_tokens`,
`--running_max_req_size` flags), plus the prompt-length checks. A step is a plain list of chunks (request,
positions computed this step) of any mix: this default policy and splitfuse (splitfuse.py) differ only in
how they fill it; the prompt cache only moves where a request's first chunk starts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque

import numpy as np

from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.request import Request, RequestStatus
from jaxllm.engine.submission import check_prompt  # noqa: F401 - its home before the engine core's split


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The router flags, as ServerArgs names them."""

    max_total_token_num: int
    batch_max_tokens: int
    running_max_req_size: int
    router_token_ratio: float
    router_max_new_token_len: int
    router_max_wait_tokens: int
    splitfuse_block_size: int = 256

    @classmethod
    def from_args(cls, args) -> "SchedulerConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# Not frozen: a frozen dataclass's __init__ costs several times a plain one's (object.__setattr__ per field), and
# one chunk is made per row per step. Nothing changes a chunk once made.
@dataclasses.dataclass(slots=True)
class ScheduledChunk:
    """`num_tokens` of `request`'s positions, from `start`, computed this step. When they reach the end of
    the known sequence the step samples the request's next token."""

    request: Request
    start: int
    num_tokens: int
    samples: bool = True
    prompt_logprobs: bool = False  # this chunk's positions also report prompt logprobs
    decode: bool = False  # the one last sampled token of a running request (else part of a prefill)
    cached_prefix: int = 0  # positions [0, cached_prefix) come from the prompt cache (the first chunk only)
    # A group member's first token, sampled from its leader's last prompt logits: a chunk of no tokens, after
    # the leader's chunk in the step.
    logits_from: Request | None = None


@dataclasses.dataclass(frozen=True)
class TableFill:
    """Point `request`'s table row, positions [start, stop), at its slots (KV shared with its group, or cached)
    before the step runs."""

    request: Request
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]
    kind: str  # "prefill" (some chunk is a prefill, decodes may come along) | "decode" (decode chunks only) | "idle"
    fills: list[TableFill] = dataclasses.field(default_factory=list)
    # Every running request that could decode decodes in this step: the next step's decodes all take their
    # tokens from it, so the next step may be scheduled before its results are read (step_loop.py).
    decodes_all: bool = False

    # Counted once (read by the loop, the runner and the step report): the chunks do not change once scheduled.
    @functools.cached_property
    def num_tokens(self) -> int:
        return len(self.chunks) if self.kind == "decode" else sum(c.num_tokens for c in self.chunks)

    @functools.cached_property
    def num_decode_tokens(self) -> int:
        return len(self.chunks) if self.kind == "decode" else sum(c.decode for c in self.chunks)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens


class Scheduler:
    """LightLLM's router: prefill batches of new (or resumed) requests, and decode steps of all running
    requests in between; new requests are tried when nothing runs or every `router_max_wait_tokens`
    decode steps; when a decode step finds the KV cache short, the youngest requests are paused (their
    KV returned) and put back at the head of the queue, to be recomputed when readmitted.

    Host view is behind the device (by up to three steps while looking ahead, step_loop.py): a request's last
    `num_pending` tokens are sampled but not read, so counts use `num_tokens`/`num_output`, which include them.
    With the prompt cache, a request starts at its longest cached prefix and its estimates count only its private
    slots; the cached prefixes that running requests lock are counted once. A group (group.py) is admitted, paused
    and resumed whole: its leader prefills the prompt, the other members fork from it in the same step.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCache):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()  # paused requests at the head, oldest first
        self.running: list[Request] = []
        self._decode_steps_since_admit = 0
        self._fills: list[TableFill] = []  # forks made since the last step was scheduled

    @property
    def max_step_tokens(self) -> int:
        """The most tokens one step computes."""
        return self.config.batch_max_tokens

    # --- queue ---------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Take `req` out of the queues and return its KV at once (finish, abort or error). An error's
        computed tokens are not cached: the failed step may never have written them."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PAUSED):
            self.waiting.remove(req)
        self.kv.release(req, cache=reason != "error")
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    @property
    def num_paused(self) -> int:
        return sum(1 for r in self.waiting if r.status is RequestStatus.PAUSED)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step_dispatched(self, out: SchedulerOutput) -> None:
        """`out` is on the device: the prompt cache may lend its prefill chunks' tokens to later requests
        (not those of a request that ended while `out` was launched)."""
        if out.kind == "decode" or self.kv.prefix is None:
            return
        for chunk in out.chunks:  # (not a request paused since: the step after `out` may be scheduled first)
            if not chunk.decode and chunk.request.status is RequestStatus.RUNNING:
                self.kv.share_prefix(chunk.request)

    # --- the policy ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        decoding, prefilling = self._running_state()
        if not self.running or self._decode_steps_since_admit >= cfg.router_max_wait_tokens or prefilling:
            self._decode_steps_since_admit = 0
            chunks = self._continue_prefills(cfg.batch_max_tokens)
            chunks += self._admit(cfg.batch_max_tokens - sum(c.num_tokens for c in chunks), chunked=False)
            if chunks:
                return self._output(chunks, [], "prefill", decodes_all=not decoding)
            # Nothing admitted or continued: the running requests are as they were (`decoding` still holds).
        if not decoding:
            return self._output([], [], "idle")
        preempted = self._make_room(decoding)
        if preempted:
            decoding = [r for r in decoding if r.status is RequestStatus.RUNNING]
        chunks = self._decode(decoding)
        self._decode_steps_since_admit += 1
        return self._output(chunks, preempted, "decode", decodes_all=True)

    # --- groups --------------------------------------------------------------------------------
    def reassign(self, moves: list[tuple[Request, list[int]]]) -> None:
        """Beam search moved beams between members: each member continues from the given slots (held by its
        group); its table row is refilled where they differ from its old ones, before its next step."""
        starts = [_common_prefix(req.slots, slots) for req, slots in moves]
        self.kv.reassign(moves)
        self._fills += [TableFill(req, start, len(slots)) for (req, slots), start in zip(moves, starts)
                        if start < len(slots)]

    def _fork_members(self, leader: Request, chunk: ScheduledChunk) -> list[ScheduledChunk]:
        """The members waiting for `leader`'s prompt share it once `chunk` computes its end: new members sample
        their first token from the leader's logits in this step; resumed ones recompute their outputs from the
        next step on (running prefills)."""
        group = leader.group
        if group is None or leader is not group.leader or leader.num_computed < group.prompt_len:
            return []
        chunks = []
        for member in group.members:
            if member.status is not RequestStatus.RUNNING or not member.awaits_fork:
                continue
            if not group.holds_a_sequence(member):
                continue
            self.kv.fork(leader, member, group.prompt_len)
            self._fills.append(TableFill(member, 0, group.prompt_len))
            if member.num_output == 0:
                if not (chunk.samples and leader.num_output == 0):
                    raise RuntimeError(f"group member {member.request_id} has no logits to sample from")
                chunks.append(ScheduledChunk(member, group.prompt_len, 0, logits_from=leader))
        return chunks

    def _members(self, req: Request) -> list[Request]:
        """req's group members that are not finished (leader first), or [req]."""
        if req.group is None:
            return [req]
        return [m for m in req.group.members if not m.finished]

    def _output(self, chunks: list[ScheduledChunk], preempted: list[Request], kind: str,
                decodes_all: bool = False) -> SchedulerOutput:
        fills = [f for f in self._fills if f.request.status is RequestStatus.RUNNING and f.request.kv_row >= 0]
        self._fills = []
        return SchedulerOutput(chunks, preempted, kind, fills, decodes_all)

    # --- building blocks (the splitfuse policy reuses them) --------------------------------------
    def _decodable(self) -> list[Request]:
        """Running requests whose next step is one decode token."""
        return self._running_state()[0]

    def _running_state(self) -> tuple[list[Request], bool]:
        """One pass over the running requests: (those whose next step is one decode token, whether some has
        positions left to compute beyond a decode token: a prefill, or a resumed group member)."""
        decoding, prefilling = [], False
        for r in self.running:
            if r.decoding:
                if r.wants_token and not r.awaits_host:
                    decoding.append(r)
            elif not prefilling and r.remaining > 0 and not r.awaits_fork:
                prefilling = True
        return decoding, prefilling

    def _prefilling(self) -> bool:
        """Some running request has positions left to compute beyond a decode token (a resumed group member)."""
        return self._running_state()[1]

    def _continue_prefills(self, budget: int) -> list[ScheduledChunk]:
        """The next chunks of running prefills, oldest first, within `budget` tokens and the free KV."""
        chunks = []
        for req in [r for r in self.running if not r.decoding and r.remaining > 0 and not r.awaits_fork]:
            n = min(req.remaining, budget, self.kv.num_available)
            if n > 0:
                chunks += self._prefill_chunks(req, n)
                budget -= n
        return chunks

    def _decode(self, decoding: list[Request]) -> list[ScheduledChunk]:
        """One decode chunk per request (its last sampled token), slots allocated."""
        self.kv.allocate_one_each(decoding)
        chunks = [ScheduledChunk(req, req.num_computed, 1, True, False, True) for req in decoding]  # decode=True
        for req in decoding:
            req.num_computed += 1
        return chunks

    def _prefill_chunks(self, req: Request, n: int, cached_prefix: int = 0) -> list[ScheduledChunk]:
        """The next n positions of a running request's prefill (slots allocated), and the chunks of the group
        members that fork from it in this step."""
        self.kv.allocate(req, n)
        start = req.num_computed
        req.num_computed += n
        wants_lp = req.params.prompt_logprobs and req.num_output == 0 and start < req.prompt_len - 1
        chunk = ScheduledChunk(req, start, n, samples=req.num_computed == req.num_tokens,
                               prompt_logprobs=wants_lp, cached_prefix=cached_prefix)
        return [chunk, *self._fork_members(req, chunk)]

    def _admit(self, budget: int, chunked: bool) -> list[ScheduledChunk]:
        """Queue head → running (with its whole group), while LightLLM's estimated peak KV use fits, with a
        first chunk each: the whole uncached rest of its sequence, within `budget` tokens in all; `chunked`: as
        much of it as the budget and the free KV allow."""
        if not self.waiting or budget <= 0:
            return []
        cfg = self.config
        busy = self._busy()
        peak = _PeakEstimate(*self._estimates(self.running, busy))
        paused_left = self.num_paused
        admitted: list[ScheduledChunk] = []
        while self.waiting and budget > 0:
            members = self._members(self.waiting[0])
            if any(m.num_pending for m in members):  # preempted while a token was in flight: wait for it
                break
            req = members[0]
            cached = self.kv.attach_prefix(req)
            todo = req.num_tokens - cached
            n = min(todo, budget, self.kv.num_available) if chunked else todo
            peak.add(*self._estimates(members, busy))
            paused = sum(m.status is RequestStatus.PAUSED for m in members)
            fits = peak.tokens() + self.kv.num_locked < cfg.max_total_token_num
            room = peak.count + paused_left - paused <= cfg.running_max_req_size
            if not (fits and room and 0 < n <= budget and self.kv.can_allocate(n)):
                self.kv.release(req, cache=False)  # back to holding nothing: the prefix lock goes
                break
            paused_left -= paused
            for member in members:
                self.waiting.remove(member)
                member.status = RequestStatus.RUNNING
                self.running.append(member)
            budget -= n
            if req.cache_hit is None:
                req.cache_hit = cached
            admitted += self._prefill_chunks(req, n, cached_prefix=cached)
        return admitted

    def _make_room(self, decoding: list[Request]) -> list[Request]:
        """Pause the youngest running requests (each with its whole group) until each remaining decode gets a
        slot."""
        need = len(decoding)
        if need <= self.kv.num_available:  # the common case: no sort of the running requests
            return []
        pending = {id(r) for r in decoding}
        victims: list[Request] = []
        by_age = sorted(self.running, key=lambda r: r.arrival)
        while need > self.kv.num_available and by_age:
            victim = by_age.pop()
            if victim.status is not RequestStatus.RUNNING:  # paused with its group already
                continue
            group = [m for m in self._members(victim) if m.status is RequestStatus.RUNNING]
            need -= sum(id(m) in pending for m in group)
            self._pause(group)
            victims += group
        return victims

    def pause_all(self) -> list[Request]:
        """Pause every running request and empty the prompt cache: the device lost the KV (a failed step)."""
        victims = sorted(self.running, key=lambda r: r.arrival, reverse=True)
        self._pause(victims, cache=False)
        self.kv.clear_prefix_cache()
        return victims

    def _pause(self, victims: list[Request], cache: bool = True) -> None:
        """Running → head of the queue, oldest first; KV returned (its computed tokens cached when the prompt
        cache is on); recomputed, or resumed from the cache, when readmitted."""
        for victim in victims:
            self.running.remove(victim)
            self.kv.release(victim, cache=cache)
            victim.status = RequestStatus.PAUSED
        for victim in sorted(victims, key=lambda r: r.arrival, reverse=True):
            self.waiting.appendleft(victim)
        if victims:
            self._decode_steps_since_admit = 0

    def _busy(self) -> bool:
        return self.kv.num_used / self.config.max_total_token_num >= self.config.router_token_ratio

    def _estimates(self, reqs: list[Request], busy: bool) -> tuple[np.ndarray, np.ndarray]:
        """LightLLM's get_tuple_tokens for each request: (private tokens held once it runs, tokens it may still
        add), both [len(reqs)] i64. A group's shared prompt is held by its leader only."""
        cfg = self.config
        fields = np.array([(r.num_output, r.params.max_new_tokens, r.params.ignore_eos,
                            r.num_tokens - max(r.num_cached, r.shared_prefix), r.status is RequestStatus.RUNNING)
                           for r in reqs], np.int64).reshape(-1, 5)
        out, max_new, ignore_eos, held, running = fields.T
        if not busy:
            capped = np.minimum(max_new, np.maximum((1.1 * out).astype(np.int64), cfg.router_max_new_token_len))
            max_new = np.where(ignore_eos == 1, max_new, capped)
        return held + 1 - running, np.maximum(0, max_new - out - 2 + running)

    def estimated_peak(self) -> int:
        """LightLLM's estimate of the running requests' peak KV use, in tokens (locked cached prefixes and group
        prompts once)."""
        if not self.running:
            return self.kv.num_locked
        return _peak_tokens_of(*self._estimates(self.running, self._busy())) + self.kv.num_locked


def _peak_tokens_of(held: np.ndarray, left: np.ndarray) -> int:
    """Peak total KV if requests finish in order of remaining length: max_i (left_i × (i + 1) + Σ_{j≤i} held_j)
    over the requests (held[i], left[i], all [n] i64) sorted by tokens left, longest first."""
    return _PeakEstimate(held, left).tokens()


class _PeakEstimate:
    """_peak_tokens_of's estimate over a set of requests that grows while admission tries the queue's head (one or a group
    at a time), kept sorted by tokens left, longest first, with each rank's term `left × rank + Σ held` kept too:
    adding a request inserts it at its rank and shifts the terms after it, O(n) in a few array operations where
    sorting anew each time took several times as long (admission rounds of 64 requests beside 512 running)."""

    def __init__(self, held: np.ndarray, left: np.ndarray):
        order = np.argsort(-left, kind="stable")
        self.left, held = left[order], held[order]
        self.terms = self.left * np.arange(1, len(order) + 1) + np.cumsum(held)

    @property
    def count(self) -> int:
        return len(self.left)

    def add(self, held: np.ndarray, left: np.ndarray) -> None:
        for h, l in zip(held.tolist(), left.tolist()):
            # Ties in `left` may sit in any order: the larger of two tied ranks' terms is the same either way.
            rank = int(np.searchsorted(-self.left, -l, side="right"))
            before = int(self.terms[rank - 1] - self.left[rank - 1] * rank) if rank else 0  # Σ held above it
            after = self.terms[rank:] + self.left[rank:] + h
            self.terms = np.concatenate((self.terms[:rank], [l * (rank + 1) + before + h], after))
            self.left = np.concatenate((self.left[:rank], [l], self.left[rank:]))

    def tokens(self) -> int:
        return int(self.terms.max()) if len(self.terms) else 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n
