"""`python -m jaxllm.bench.dispatch`: one step's launch at --tp 2 on 2 CPU devices, timed part by part; what the
call hands the runtime is counted (argument leaves: a buffer each per device; one transfer per device)."""

from jaxllm.bench.dispatch import TINY, dispatch_us
from jaxllm.config import ModelConfig


def test_dispatch_times_a_tp2_launch_and_counts_its_arguments():
    config = ModelConfig.from_hf_dict({**TINY, "num_hidden_layers": 2})
    result = dispatch_us(config, tp=2, rows=1, dtype="float32", repeats=3)
    # 6 weights per layer + embedding, final norm and LM head; K and V per layer + the slot and token tables;
    # the last sampled tokens; the packed step inputs.
    assert result["argument_leaves"] == 6 * 2 + 3 + 2 * 2 + 2 + 1 + 1
    assert result["device_buffers_per_call"] == 2 * result["argument_leaves"]
    assert result["transfers_per_step"] == 2
    timed = [k for k in result if k.endswith("_us")]
    assert len(timed) == 13 and all(result[k] > 0 for k in timed), result
    assert result["busy_launch_thread_cpu_us"] <= result["busy_launch_us"] * 1.05  # CPU time within the wall
