"""The profile bench's reading of a trace: device events only, busy time with overlaps counted once, kernels
per step; and what each fusion of a compiled module computes."""

import jax
import jax.numpy as jnp

from jaxllm.bench.profile import busy_us, device_events, fusion_summaries, kernel_table


def _trace():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    host = [{"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "ts": 0.0, "dur": 900.0}]
    device = [  # two steps: a matmul and an attention kernel each, the second step's overlapping on a 2nd stream
        {"ph": "X", "pid": 7, "tid": 1, "name": "gemm", "ts": 10.0, "dur": 40.0},
        {"ph": "X", "pid": 7, "tid": 1, "name": "attention", "ts": 55.0, "dur": 15.0},
        {"ph": "X", "pid": 7, "tid": 1, "name": "gemm", "ts": 200.0, "dur": 44.0},
        {"ph": "X", "pid": 7, "tid": 2, "name": "attention", "ts": 230.0, "dur": 21.0},
        {"ph": "i", "pid": 7, "tid": 1, "name": "marker", "ts": 5.0},
    ]
    return {"traceEvents": meta + host + device}


def test_device_events_busy_time_and_kernel_table():
    events = device_events(_trace())
    assert sorted(e["name"] for e in events) == ["attention", "attention", "gemm", "gemm"]
    assert busy_us(events) == 40.0 + 15.0 + (251.0 - 200.0)  # the overlap of the last two counted once
    table = kernel_table(events, steps=2, top=5)
    assert [row[0] for row in table] == ["gemm", "attention"]
    name, calls, us, share = table[0]
    assert (calls, us) == (1.0, 42.0) and abs(share - 84.0 / 120.0) < 1e-12


def test_fusion_summaries_name_each_fusions_operations_and_their_source():
    """A compiled module's fusions, by their kernels' names: the fused computation's operations (parameters,
    constants and broadcasts left out) and the JAX operations they came from."""
    def f(x, w):
        return jax.nn.silu(x @ w).sum(-1) + jnp.abs(x).max(-1)

    text = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((8, 8))).compile().as_text()
    summaries = fusion_summaries(text)
    assert summaries and all("." not in name for name in summaries)  # kernel names: "." written as "_"
    silu = [s for s in summaries.values() if "exponential" in s]
    assert silu and "silu" in silu[0].split("; from ")[1]
    assert not any(word in s.split(";")[0].split() for s in summaries.values() for word in ("parameter", "constant"))


def test_the_runner_gives_its_compiled_steps_hlo(tiny_served_model):
    from jaxllm import LLM, SamplingParams

    flags = dict(load_format="dummy", data_type="float32", max_total_token_num=256, max_req_input_len=32,
                 max_req_total_len=64, running_max_req_size=2, batch_max_tokens=64, warmup=0, disable_log_stats=True)
    with LLM(str(tiny_served_model.path), **flags) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)
        text = llm.engine.runner.compiled_text()
    assert text.count("HloModule") >= 2  # the prefill's step and the decode's
    assert fusion_summaries(text)
