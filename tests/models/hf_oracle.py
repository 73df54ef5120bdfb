"""The oracle checks every family's tests share: a random transformers model of a tiny config, our logits
against its logits (float32, ≤ 1e-4) at a --tp, and 32 greedy tokens through the engine against its
`generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxllm.config import ModelConfig
from jaxllm.engine.request import SamplingParams
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from tests.engine.engine_helpers import make_engine


def random_hf_model(raw: dict, auto_class=transformers.AutoModelForCausalLM) -> torch.nn.Module:
    """A transformers model of `raw` with every weight random, norm weights and biases included, large
    enough (std 0.15) that attention scores are far from uniform, so windows, soft-caps and ALiBi matter.
    `auto_class`: which head (a causal LM, or e.g. AutoModelForSequenceClassification)."""
    config = transformers.AutoConfig.for_model(**raw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = auto_class.from_config(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0, 0.15)
    return model


def saved_random_hf_model(raw: dict, path, auto_class=transformers.AutoModelForCausalLM) -> torch.nn.Module:
    """`random_hf_model(raw, auto_class)`, also saved to `path` as a Hugging Face checkpoint (safetensors)."""
    model = random_hf_model(raw, auto_class)
    model.save_pretrained(path, safe_serialization=True)
    return model


def family_fixture(families: dict):
    """A module-scoped fixture over `families` (name → config.json dict): (name, checkpoint dir, the
    transformers model saved there)."""

    @pytest.fixture(scope="module", params=sorted(families))
    def family(request, tmp_path_factory):
        path = tmp_path_factory.mktemp(request.param)
        return request.param, path, saved_random_hf_model(families[request.param], path)

    return family


def prefill_meta(length: int, width: int) -> AttentionMetadata:
    return AttentionMetadata.for_sequences([(0, length)], [list(range(length))], scratch_slot=width, width=width)


def assert_logits_match(path, hf_model, tp: int) -> ModelConfig:
    """Our model loaded from `path` at `tp` gives transformers' logits on 37 random tokens (and declares
    `config.num_params` weights)."""
    config = ModelConfig.from_model_dir(path)
    model = build_model(config, jnp.float32)
    params = load_hf(model, path, make_mesh(tp), tp)
    assert config.num_params == sum(p.size for p in jax.tree.leaves(params))  # the benchmarks' roofline count
    tokens = np.random.default_rng(tp).integers(0, config.vocab_size, size=37)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)[None]).logits[0].numpy()
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))
    logits, _ = step(params, jnp.asarray(tokens, jnp.int32), prefill_meta(len(tokens), 64), init_kv_cache(model, 64))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    return config


def assert_engine_greedy_matches(path, hf_model) -> None:
    """32 greedy tokens through the engine (prefill, then decode steps over the paged cache) are
    transformers' greedy `generate`."""
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 256, size=21)]
    with make_engine(path, load_format="auto", warmup=0, max_req_total_len=64) as engine:
        (stream,) = engine.submit_many([(prompt, SamplingParams(max_new_tokens=32, ignore_eos=True), None)])
        tokens = [e.token_id for e in stream]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    assert tokens == out[0, len(prompt):].tolist()
