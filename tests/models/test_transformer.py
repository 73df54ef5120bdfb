"""The decoder's layers of one kind share one trace and one lowering (a nested jit per kind of layer), and a
layer's kind holds everything that sets its program apart."""

import jax

from jaxllm.bench.hlo import bench_runner, step_shape
from jaxllm.config import ModelConfig
from jaxllm.engine.step_inputs import pack
from jaxllm.models.quant import WeightQuant
from jaxllm.models.transformer import first_layer_of_each_kind

# Odd sizes of this test's own, so that no other test's traces are in jit's cache when it lowers.
TINY = {"model_type": "qwen2", "vocab_size": 288, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "use_sliding_window": False}


def _lowered_step(config: ModelConfig) -> str:
    runner = bench_runner(config, 1, 2, "float32", [], abstract=True)
    shape = step_shape(runner, 2)
    words, layout = pack(runner.inputs.padding(shape))
    words = jax.ShapeDtypeStruct(words.shape, words.dtype, sharding=runner._replicated)  # noqa: SLF001
    return runner._jitted.lower(runner.params, runner.kv, runner._last_tokens, words,  # noqa: SLF001
                                runner.image_slab, layout=layout, **shape.static_args()).as_text()  # noqa: SLF001


def test_layers_of_one_kind_are_lowered_once():
    text = _lowered_step(ModelConfig.from_hf_dict(TINY))
    assert text.count("func.func private @apply_layer_traced_once") == 1
    assert text.count("call @apply_layer_traced_once") == 4


def test_each_kind_of_layer_is_lowered_once():
    """Sliding-window and full-attention layers in turn: two kinds, two lowerings, four calls."""
    raw = {**TINY, "hidden_size": 40, "head_dim": 10, "sliding_window": 64,
           "use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"] * 2}
    config = ModelConfig.from_hf_dict(raw)
    assert first_layer_of_each_kind(config) == [0, 1, 0, 1]
    text = _lowered_step(config)
    assert text.count("func.func private @apply_layer_traced_once") == 2
    assert text.count("call @apply_layer_traced_once") == 4


def test_a_layer_whose_down_projection_stays_16bit_is_a_kind_of_its_own():
    """ppl_w8a8_mixdown with config.json's `mixdown: [2]`: layer 2's down-projection is not quantised."""
    config = ModelConfig.from_hf_dict({**TINY, "num_hidden_layers": 5})
    config = config.__class__(**{**config.__dict__, "weight_quant": WeightQuant.from_mode("ppl_w8a8_mixdown", 5, [2])})
    assert first_layer_of_each_kind(config) == [0, 0, 2, 0, 0]
