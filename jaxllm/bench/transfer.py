"""What process 0 sends the other processes per step under --nccl_port, measured: a DeviceStep's bytes (decode at
1 and 512 rows, a prefill) and the time to hand it over, through the local socket the deployment uses (pickle,
send, receive, unpickle) or through a JAX broadcast (`multihost_utils.broadcast_one_to_all` of the packed
buffers, over two CPU processes joined by jax.distributed):

    python -m jaxllm.bench.transfer [--broadcast]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from jaxllm.child import Channel
from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.request import Request, SamplingParams
from jaxllm.engine.scheduler import ScheduledChunk, SchedulerOutput
from jaxllm.engine.step_inputs import DeviceStep, StepInputBuilder, pack
from jaxllm.engine.step_shapes import StepShape

VOCAB = 128256  # Llama 3's (the sampling values do not depend on it)


def device_step(rows: int, prompt: int, decode: bool) -> DeviceStep:
    """A realistic step: `rows` requests with `prompt`-token prompts, decoding (one token each, the KV of
    prompt + 64 tokens behind) or prefilling their prompts."""
    kv = KVCache(rows * (prompt + 128) + 16, rows)
    builder = StepInputBuilder(kv, VOCAB)
    chunks, rng = [], np.random.default_rng(0)
    for i in range(rows):
        req = Request(request_id=str(i), prompt_ids=[int(t) for t in rng.integers(3, VOCAB, prompt)],
                      params=SamplingParams(max_new_tokens=128).normalized(), seed=i, arrival=i)
        req.kv_row = i
        req.slots = list(range(i * (prompt + 128), (i + 1) * (prompt + 128)))
        start = prompt + 64 if decode else 0
        if decode:
            req.output_ids = [int(t) for t in rng.integers(3, VOCAB, 65)]
        chunks.append(ScheduledChunk(req, start, 1 if decode else prompt, decode=decode))
    tokens = rows if decode else rows * prompt
    shape = StepShape(tokens, rows, 1024, decode)
    inputs = builder.build(SchedulerOutput(chunks, [], "decode" if decode else "prefill"), shape)[0]
    return DeviceStep(shape, inputs, None)


def socket_seconds(step: DeviceStep, repeats: int) -> tuple[float, int]:
    """Median time from pickling a step on one side to having it unpickled on the other (a local socketpair; a
    one-byte acknowledgement back marks the end), and the bytes on the wire."""
    ours, theirs = socket.socketpair()
    sender, receiver = Channel(ours), Channel(theirs)

    def echo():
        for _ in range(repeats):
            receiver.receive()
            theirs.sendall(b"k")

    thread = threading.Thread(target=echo)
    thread.start()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        size = sender.send(("step", step))
        ours.recv(1)
        times.append(time.perf_counter() - started)
    thread.join()
    ours.close()
    theirs.close()
    return float(np.median(times)), size


def _broadcast_process(process_id: int, port: int, rows: int, prompt: int, decode: bool, repeats: int) -> None:
    """One of two processes timing broadcast_one_to_all of a step's packed buffer (process 0 prints)."""
    from jaxllm.multiprocess import initialize

    initialize(port, 2, process_id)
    from jax.experimental import multihost_utils

    words, _ = pack(device_step(rows, prompt, decode).inputs)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        multihost_utils.broadcast_one_to_all(words)
        times.append(time.perf_counter() - started)
    if process_id == 0:
        print(json.dumps({"broadcast_ms": 1e3 * float(np.median(times[1:]))}), flush=True)
    multihost_utils.sync_global_devices("measured")
    os._exit(0)  # without jax.distributed's shutdown: the other process may have taken the coordinator with it


def broadcast_seconds(rows: int, prompt: int, decode: bool, repeats: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "jaxllm.bench.transfer", "--_process", "{}", "--_port", str(port),
               "--_case", json.dumps([rows, prompt, decode]), "--repeats", str(repeats)]
    procs = [subprocess.Popen([c.format(i) for c in command], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    out = procs[0].communicate()[0]
    procs[1].wait()
    return json.loads(out.strip().splitlines()[-1])["broadcast_ms"] / 1e3


CASES = {"decode, 1 row": (1, 128, True), "decode, 512 rows": (512, 128, True),
         "prefill, 512 × 128 tokens": (512, 128, False)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxllm.bench.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--broadcast", action="store_true", help="also time broadcast_one_to_all (spawns 2 processes)")
    p.add_argument("--_process", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_case", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns._process is not None:
        _broadcast_process(ns._process, ns._port, *json.loads(ns._case), ns.repeats)
        return 0
    for name, case in CASES.items():
        step = device_step(*case)
        seconds, wire = socket_seconds(step, ns.repeats)
        result = {"case": name, "array_bytes": step.nbytes, "wire_bytes": wire, "socket_ms": round(1e3 * seconds, 3)}
        if ns.broadcast:
            result["broadcast_ms"] = round(1e3 * broadcast_seconds(*case, ns.repeats), 3)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
