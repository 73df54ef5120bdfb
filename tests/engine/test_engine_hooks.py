"""What the engine reports beyond tokens, and where it goes: step reports, queue times and prompt-cache hits in
the server's metrics (through ServerState and a request's Tracker, as the routes use them); --load_way reaching
the weights loader."""

import asyncio

import numpy as np
import pytest
import torch
import transformers

from engine_helpers import TINY_CONFIG, engine_args, make_engine, random_prompts
from jaxllm.engine.engine import Engine
from jaxllm.engine.request import SamplingParams
from jaxllm.metrics import Metrics
from jaxllm.server.generation import Generation
from jaxllm.server.state import ServerState


@pytest.fixture(scope="module")
def cached_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, use_dynamic_prompt_cache=True)
    with engine:
        yield engine


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_steps_queue_times_and_prompt_cache_hits_reach_the_server_metrics(cached_engine):
    args = cached_engine.args
    metrics = Metrics.from_args(args)
    state = ServerState(cached_engine, args, metrics)
    prompt = random_prompts(seed=30, count=1, max_len=30)[0] + [9] * 10
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    async def serve_one():
        tracker = state.track()
        sequences = await tracker.collect(Generation(cached_engine, [prompt], params))
        return sequences[0]

    cold = asyncio.run(serve_one())
    warm = asyncio.run(serve_one())
    assert [e.token_id for e in warm.events] == [e.token_id for e in cold.events]
    assert cold.events[0].cached_tokens == 0 and warm.events[0].cached_tokens == len(prompt) - 1
    assert all(e.queue_s is None for e in cold.events[1:]) and 0 <= cold.events[0].queue_s < 5
    # Each request: one prefill step, then decode steps (the last one's result may be read after the end).
    assert sample(metrics, "lightllm_batch_inference_count_total", method="prefill") == 2
    assert 2 <= sample(metrics, "lightllm_batch_inference_count_total", method="decode") <= 4
    assert sample(metrics, "lightllm_batch_next_size_count") == 2
    assert sample(metrics, "lightllm_request_queue_duration_count") == 2
    assert sample(metrics, "lightllm_prompt_cache_hit_tokens_total") == len(prompt) - 1
    assert sample(metrics, "lightllm_prompt_cache_prompt_tokens_total") == 2 * len(prompt)
    stats = cached_engine.stats()
    assert (stats["prompt_cache_hit_tokens"], stats["prompt_cache_query_tokens"]) == (len(prompt) - 1, 2 * len(prompt))


def test_a_failing_step_listener_does_not_stop_the_engine(cached_engine):
    reports = []

    def broken(report):
        reports.append(report)
        raise RuntimeError("listener bug")

    cached_engine.add_step_listener(broken)
    events = list(cached_engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2, ignore_eos=True)))
    cached_engine.remove_step_listener(broken)
    assert events[-1].finish_reason == "length"
    assert reports[0].method == "prefill" and reports[0].prefill_tokens == 3 and reports[0].batch_size == 1
    assert reports[0].duration_s > 0


def test_load_way_ds_reads_deepspeed_layer_files(tmp_path):
    """A directory with DeepSpeed pipeline files only: --load_way DS loads them, HF finds no weights."""
    config = transformers.LlamaConfig(**{k: v for k, v in TINY_CONFIG.items() if k != "model_type"})
    torch.manual_seed(3)
    state = transformers.LlamaForCausalLM(config).state_dict()
    config.save_pretrained(tmp_path)
    layers = TINY_CONFIG["num_hidden_layers"]
    torch.save({"weight": state["model.embed_tokens.weight"]}, tmp_path / "layer_01-model_00-model_states.pt")
    for i in range(layers):
        prefix = f"model.layers.{i}."
        block = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        torch.save(block, tmp_path / f"layer_{i + 3:02d}-model_00-model_states.pt")
    torch.save({"weight": state["model.norm.weight"]}, tmp_path / f"layer_{layers + 4:02d}-model_00-model_states.pt")
    torch.save({"weight": state["lm_head.weight"]}, tmp_path / f"layer_{layers + 5:02d}-model_00-model_states.pt")
    flags = {"load_format": "hf", "load_way": "DS"}
    engine = Engine.from_args(engine_args(tmp_path, **flags), warmup=0)
    embed = np.asarray(engine.runner.params["embed_tokens"])
    np.testing.assert_array_equal(embed, state["model.embed_tokens.weight"].numpy())
    with pytest.raises(Exception, match="safetensors|\\.bin|weights"):
        Engine.from_args(engine_args(tmp_path, **{**flags, "load_way": "HF"}), warmup=0)
