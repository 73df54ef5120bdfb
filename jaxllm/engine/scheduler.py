"""Admission, batching and preemption with LightLLM's router semantics (the `--router_*`, `--batch_max_tokens`,
`--running_max_req_size` flags), plus the prompt-length checks. A step is a plain list of chunks (request,
positions computed this step) of any mix: this default policy and splitfuse (splitfuse.py) differ only in
how they fill it; the prompt cache only moves where a request's first chunk starts.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.request import Request, RequestStatus, SamplingParams


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


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]
    kind: str  # "prefill" (some chunk is a prefill, decodes may come along) | "decode" | "idle"

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.decode for c in self.chunks)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens


def check_prompt(prompt_ids: list[int], params: SamplingParams, args) -> list[int]:
    """LightLLM's length checks: prompt vs --max_req_input_len (rejected, or truncated by
    --long_truncation_mode head | center), then prompt + max_new_tokens vs --max_req_total_len, then
    that total + 1 vs --max_total_token_num. Returns the prompt to run; raises ValueError."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    limit = args.max_req_input_len
    if len(prompt_ids) > limit:
        mode = args.long_truncation_mode
        if mode is None:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, more than --max_req_input_len {limit}"
            )
        if mode == "head":
            prompt_ids = prompt_ids[len(prompt_ids) - limit :]
        elif mode == "center":
            tail = limit - limit // 2
            prompt_ids = prompt_ids[: limit // 2] + prompt_ids[len(prompt_ids) - tail :]
        else:
            raise ValueError(f"--long_truncation_mode {mode!r} is not one of None, head, center")
    total = len(prompt_ids) + params.max_new_tokens
    if total > args.max_req_total_len:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
            f"exceeds --max_req_total_len {args.max_req_total_len}"
        )
    if total + 1 > args.max_total_token_num:
        raise ValueError(
            f"the prompt + max_new_tokens + 1 = {total + 1} exceeds --max_total_token_num "
            f"{args.max_total_token_num}"
        )
    return list(prompt_ids)


