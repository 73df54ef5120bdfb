"""`jaxllm.bench offline` on a 2-layer Llama with random weights and SmolLM2's tokenizer (the bench counts and
times; what the tokens say does not matter, and the small model compiles in a fraction of SmolLM2's time): every
request completes with its token count, and the host-time breakdown adds up (its parts never exceed the host time
they split); engine flags pass through."""

import pytest

from jaxllm import LLM
from jaxllm.bench.__main__ import build_parser
from jaxllm.bench.offline import format_offline_table, run_offline
from jaxllm.bench.workload import WorkloadSpec, build_workload

FLAGS = {"load_format": "dummy", "data_type": "float32", "max_total_token_num": 2048, "max_req_input_len": 64,
         "max_req_total_len": 160, "running_max_req_size": 16, "batch_max_tokens": 512, "warmup": 0,
         "disable_log_stats": True}


@pytest.fixture(scope="module")
def llm(tiny_served_model):
    with LLM(str(tiny_served_model.path), **FLAGS) as model:
        yield model


def test_offline_counts_tokens_and_splits_host_time(llm):
    spec = WorkloadSpec(num_prompts=12, input_len=8, input_len_max=40, output_len=4, output_len_max=12, seed=3)
    requests = list(build_workload(spec))
    result = run_offline(llm, requests)
    assert result["completed"] == 12
    assert result["total_output_tokens"] == sum(r.output_len for r in requests)
    assert result["total_input_tokens"] == sum(len(r.prompt_ids) for r in requests)
    assert result["steps"] >= max(r.output_len for r in requests)
    assert result["prefill_steps"] >= 1 and result["prefill_steps"] + result["decode_steps"] == result["steps"]
    assert f"{result['steps']}: {result['prefill_steps']} + {result['decode_steps']}" in format_offline_table(result)
    parts = [result[f"{t}_ms_per_step"] for t in ("schedule", "dispatch", "postprocess")]
    assert all(p > 0 for p in parts)
    # The launch runs on its own thread while the loop reads the previous step's results, then joins it.
    assert 0 < result["launch_ms_per_step"] <= sum(parts[1:]) + result["device_wait_ms_per_step"]
    assert 0 < result["launch_cpu_ms_per_step"] <= result["launch_ms_per_step"] * 1.05
    assert sum(parts) <= result["host_ms_per_step"] * 1.001
    assert 0 <= result["steps_after_idle_after_prefill"] <= result["steps_after_idle"] <= result["steps"]
    # the enqueue's end bounds the idle launches from above, its start from below
    assert result["steps_after_idle"] <= result["steps_idle_by_enqueue"] <= result["steps"]
    assert result["steps_after_idle_after_prefill"] <= result["steps_idle_by_enqueue_after_prefill"]
    # each idle launch described, in order (the first step, launched with nothing before it, is not one)
    idle = result["idle_launches"]
    assert len(idle) == min(result["steps_idle_by_enqueue"], 64)
    assert [e["step"] for e in idle] == sorted(e["step"] for e in idle)
    assert all(1 <= e["step"] < result["steps"] for e in idle)
    assert sum(e["counted"] == "at the call" for e in idle) == min(result["steps_after_idle"], 64)
    assert {e["kind"] for e in idle} <= {"prefill", "decode"} and all(e["rows"] >= 1 for e in idle)
    assert ("idle launches" in format_offline_table(result)) == bool(idle)
    assert "schedule / dispatch / postprocess" in format_offline_table(result)
    # The host threads' CPU per step, busiest first; the engine thread among them (it schedules and reads).
    threads = dict(result["thread_cpu_ms_per_step"])
    assert "jaxllm-engine" in threads and all(ms > 0 for ms in threads.values())
    assert "threads' CPU per step" in format_offline_table(result)
    assert result["new_step_shapes"] > 0  # warmup=0: the first run compiles what it meets
    assert run_offline(llm, requests)["new_step_shapes"] == 0  # the same workload again compiles nothing


def test_best_of_groups_hold_the_prompt_once(llm):
    """--best-of 4 on one 40-token prompt: a group holds the prompt once plus 4 outputs; separate requests
    hold it 4 times."""
    requests = list(build_workload(WorkloadSpec(num_prompts=1, input_len=40, output_len=6, seed=4)))
    grouped = run_offline(llm, requests, best_of=4)
    separate = run_offline(llm, requests, best_of=4, separately=True)
    for result in (grouped, separate):
        assert result["completed"] == 4 and result["total_output_tokens"] == 24
    assert 40 < grouped["peak_kv_tokens"] <= 40 + 4 * 6
    assert separate["peak_kv_tokens"] > 4 * 40
    assert "groups" in format_offline_table(grouped) and "separate" in format_offline_table(separate)


def test_engine_flags_pass_through_unabbreviated():
    # `--mode` is an engine flag, not an abbreviation of the bench's own `--model_dir`
    ns, extra = build_parser().parse_known_args(
        ["offline", "--model_dir", "some/dir", "--mode", "triton_w8a16", "--max_total_token_num", "4096"])
    assert ns.model_dir == "some/dir"
    assert extra == ["--mode", "triton_w8a16", "--max_total_token_num", "4096"]
