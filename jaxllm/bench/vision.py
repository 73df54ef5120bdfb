"""`python -m jaxllm.bench.vision --model_dir DIR [--flag value ...]`: a vision-language model's image path in
one in-process engine (--enable_multimodal; random weights with --load_format dummy): the time to first token of
one request with one new image, the same request again with its image cached (no encode), the encoder's time
for 1 and 16 images, and the throughput of N concurrent one-image requests (each image new). Prints JSON.

Other flags are `python -m jaxllm.serve`'s (e.g. --data_type bf16 --max_total_token_num 65536). Images are
random noise photographs of 400×336 pixels (preprocessed like any image: resize, crop, normalise)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import jax
import numpy as np
from PIL import Image

from jaxllm.args import parse_args
from jaxllm.engine.engine import Engine
from jaxllm.engine.image_stage import ENCODE_BATCH
from jaxllm.engine.request import SamplingParams
from jaxllm.models.vision.registry import vision_family


def noise_images(engine, count: int, seed: int) -> list:
    """`count` distinct random images, preprocessed by the engine's processor."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(336, 400, 3), dtype=np.uint8)
        out.append(engine.image_processor(Image.fromarray(pixels), hashlib.md5(pixels.tobytes()).hexdigest()))
    return out


def prompt(engine, text_len: int, seed: int) -> list[int]:
    """Random text ids with the image placeholder second."""
    vision = engine.config.vision
    ids = [int(t) for t in np.random.default_rng(seed).integers(3, vision.image_token_id, size=text_len)]
    ids[1] = vision.image_token_id
    return ids


def timed_run(engine, requests, params: SamplingParams) -> dict:
    """Submit all at once; (wall s, TTFT of each, output tokens)."""
    started = time.perf_counter()
    streams = [engine.submit_images(ids, params, [image]) for ids, image in requests]
    ttft, tokens = [], 0
    for stream in streams:
        first = None
        for event in stream:
            if first is None:
                first = time.perf_counter() - started
            tokens += event.token_id >= 0
        ttft.append(first)
    return {"wall_s": time.perf_counter() - started, "ttft_s": ttft, "output_tokens": tokens}


def encode_time(engine, count: int, repeats: int = 3) -> float:
    """Seconds to encode `count` images into the image buffer (device time, after a compiling call)."""
    runner = engine.runner
    family = vision_family(engine.config.vision.family)
    (batch,) = family.batches(engine.config, noise_images(engine, count, seed=10_000 + count), count)
    rows = np.full(batch.token_index.shape, runner.image_scratch_row, np.int32)  # written nowhere that matters
    best = float("inf")
    for _ in range(repeats + 1):
        started = time.perf_counter()
        runner.encode_images(batch.inputs, batch.static, rows)
        jax.block_until_ready(runner.image_slab)
        best = min(best, time.perf_counter() - started)
    return best


def run(engine, concurrent: int, text_len: int, output_len: int) -> dict:
    """The measurements on a started engine serving a vision-language model with --enable_multimodal."""
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    many = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    # Untimed: compiles the encoder at every batch size (powers of two up to the stage's batch: a burst's
    # images may split into any of them as rows free up) and the steps these runs meet.
    count = 1
    while count <= ENCODE_BATCH:
        encode_time(engine, count, repeats=0)
        count *= 2
    timed_run(engine, [(prompt(engine, text_len, 0), noise_images(engine, 1, 0)[0])], one)
    timed_run(engine, list(zip((prompt(engine, text_len, i) for i in range(concurrent)),
                               noise_images(engine, concurrent, 1))), many)
    assert engine.wait_idle(600)
    new_image = noise_images(engine, 1, 2)[0]
    ids = prompt(engine, text_len, 2)
    encoded = engine.stats()["images_encoded"]
    first = timed_run(engine, [(ids, new_image)], one)
    again = timed_run(engine, [(ids, new_image)], one)  # prompt cache off: only the encode is saved
    repeat_encodes = engine.stats()["images_encoded"] - encoded - 1
    assert engine.wait_idle(600)
    burst = timed_run(engine, list(zip((prompt(engine, text_len, 100 + i) for i in range(concurrent)),
                                       noise_images(engine, concurrent, 3))), many)
    stats = engine.stats()
    return {
        "device": str(jax.devices()[0]),
        "image_tokens": new_image.num_tokens,
        "prompt_tokens": text_len - 1 + new_image.num_tokens,
        "ttft_ms_new_image": 1000 * first["ttft_s"][0],
        "ttft_ms_cached_image": 1000 * again["ttft_s"][0],
        "repeated_image_encodes": repeat_encodes,  # 0: the cached image is not encoded again
        "encode_ms_1_image": 1000 * encode_time(engine, 1),
        "encode_ms_16_images": 1000 * encode_time(engine, 16),
        "concurrent_requests": concurrent,
        "concurrent_output_len": output_len,
        "concurrent_wall_s": burst["wall_s"],
        "concurrent_requests_per_s": concurrent / burst["wall_s"],
        "concurrent_output_tokens_per_s": burst["output_tokens"] / burst["wall_s"],
        "concurrent_mean_ttft_ms": 1000 * float(np.mean(burst["ttft_s"])),
        "image_encode_calls": stats["image_encode_calls"],
        "images_encoded": stats["images_encoded"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.bench.vision", description=__doc__)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--text_len", type=int, default=64, help="text tokens of each prompt (with its placeholder)")
    parser.add_argument("--output_len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None,
                        help="step shapes compiled at start-up, in parallel (default: the server's start-up set)")
    ns, rest = parser.parse_known_args(argv)
    args = parse_args(["--model_dir", ns.model_dir, "--load_format", "dummy", "--enable_multimodal", *rest])
    with Engine.from_args(args, warmup=ns.warmup) as engine:
        result = run(engine, ns.concurrent, ns.text_len, ns.output_len)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
