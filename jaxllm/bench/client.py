"""Asynchronous load generator: sends a workload to a running server (LightLLM or OpenAI API), streaming; from
one process or several (`run_load_in_processes`)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

import aiohttp
import numpy as np
from tqdm import tqdm

from jaxllm.bench.stats import RequestTiming
from jaxllm.bench.workload import BenchRequest


def _lightllm_body(prompt: str, req: BenchRequest, extra: dict) -> tuple[str, dict]:
    return "/generate_stream", {
        "inputs": prompt,
        "parameters": {"max_new_tokens": req.output_len, "ignore_eos": True, **extra},
    }


def _openai_body(prompt: str, req: BenchRequest, model: str, extra: dict) -> tuple[str, dict]:
    return "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": req.output_len, "stream": True,
        "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}, **extra,
    }


async def _one_request(session, base_url, api, model, prompt, req: BenchRequest, extra: dict) -> RequestTiming:
    if api == "lightllm":
        path, body = _lightllm_body(prompt, req, extra)
    else:
        path, body = _openai_body(prompt, req, model, extra)
    timing = RequestTiming(ok=False, prompt_tokens=len(req.prompt_ids))
    start = last = time.perf_counter()
    usage_tokens = None
    try:
        async with session.post(base_url + path, json=body) as resp:
            if resp.status != 200:
                timing.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return timing
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if api == "openai" and event.get("usage"):  # the last chunk: exact counts
                    timing.prompt_tokens = event["usage"]["prompt_tokens"]
                    usage_tokens = event["usage"]["completion_tokens"]
                if api == "openai" and not any(c.get("finish_reason") is None for c in event.get("choices", [])):
                    continue  # the finish and usage chunks carry no new token
                now = time.perf_counter()
                if timing.output_tokens == 0:
                    timing.ttft = now - start
                else:
                    timing.itl.append(now - last)
                last = now
                timing.output_tokens += 1
                if api == "lightllm":
                    timing.prompt_tokens = event["token"].get("prompt_tokens", timing.prompt_tokens)
        if usage_tokens is not None:
            timing.output_tokens = usage_tokens
        timing.latency = time.perf_counter() - start
        timing.ok = timing.output_tokens > 0
        if not timing.ok:
            timing.error = "empty stream"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, KeyError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


async def run_load(
    base_url: str,
    requests: list[BenchRequest],
    prompts: list[str],
    *,
    api: str = "lightllm",
    model: str = "default",
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    seed: int = 0,
    api_key: str | None = None,
    json_schema: dict | None = None,
    progress: bool = True,
) -> tuple[list[RequestTiming], float]:
    """Send every request (Poisson arrivals at `request_rate` req/s, or all at once, with the bearer `api_key`
    if given; each answer constrained to `json_schema` if given); returns timings and the run's wall time."""
    extra = {} if json_schema is None else {"guided_json": json_schema}
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     headers=headers) as session:

        async def guarded(prompt, req):
            async with limit:
                result = await _one_request(session, base_url, api, model, prompt, req, extra)
            bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        for prompt, req in zip(prompts, requests):
            tasks.append(asyncio.create_task(guarded(prompt, req)))
            if request_rate != float("inf"):
                await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
        timings = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(timings), duration


def _run_share(base_url: str, requests: list[BenchRequest], prompts: list[str], options: dict,
               start_at: float) -> tuple[list[RequestTiming], float]:
    """One client process's share: waits for the common start, returns its timings and when it finished."""
    time.sleep(max(0.0, start_at - time.time()))
    timings, _ = asyncio.run(run_load(base_url, requests, prompts, progress=False, **options))
    return timings, time.time()


def run_load_in_processes(base_url: str, requests: list[BenchRequest], prompts: list[str], *, processes: int,
                          **options) -> tuple[list[RequestTiming], float]:
    """`run_load` with the requests dealt in turn to `processes` client processes started together, each with
    its own event loop: one loop reading hundreds of streams falls behind and reads their tokens in clumps, which
    the inter-token gaps would charge to the server (docs/perf.md, session 11). A request rate and a concurrency
    limit are shared out (independent Poisson arrivals add up to the whole rate). Timings come back in the
    requests' order; the wall time runs from the common start to the last process's end."""
    processes = min(processes, len(requests))
    if processes <= 1:
        return asyncio.run(run_load(base_url, requests, prompts, **options))
    rate = options.get("request_rate", float("inf"))
    limit = options.get("max_concurrency")
    shares = []
    for i in range(processes):
        share = {**options, "request_rate": rate / processes, "seed": options.get("seed", 0) + i}
        if limit:
            share["max_concurrency"] = max(1, limit // processes + (i < limit % processes))
        shares.append((base_url, requests[i::processes], prompts[i::processes], share))
    start_at = time.time() + 1.0 + 0.5 * processes  # after every process has started and imported
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(_run_share, [(*share, start_at) for share in shares])
    timings: list[RequestTiming | None] = [None] * len(requests)
    for i, (share_timings, _) in enumerate(results):
        timings[i::processes] = share_timings
    return timings, max(end for _, end in results) - start_at
