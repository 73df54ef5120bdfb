"""Shared by the engine tests: the tiny config, engine construction from flags, and a plain greedy loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.args import parse_args
from jaxllm.engine.engine import Engine
from jaxllm.models import init_kv_cache
from jaxllm.models.attention import AttentionMetadata

TINY_CONFIG = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}

# Small limits keep the bucket set (and so the compile time on CPU) small.
TEST_FLAGS = {
    "load_format": "dummy", "data_type": "float32", "max_total_token_num": 512, "max_req_input_len": 40,
    "max_req_total_len": 64, "running_max_req_size": 8, "batch_max_tokens": 64,
}


def engine_args(model_dir, **flags):
    merged = {**TEST_FLAGS, **flags}
    argv = ["--model_dir", str(model_dir)]
    for name, value in merged.items():
        if isinstance(value, bool):
            argv += [f"--{name}"] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return parse_args(argv)


def make_engine(model_dir, warmup=0, **flags) -> Engine:
    return Engine.from_args(engine_args(model_dir, **flags), warmup=warmup)


def random_prompts(seed: int, count: int, max_len: int = 30, vocab: int = 256):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=count)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in lengths]


class GreedyReference:
    """Step-by-step greedy decoding with the model alone: the whole sequence recomputed each step, in one
    fixed shape (a 64-token row; later positions never influence earlier ones)."""

    LENGTH = 64

    def __init__(self, model, params):
        self.model, self.params = model, params
        self.cache = init_kv_cache(model, self.LENGTH)

    @functools.partial(jax.jit, static_argnums=0)
    def _logits(self, tokens, count):  # tokens [LENGTH]; returns every position's logits [LENGTH, vocab]
        n = self.LENGTH
        meta = AttentionMetadata(
            positions=jnp.arange(n), token_req=jnp.zeros(n, jnp.int32), write_slots=jnp.arange(n),
            slot_table=jnp.arange(n)[None], context_lens=jnp.array([n]), query_start=jnp.array([0]),
            query_lens=jnp.array([n]), logits_index=(count - 1)[None], decode_only=False,
        )
        logits, _ = self.model.apply({"params": self.params}, tokens, meta, self.cache, all_logits=True)
        return logits

    def logits(self, seq: list[int]) -> np.ndarray:
        tokens = np.zeros(self.LENGTH, np.int32)
        tokens[: len(seq)] = seq
        return np.asarray(self._logits(jnp.asarray(tokens), jnp.int32(len(seq))))[: len(seq)]

    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
        seq = list(prompt)
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.logits(seq)[-1]))
            seq.append(token)
            if token in eos_ids:
                break
        return seq[len(prompt):]
