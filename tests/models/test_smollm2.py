"""The default model end to end: SmolLM2-135M-Instruct converted from its Q4_1 GGUF and run greedily by
jaxllm in float32 gives exactly the tokens transformers (PyTorch, CPU, float32) gives for the same GGUF."""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_params

NEW_TOKENS = 24  # each token costs both sides a decode step; 24 still covers every answer's first clause
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def chat_prompts(smollm2_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses the GGUF twice (config, then weights; 6.5 s each for SmolLM2's 49k-token vocabulary) and
    rebuilds gguf's tensor-name table once per submodule (397 times, 10 s): within this block each file is parsed
    once and each table built once. The same read-only objects, so the same weights and config."""
    import gguf

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield


def transformers_greedy(prompts: list[list[int]]) -> list[list[int]]:
    """PyTorch reference straight from the GGUF (transformers dequantises it itself), one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from tools.convert.default_model import default_gguf

    gguf = default_gguf()
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


def jaxllm_greedy(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    """All prompts in one packed prefill, then one decode step per token for all rows; fixed shapes,
    so prefill and decode compile once each. Returns NEW_TOKENS tokens per prompt (no early stop)."""
    config = ModelConfig.from_model_dir(model_dir)
    model = build_model(config, jnp.float32)
    params = load_params(model, model_dir, make_mesh(1), 1)
    rows = len(prompts)
    capacity = [len(ids) + NEW_TOKENS for ids in prompts]
    width = -(-max(capacity) // 16) * 16  # slot-table width: constant for every step
    starts = np.cumsum([0] + capacity[:-1])
    slot_rows = [list(range(s, s + c)) for s, c in zip(starts, capacity)]
    scratch = sum(capacity)
    cache = init_kv_cache(model, scratch)

    @jax.jit
    def step(params, tokens, meta, cache):
        logits, cache = model.apply({"params": params}, tokens, meta, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    meta = AttentionMetadata.for_sequences([(0, len(ids)) for ids in prompts], slot_rows, scratch, width)
    next_tokens, cache = step(params, jnp.asarray(np.concatenate(prompts), jnp.int32), meta, cache)
    generated = [np.asarray(next_tokens)]
    for t in range(1, NEW_TOKENS):
        meta = AttentionMetadata.for_sequences([(len(ids) + t - 1, 1) for ids in prompts], slot_rows, scratch, width)
        next_tokens, cache = step(params, next_tokens, meta, cache)
        generated.append(np.asarray(next_tokens))
    assert step._cache_size() == 2  # one prefill shape, one decode shape
    tokens = np.stack(generated, axis=1)  # [rows, NEW_TOKENS]
    return [tokens[r].tolist() for r in range(rows)]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def test_converted_files(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500e6  # 135M float32 weights


def test_greedy_tokens_match_transformers(smollm2_dir, chat_prompts):
    ours = jaxllm_greedy(smollm2_dir, chat_prompts)
    reference = transformers_greedy(chat_prompts)
    eos = set(ModelConfig.from_model_dir(smollm2_dir).eos_token_ids)
    for prompt, mine, theirs in zip(PROMPTS, ours, reference):
        assert len(theirs) >= 8, prompt  # a real answer, not an immediate stop
        assert _until_eos(mine, eos) == theirs, prompt
