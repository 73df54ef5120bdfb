"""Reward models: a score head in place of the LM head, chosen by config.json's `architectures`. The scores
of several ragged sequences in one step equal transformers' `*ForSequenceClassification` (the head's output
at each sequence's last token, float32, ≤ 1e-4) at --tp 1 and 2; InternLM2's reward model (`v_head`) is
checked against a Llama classifier written into InternLM2's layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from tests.models.hf_oracle import random_hf_model, saved_random_hf_model
from tests.models.test_remote_code import LLAMA, internlm2, state

# name → (the transformers classifier's config fields, whether its checkpoint is rewritten as InternLM2's)
CASES = {
    "llama-1-label": (dict(LLAMA, model_type="llama", num_labels=1), False),
    "llama-3-labels": (dict(LLAMA, model_type="llama", num_labels=3), False),
    "mistral": (dict(LLAMA, model_type="mistral", num_labels=1, sliding_window=None), False),
    "qwen2": (dict(LLAMA, model_type="qwen2", num_labels=2), False),
    "internlm2-reward": (dict(LLAMA, model_type="llama", num_labels=1), True),
}
LENGTHS = (37, 23, 1)  # ragged sequences scored in one step


def save_internlm2_reward(hf_model, raw: dict, path) -> None:
    """`hf_model` (a one-label Llama classifier) as an InternLM2 reward checkpoint: InternLM2's tensor names,
    its `score` weight as `v_head`."""
    sd = state(hf_model)
    tensors, config = internlm2({**sd, "lm_head.weight": sd["score.weight"]}, raw)
    tensors["v_head.weight"] = tensors.pop("output.weight")
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config | dict(architectures=["InternLM2ForRewardModel"])))


@pytest.fixture(scope="module", params=sorted(CASES))
def reward_checkpoint(request, tmp_path_factory):
    """(checkpoint dir, the transformers classifier it holds, its labels)."""
    raw, as_internlm2 = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    auto = transformers.AutoModelForSequenceClassification
    if as_internlm2:
        model = random_hf_model(raw, auto)
        save_internlm2_reward(model, raw, path)
    else:
        model = saved_random_hf_model(raw, path, auto)
    return path, model, raw["num_labels"]


def oracle_score(hf_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)[None]).logits[0].numpy()  # [labels], pooled at the last token


def our_scores(model, params, sequences) -> np.ndarray:
    """The scores [sequences, labels] of `sequences` prefilled together in one step."""
    slots, start = [], 0
    for seq in sequences:
        slots.append(list(range(start, start + len(seq))))
        start += len(seq)
    width = 64
    meta = AttentionMetadata.for_sequences([(0, len(s)) for s in sequences], slots, scratch_slot=start, width=width)
    tokens = jnp.asarray(np.concatenate(sequences), jnp.int32)
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c))
    scores, _ = step(params, tokens, meta, init_kv_cache(model, start))
    return np.asarray(scores)


@pytest.mark.parametrize("tp", [1, 2])
def test_scores_equal_transformers(reward_checkpoint, tp):
    path, hf_model, labels = reward_checkpoint
    config = ModelConfig.from_model_dir(path)
    assert config.score_head is not None and config.score_head.labels == labels
    model = build_model(config, jnp.float32)
    params = load_hf(model, path, make_mesh(tp), tp)
    assert "lm_head" not in params and params["score"].shape == (config.hidden_size, labels)
    assert config.num_params == sum(p.size for p in jax.tree.leaves(params))
    rng = np.random.default_rng(tp)
    sequences = [rng.integers(0, config.vocab_size, size=n) for n in LENGTHS]
    scores = our_scores(model, params, sequences)
    assert scores.shape == (len(LENGTHS), labels)
    for seq, score in zip(sequences, scores):
        np.testing.assert_allclose(score, oracle_score(hf_model, seq), atol=1e-4, rtol=0)


def test_unserved_classifier_is_refused(tmp_path):
    raw = dict(LLAMA, model_type="llama", architectures=["LlamaForTokenClassification"])
    assert ModelConfig.from_hf_dict(raw).score_head is None  # not a sequence score: served as a causal LM
    raw["architectures"] = ["GemmaForSequenceClassification"]
    with pytest.raises(ValueError, match="not served as a reward model.*LlamaForSequenceClassification"):
        ModelConfig.from_hf_dict(raw)
