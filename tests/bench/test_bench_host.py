"""bench.host: the engine thread's host time per row per step, each phase's wall and CPU time, from a real run of
the engine core's path (a tiny random model with SmolLM2's tokenizer)."""

from __future__ import annotations

from jaxllm.args import ServerArgs
from jaxllm.bench.host import host_us_per_row


def test_host_time_per_row_reports_every_phase(tiny_served_model):
    args = ServerArgs.from_argv(["--model_dir", str(tiny_served_model.path), *tiny_served_model.flags])
    result = host_us_per_row(args, rows=2, output_len=6, as_core=True)
    assert result["steps"] == 6  # a prefill step, then a decode step per further token
    for phase in ("schedule", "dispatch", "postprocess", "host"):
        assert result[f"{phase}_us_per_row"] > 0 and result[f"{phase}_cpu_us_per_row"] > 0
    assert result["host_us_per_row"] > result["schedule_us_per_row"] + result["dispatch_us_per_row"]
