"""`jaxllm.bench.step`'s decode step on a tiny Llama: timed, with its kernels traced (`--profile`; the CPU backend
traces no device process, which the report says), and the kernel table the profile prints, from a trace."""

import json
from pathlib import Path

import jax.numpy as jnp

from jaxllm.bench.profile import device_events, kernel_lines
from jaxllm.bench.step import StepCase, run_case
from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.parallel import make_mesh
from jaxllm.weights import random_params
from tests.bench.test_bench_profile import _trace

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "configs"


def test_a_decode_step_is_timed_and_profiled(capsys):
    raw = json.loads((ASSETS / "llama-3-8b.json").read_text())
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512)
    config = ModelConfig.from_hf_dict(raw)
    model = build_model(config, jnp.float32)
    params = random_params(model, make_mesh(1), 1)
    seconds, queued, enqueue = run_case(model, params, config, StepCase(batch=3, context=20), repeats=3,
                                        profile_steps=2)
    assert 0 < enqueue and 0 < seconds and 0 < queued
    assert "batch 3: no device events in the trace" in capsys.readouterr().out


def test_kernel_lines_give_each_kernel_per_step_with_its_fusion():
    lines = kernel_lines(device_events(_trace()), steps=2, top=5, summaries={"gemm": "dot; from mlp/dot_general"})
    assert lines[0].split() == ["calls/step", "µs/step", "share", "kernel"]
    assert lines[1].split()[:4] == ["1.0", "42.0", "70.0%", "gemm"] and "[dot; from mlp/dot_general]" in lines[1]
    assert lines[2].split() == ["1.0", "18.0", "30.0%", "attention"]
