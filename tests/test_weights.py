"""Weight loading beyond single-file safetensors: torch .bin files (read without torch) and DeepSpeed layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import make_mesh
from jaxllm.torch_pickle import load_torch_file
from jaxllm.weights import load_params

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def test_torch_file_reader_matches_torch_load(tmp_path):
    torch.manual_seed(0)
    state = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(4, 2).to(torch.bfloat16),
        "f16_view": torch.randn(6, 6).half()[1:4, ::2],  # a strided view: offset and strides matter
        "i64": torch.arange(7),
    }
    torch.save(state, tmp_path / "w.bin")
    loaded = load_torch_file(tmp_path / "w.bin")
    for name, tensor in state.items():
        np.testing.assert_array_equal(loaded[name].astype(np.float64), tensor.to(torch.float64).numpy())


def test_torch_file_reader_refuses_arbitrary_objects(tmp_path):
    torch.save({"w": torch.ones(2), "evil": print}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="not allowed"):
        load_torch_file(tmp_path / "evil.bin")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def logits_of(model_dir, load_way, tokens):
    config = ModelConfig.from_model_dir(model_dir)
    model = build_model(config, jnp.float32)
    params = load_params(model, model_dir, make_mesh(1), 1, load_way=load_way)
    cache = init_kv_cache(model, 16)
    meta = AttentionMetadata.for_sequences([(0, len(tokens))], [list(range(len(tokens)))], 16, 16)
    logits, _ = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))(
        params, jnp.asarray(tokens, jnp.int32), meta, cache)
    return np.asarray(logits)


def expected_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)[None]).logits[0].numpy()


def test_pytorch_bin_checkpoint_loads(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 writes only safetensors
    tokens = [5, 17, 3, 99, 42, 7]
    np.testing.assert_allclose(logits_of(tmp_path, "HF", tokens), expected_logits(hf_model, tokens), atol=1e-4)


def test_deepspeed_pipeline_layout_loads(tmp_path, hf_model):
    """Write LightLLM's DS layout with two model-parallel shards per layer; loading must reassemble it."""
    hf_model.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    layers = TINY["num_hidden_layers"]
    torch.save({"weight": state["model.embed_tokens.weight"]}, tmp_path / "layer_01-model_00-model_states.pt")
    for i in range(layers):
        prefix = f"model.layers.{i}."
        block = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        shards = [{}, {}]
        for key, value in block.items():
            if any(p in key for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                halves = value.chunk(2, dim=0)
            elif any(p in key for p in ("o_proj", "down_proj")):
                halves = value.chunk(2, dim=1)
            else:
                halves = (value, value)
            for shard, half in zip(shards, halves):
                shard[key] = half.contiguous()
        for rank, shard in enumerate(shards):
            torch.save(shard, tmp_path / f"layer_{i + 3:02d}-model_{rank:02d}-model_states.pt")
    torch.save({"weight": state["model.norm.weight"]}, tmp_path / f"layer_{layers + 4:02d}-model_00-model_states.pt")
    torch.save({"weight": state["lm_head.weight"]}, tmp_path / f"layer_{layers + 5:02d}-model_00-model_states.pt")
    tokens = [9, 1, 64, 33, 120]
    np.testing.assert_allclose(logits_of(tmp_path, "DS", tokens), expected_logits(hf_model, tokens), atol=1e-4)
