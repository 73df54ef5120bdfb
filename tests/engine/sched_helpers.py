"""Shared by the scheduler tests: schedulers over a host-only KV cache, requests, and the engine's protocol
(dispatch one step, read the previous one a step later) without a device."""

from __future__ import annotations

from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.prefix_cache import PrefixCache
from jaxllm.engine.request import Request, SamplingParams
from jaxllm.engine.scheduler import Scheduler, SchedulerConfig

EOS = 2


def make_scheduler(capacity=1000, policy=Scheduler, prompt_cache=False, **overrides) -> Scheduler:
    cfg = {"max_total_token_num": capacity, "batch_max_tokens": capacity, "running_max_req_size": 64,
           "router_token_ratio": 0.0, "router_max_new_token_len": 1024, "router_max_wait_tokens": 10}
    cfg.update(overrides)
    config = SchedulerConfig(**cfg)
    kv = KVCache(capacity, config.running_max_req_size, prefix_cache=PrefixCache() if prompt_cache else None)
    return policy(config, kv)


def request(i, prompt_len_or_ids, max_new=16, **params) -> Request:
    ids = [7] * prompt_len_or_ids if isinstance(prompt_len_or_ids, int) else list(prompt_len_or_ids)
    return Request(f"r{i}", ids, SamplingParams(max_new_tokens=max_new, **params), seed=i, arrival=i)


def dispatch(sched: Scheduler, out) -> None:
    """What the engine does once a step is on the device."""
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.num_pending += 1
    sched.step_dispatched(out)


def run_step(sched: Scheduler, out, tokens) -> None:
    """What the engine does with a step's results: tokens appended, stops checked, KV freed."""
    for chunk in out.chunks:
        if not chunk.samples:
            continue
        req = chunk.request
        req.num_pending -= 1
        if req.finished:
            continue
        token = tokens(req)
        req.output_ids.append(token)
        if token == EOS and not req.params.ignore_eos:
            sched.finish(req, "stop")
        elif len(req.output_ids) >= req.params.max_new_tokens:
            sched.finish(req, "length")