class Scheduler:
    """LightLLM's router: prefill batches of new (or resumed) requests, and decode steps of all running
    requests in between; new requests are tried when nothing runs or every `router_max_wait_tokens`
    decode steps; when a decode step finds the KV cache short, the youngest requests are paused (their
    KV returned) and put back at the head of the queue, to be recomputed when readmitted.

    Host view is one step behind the device: a request's last `num_pending` tokens are sampled but not
    read, so counts use `num_tokens`/`num_output`, which include them. With the prompt cache, a request
    starts at its longest cached prefix and its estimates count only its private slots; the cached
    prefixes that running requests lock are counted once.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCache):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()  # paused requests at the head, oldest first
        self.running: list[Request] = []
        self._decode_steps_since_admit = 0

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
        for chunk in out.chunks:
            if not chunk.decode and not chunk.request.finished:
                self.kv.share_prefix(chunk.request)

    # --- the policy ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if not self.running or self._decode_steps_since_admit >= self.config.router_max_wait_tokens:
            self._decode_steps_since_admit = 0
            admitted = self._admit(self.config.batch_max_tokens, chunked=False)
            if admitted:
                return SchedulerOutput(admitted, [], "prefill")
        decoding = [r for r in self.running if r.wants_token]
        if not decoding:
            return SchedulerOutput([], [], "idle")
        preempted = self._make_room(decoding)
        if preempted:
            decoding = [r for r in decoding if r.status is RequestStatus.RUNNING]
        chunks = self._decode(decoding)
        self._decode_steps_since_admit += 1
        return SchedulerOutput(chunks, preempted, "decode")

    # --- building blocks (the splitfuse policy reuses them) --------------------------------------
    def _decode(self, decoding: list[Request]) -> list[ScheduledChunk]:
        """One decode chunk per request (its last sampled token), slots allocated."""
        self.kv.allocate_one_each(decoding)
        chunks = []
        for req in decoding:
            chunks.append(ScheduledChunk(req, req.num_computed, 1, decode=True))
            req.num_computed += 1
        return chunks

    def _prefill_chunk(self, req: Request, n: int, cached_prefix: int = 0) -> ScheduledChunk:
        """The next n positions of a running request's prefill (slots allocated)."""
        self.kv.allocate(req, n)
        start = req.num_computed
        req.num_computed += n
        wants_lp = req.params.prompt_logprobs and req.num_output == 0 and start < req.prompt_len - 1
        return ScheduledChunk(req, start, n, samples=req.num_computed == req.num_tokens,
                              prompt_logprobs=wants_lp, cached_prefix=cached_prefix)

    def _admit(self, budget: int, chunked: bool) -> list[ScheduledChunk]:
        """Queue head → running, while LightLLM's estimated peak KV use fits, with a first chunk each: the
        whole uncached rest of its sequence, within `budget` tokens in all; `chunked`: as much of it as
        the budget and the free KV allow."""
        if not self.waiting or budget <= 0:
            return []
        cfg = self.config
        busy = self._busy()
        estimates = [self._estimate(r, busy) for r in self.running]
        paused_left = self.num_paused
        admitted: list[ScheduledChunk] = []
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if req.num_pending:  # preempted while its last token was in flight: wait for it
                break
            cached = self.kv.attach_prefix(req)
            todo = req.num_tokens - cached
            n = min(todo, budget, self.kv.num_available) if chunked else todo
            estimates.append(self._estimate(req, busy))
            paused = req.status is RequestStatus.PAUSED
            fits = _peak_tokens(estimates) + self.kv.num_locked < cfg.max_total_token_num
            room = len(estimates) + paused_left - paused <= cfg.running_max_req_size
            if not (fits and room and 0 < n <= budget and self.kv.can_allocate(n)):
                self.kv.release(req, cache=False)  # back to holding nothing: the prefix lock goes
                break
            self.waiting.popleft()
            paused_left -= paused
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= n
            if req.cache_hit is None:
                req.cache_hit = cached
            admitted.append(self._prefill_chunk(req, n, cached_prefix=cached))
        return admitted

    def _make_room(self, decoding: list[Request]) -> list[Request]:
        """Pause the youngest running requests until each remaining decode gets a slot."""
        need = len(decoding)
        if need <= self.kv.num_available:  # the common case: no sort of the running requests
            return []
        pending = {id(r) for r in decoding}
        victims = []
        by_age = sorted(self.running, key=lambda r: r.arrival)
        while need > self.kv.num_available and by_age:
            victim = by_age.pop()
            need -= id(victim) in pending
            self._pause([victim])
            victims.append(victim)
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

    def _estimate(self, req: Request, busy: bool) -> tuple[int, int]:
        """(private tokens held once it runs, tokens it may still add): LightLLM's get_tuple_tokens."""
        cfg = self.config
        out = req.num_output
        max_new = req.params.max_new_tokens
        if not (busy or req.params.ignore_eos):
            max_new = min(max_new, max(int(1.1 * out), cfg.router_max_new_token_len))
        held = req.num_tokens - req.num_cached
        if req.status is RequestStatus.RUNNING:
            return held, max(0, max_new - out - 1)
        return held + 1, max(0, max_new - out - 2)

    def estimated_peak(self) -> int:
        """LightLLM's estimate of the running requests' peak KV use, in tokens (locked cached prefixes once):
        `_estimate` of every running request, computed over arrays."""
        if not self.running:
            return self.kv.num_locked
        cfg, busy = self.config, self._busy()
        fields = np.array([(len(r.output_ids) + r.num_pending, r.params.max_new_tokens, r.params.ignore_eos,
                            len(r.prompt_ids) - r.num_cached, r.status is RequestStatus.RUNNING)
                           for r in self.running], np.int64)  # [running, 5]
        out, max_new, ignore_eos, prompt_held, running = fields.T
        if not busy:
            capped = np.minimum(max_new, np.maximum((1.1 * out).astype(np.int64), cfg.router_max_new_token_len))
            max_new = np.where(ignore_eos == 1, max_new, capped)
        held = prompt_held + out + 1 - running
        left = np.maximum(0, max_new - out - 2 + running)
        return _peak_tokens_of(held, left) + self.kv.num_locked


def _peak_tokens(estimates: list[tuple[int, int]]) -> int:
    """Peak total KV if requests finish in order of remaining length: max_i (left_i × (i + 1) + Σ_{j≤i} held_j)
    over the requests sorted by tokens left, longest first."""
    if not estimates:
        return 0
    held, left = np.array(estimates, np.int64).reshape(-1, 2).T
    return _peak_tokens_of(held, left)


def _peak_tokens_of(held: np.ndarray, left: np.ndarray) -> int:
    """`_peak_tokens` of the estimates (held[i], left[i]), all [n] i64, n > 0."""
    order = np.argsort(-left, kind="stable")
    return int((left[order] * np.arange(1, len(order) + 1) + np.cumsum(held[order])).max())
