"""Admission, batching and preemption with LightLLM's router semantics (the `--router_*`, `--batch_max_tokens`,
`--running_max_req_size` flags), plus the prompt-length checks. A step is a plain list of
(request, tokens this step): prefill, decode and, later, splitfuse are policies over the same output.
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


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Request]
    kind: str  # "prefill" | "decode" | "idle"

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


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
    read, so counts use `num_tokens`/`num_output`, which include them.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCache):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()  # paused requests at the head, oldest first
        self.running: list[Request] = []
        self._decode_steps_since_admit = 0

    # --- queue ---------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Take `req` out of the queues and return its KV at once (finish, abort or error)."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PAUSED):
            self.waiting.remove(req)
        self.kv.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    @property
    def num_paused(self) -> int:
        return sum(1 for r in self.waiting if r.status is RequestStatus.PAUSED)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- the policy ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if not self.running or self._decode_steps_since_admit >= self.config.router_max_wait_tokens:
            self._decode_steps_since_admit = 0
            admitted = self._admit()
            if admitted:
                return SchedulerOutput(admitted, [], "prefill")
        decoding = [r for r in self.running if r.wants_token]
        if not decoding:
            return SchedulerOutput([], [], "idle")
        preempted = self._make_room(decoding)
        if preempted:
            decoding = [r for r in decoding if r.status is RequestStatus.RUNNING]
        self.kv.allocate_one_each(decoding)
        chunks = []
        for req in decoding:
            chunks.append(ScheduledChunk(req, req.num_computed, 1))
            req.num_computed += 1
        self._decode_steps_since_admit += 1
        return SchedulerOutput(chunks, preempted, "decode")

    # --- building blocks (a splitfuse policy reuses them) ----------------------------------------
    def _admit(self) -> list[ScheduledChunk]:
        """Queue head → a prefill batch, while LightLLM's estimated peak KV use fits and the prompt
        tokens stay within batch_max_tokens."""
        cfg = self.config
        busy = self.kv.num_used / cfg.max_total_token_num >= cfg.router_token_ratio
        estimates = [self._estimate(r, busy) for r in self.running]
        paused_left = self.num_paused
        admitted: list[ScheduledChunk] = []
        batch_tokens = 0
        while self.waiting:
            req = self.waiting[0]
            if req.num_pending:  # preempted while its last token was in flight: wait for it
                break
            n = req.num_tokens
            estimates.append(self._estimate(req, busy))
            if req.status is RequestStatus.PAUSED:
                paused_left -= 1
            fits = _peak_tokens(estimates) < cfg.max_total_token_num
            room = len(estimates) + paused_left <= cfg.running_max_req_size
            if not (fits and room and batch_tokens + n <= cfg.batch_max_tokens and self.kv.can_allocate(n)):
                break
            self.waiting.popleft()
            self.kv.allocate(req, n)
            req.status = RequestStatus.RUNNING
            req.num_computed = n
            self.running.append(req)
            batch_tokens += n
            wants_lp = req.params.prompt_logprobs and req.prompt_logprobs is None
            admitted.append(ScheduledChunk(req, 0, n, prompt_logprobs=wants_lp))
        return admitted

    def _make_room(self, decoding: list[Request]) -> list[Request]:
        """Pause the youngest running requests until each remaining decode gets a slot."""
        need = len(decoding)
        victims = []
        by_age = sorted(self.running, key=lambda r: r.arrival)
        while need > self.kv.num_free and by_age:
            victim = by_age.pop()
            need -= victim.wants_token
            self._pause([victim])
            victims.append(victim)
        return victims

    def pause_all(self) -> list[Request]:
        """Pause every running request (their KV is lost, e.g. after a failed step)."""
        victims = sorted(self.running, key=lambda r: r.arrival, reverse=True)
        self._pause(victims)
        return victims

    def _pause(self, victims: list[Request]) -> None:
        """Running → head of the queue, oldest first; KV returned; recomputed when readmitted."""
        for victim in victims:
            self.running.remove(victim)
            self.kv.release(victim)
            victim.status = RequestStatus.PAUSED
        for victim in sorted(victims, key=lambda r: r.arrival, reverse=True):
            self.waiting.appendleft(victim)
        if victims:
            self._decode_steps_since_admit = 0

    def _estimate(self, req: Request, busy: bool) -> tuple[int, int]:
        """(tokens held once it runs, tokens it may still add): LightLLM's get_tuple_tokens."""
        cfg = self.config
        out = req.num_output
        max_new = req.params.max_new_tokens
        if not (busy or req.params.ignore_eos):
            max_new = min(max_new, max(int(1.1 * out), cfg.router_max_new_token_len))
        if req.status is RequestStatus.RUNNING:
            return req.num_tokens, max(0, max_new - out - 1)
        return req.num_tokens + 1, max(0, max_new - out - 2)

    def estimated_peak(self) -> int:
        """LightLLM's estimate of the running requests' peak KV use, in tokens."""
        busy = self.kv.num_used / self.config.max_total_token_num >= self.config.router_token_ratio
        return _peak_tokens([self._estimate(r, busy) for r in self.running])


def _peak_tokens(estimates: list[tuple[int, int]]) -> int:
    """Peak total KV if requests finish in order of remaining length: max_i (left_i × (i + 1) + Σ_{j≤i} held_j)
    over the requests sorted by tokens left, longest first."""
    if not estimates:
        return 0
    ordered = sorted(estimates, key=lambda e: -e[1])
    held = np.cumsum([e[0] for e in ordered])
    left = np.array([e[1] for e in ordered])
    return int((left * np.arange(1, len(ordered) + 1) + held).max())
