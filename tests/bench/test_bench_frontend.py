"""bench.frontend's text + SSE capacity on SmolLM2's tokenizer: rates for every phase, from a run that made text."""

from __future__ import annotations

from jaxllm.bench.frontend import text_capacity


def test_text_capacity_reports_each_phase(smollm2_dir):
    result = text_capacity(str(smollm2_dir), rows=4, steps=12)
    assert set(result) == {"text_tokens_per_s", "sse_events_per_s", "text_and_sse_tokens_per_s",
                           "text_us_per_token", "sse_us_per_token"}
    assert 0 < result["text_and_sse_tokens_per_s"] < min(result["text_tokens_per_s"], result["sse_events_per_s"])
    assert result["text_us_per_token"] > 0 and result["sse_us_per_token"] > 0
