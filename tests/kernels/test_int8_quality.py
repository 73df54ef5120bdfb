"""What the int8 KV cache costs on SmolLM2-135M-Instruct (float32 weights, CPU, reference backends): the logits
predicting the float32 cache's greedy tokens with an int8 cache against a float32 cache, a bf16 cache shown for
scale (docs/perf.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.models.attention import AttentionMetadata, ReferenceAttention
from jaxllm.models.backends import ReferenceInt8Attention
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_params

NEW_TOKENS = 24
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
]


class Bf16Cache(ReferenceAttention):
    name = "reference_bf16_cache"

    def init_layer_cache(self, num_slots, kv_heads, head_dim, dtype):
        return super().init_layer_cache(num_slots, kv_heads, head_dim, jnp.bfloat16)


class Runner:
    """One model, any backend: greedy decoding and teacher-forced logits over fixed shapes."""

    def __init__(self, model_dir, prompts):
        self.config = ModelConfig.from_model_dir(model_dir)
        self.prompts = prompts
        self.capacity = [len(p) + NEW_TOKENS for p in prompts]
        starts = np.cumsum([0] + self.capacity[:-1])
        self.slot_rows = [list(range(s, s + c)) for s, c in zip(starts, self.capacity)]
        self.scratch = sum(self.capacity)
        self.width = -(-max(self.capacity) // 16) * 16
        self.params = None
        self.model_dir = model_dir

    def _model(self, backend):
        model = build_model(self.config, jnp.float32, backend=backend)
        if self.params is None:
            self.params = load_params(model, self.model_dir, make_mesh(1), 1)
        cache = tuple(
            backend.init_layer_cache(self.scratch, self.config.num_kv_heads, self.config.head_dim, jnp.float32)
            for _ in range(self.config.num_layers)
        )
        return model, cache

    def greedy(self, backend) -> np.ndarray:
        model, cache = self._model(backend)
        step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c))
        meta = AttentionMetadata.for_sequences([(0, len(p)) for p in self.prompts], self.slot_rows, self.scratch,
                                               self.width)
        logits, cache = step(self.params, jnp.asarray(np.concatenate(self.prompts), jnp.int32), meta, cache)
        out = [np.asarray(jnp.argmax(logits, -1))]
        for t in range(1, NEW_TOKENS):
            meta = AttentionMetadata.for_sequences([(len(p) + t - 1, 1) for p in self.prompts], self.slot_rows,
                                                   self.scratch, self.width)
            logits, cache = step(self.params, jnp.asarray(out[-1], jnp.int32), meta, cache)
            out.append(np.asarray(jnp.argmax(logits, -1)))
        return np.stack(out, axis=1)  # [rows, NEW_TOKENS]

    def forced_logits(self, backend, generated: np.ndarray) -> np.ndarray:
        """Logits predicting each generated token, from one packed prefill of prompt + generated tokens."""
        model, cache = self._model(backend)
        seqs = [list(p) + list(g[:-1]) for p, g in zip(self.prompts, generated)]
        meta = AttentionMetadata.for_sequences([(0, len(s)) for s in seqs], self.slot_rows, self.scratch, self.width)
        logits, _ = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))(
            self.params, jnp.asarray(np.concatenate(seqs), jnp.int32), meta, cache
        )
        logits = np.asarray(logits)
        ends = np.cumsum([len(s) for s in seqs])
        picks = [logits[end - NEW_TOKENS : end] for end in ends]  # positions predicting the generated tokens
        return np.stack(picks)  # [rows, NEW_TOKENS, vocab]


def quality(runner: Runner, backend, generated, base_logits) -> dict:
    """Teacher-forced logits against the float32 cache's."""
    logits = runner.forced_logits(backend, generated)
    return dict(
        max_logit_diff=float(np.max(np.abs(logits - base_logits))),
        mean_logit_diff=float(np.mean(np.abs(logits - base_logits))),
        forced_agreement=float(np.mean(np.argmax(logits, -1) == generated)),
    )


@pytest.fixture(scope="module")
def runner(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Runner(smollm2_dir, prompts)


def test_int8_cache_quality_on_smollm2(runner):
    generated = runner.greedy(ReferenceAttention())
    base = runner.forced_logits(ReferenceAttention(), generated)
    bf16 = quality(runner, Bf16Cache(), generated, base)
    int8 = quality(runner, ReferenceInt8Attention(), generated, base)
    print(f"\nbf16 cache vs float32 cache: {bf16}\nint8 cache vs float32 cache: {int8}")
    assert bf16["forced_agreement"] >= 0.95
    assert int8["forced_agreement"] >= 0.95
    assert int8["max_logit_diff"] < 2.0
