"""Benchmark metric definitions (vLLM's) and workload generation."""

import dataclasses
import json

import pytest

from jaxllm.bench.stats import RequestTiming, format_table, summarize
from jaxllm.bench.workload import WorkloadSpec, build_workload


def test_summary_follows_vllm_definitions():
    timings = [
        RequestTiming(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestTiming(ok=True, prompt_tokens=20, output_tokens=3, ttft=0.2, latency=0.6, itl=[0.2] * 2),
        RequestTiming(ok=True, prompt_tokens=30, output_tokens=1, ttft=0.3, latency=0.3, itl=[]),
        RequestTiming(ok=False, error="HTTP 400: bad"),
    ]
    result = summarize(timings, duration_s=2.0)
    assert (result["completed"], result["failed"]) == (3, 1)
    assert result["total_input_tokens"] == 60 and result["total_output_tokens"] == 9
    assert result["request_throughput"] == pytest.approx(1.5)
    assert result["output_throughput"] == pytest.approx(4.5)
    # TPOT excludes the first token and requests with a single token: (0.4/4, 0.4/2) → mean 0.15 s
    assert result["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert result["ttft_ms"]["median"] == pytest.approx(200.0)
    assert result["itl_ms"]["mean"] == pytest.approx(1000 * (0.4 + 0.4) / 6)
    assert result["errors"] == ["HTTP 400: bad"]
    assert "TPOT" in format_table(result)


def test_random_workload_is_deterministic_and_within_bounds():
    spec = WorkloadSpec(num_prompts=20, input_len=8, input_len_max=16, output_len=4, output_len_max=9, seed=3)
    first, second = list(build_workload(spec)), list(build_workload(spec))
    assert first == second
    assert all(8 <= len(r.prompt_ids) <= 16 and 4 <= r.output_len <= 9 for r in first)
    assert len({len(r.prompt_ids) for r in first}) > 1
    other = list(build_workload(WorkloadSpec(num_prompts=20, input_len=8, seed=4)))
    assert other[0].prompt_ids != first[0].prompt_ids


def test_shared_prefix_workload_opens_every_prompt_with_the_same_tokens():
    spec = WorkloadSpec(num_prompts=6, input_len=5, input_len_max=9, shared_prefix_len=40, seed=2)
    requests = list(build_workload(spec))
    prefix = requests[0].prompt_ids[:40]
    assert all(r.prompt_ids[:40] == prefix and 45 <= len(r.prompt_ids) <= 49 for r in requests)
    assert len(set(prefix)) > 20 and len({r.prompt_ids[40:] for r in requests}) == 6
    assert list(build_workload(dataclasses.replace(spec, seed=3)))[0].prompt_ids[:40] != prefix
    with pytest.raises(ValueError, match="not to a JSONL dataset"):
        build_workload(dataclasses.replace(spec, dataset="prompts.jsonl"), object())


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]


def test_jsonl_dataset_goes_through_grain(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"prompt": f"prompt number {i}", "output_len": i + 1} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    requests = list(build_workload(WorkloadSpec(num_prompts=7, dataset=str(path)), CharTokenizer()))
    assert len(requests) == 7  # repeats the 3 records
    for r in requests:
        assert r.prompt_ids == tuple(ord(c) for c in r.prompt_text)
        assert r.output_len == int(r.prompt_text.rsplit(" ", 1)[1]) + 1
