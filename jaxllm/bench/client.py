"""Asynchronous load generator: sends a workload to a running server (LightLLM or OpenAI API), streaming."""

from __future__ import annotations

import asyncio
import json
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
) -> tuple[list[RequestTiming], float]:
    """Send every request (Poisson arrivals at `request_rate` req/s, or all at once, with the bearer `api_key`
    if given; each answer constrained to `json_schema` if given); returns timings and the run's wall time."""
    extra = {} if json_schema is None else {"guided_json": json_schema}
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    bar = tqdm(total=len(requests), desc="requests", unit="req")
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
