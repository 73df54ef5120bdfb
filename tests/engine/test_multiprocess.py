"""`--tp 2 --nccl_port`: two CPU processes joined by jax.distributed (one device each, gloo collectives) give the
tokens one process gives at --tp 2, prompt-cache table fills and seeded sampling included; once the follower is
gone, requests end with an error that says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from engine_helpers import make_engine
from multiprocess_generate import FLAGS, run

from jaxllm.engine.kv_cache import KVCache
from jaxllm.engine.step_inputs import DeviceStep, StepInputBuilder
from jaxllm.engine.step_shapes import StepShape
from jaxllm.child import Channel

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_device_step_crosses_a_channel_whole():
    shape = StepShape(tokens=16, rows=16, width=64, decode_only=False)
    inputs = StepInputBuilder(KVCache(512, 8), vocab_size=256).padding(shape)
    step = DeviceStep(shape, inputs, tuple(np.arange(64, dtype=np.int32) + k for k in range(4)))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        size = Channel(ours).send(("step", step))
        kind, received = Channel(theirs).receive()
    assert kind == "step" and received.shape == shape and size > step.nbytes
    sent, got = jax.tree.leaves((step.inputs, step.table_fills)), jax.tree.leaves((received.inputs, received.table_fills))
    assert len(sent) == len(got) and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(sent, got))


def test_two_processes_give_the_tokens_of_one(tiny_model_dir):
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "engine")])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    env.pop("XLA_FLAGS", None)  # one CPU device per process, not the test session's eight
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "multiprocess_generate.py"),
                           str(tiny_model_dir), str(_free_port())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(lines) == 2, done.stdout[-2000:] + done.stderr[-4000:]
    engine = make_engine(tiny_model_dir, **FLAGS)
    with engine:
        expected = run(engine)
    assert lines[0]["tokens"] == expected and all(len(t) == 6 for t in expected)
    assert lines[1]["finish_reason"] == "error"
    assert "process 1 of the --nccl_port deployment exited" in lines[1]["error"]
