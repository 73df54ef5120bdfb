"""A reward model through the engine (random weights, three labels): prompts scored in batches and split into
prefill chunks (splitfuse) give the model's own scores of each whole prompt, trailing padding is not run, the
KV is freed; the engine refuses to generate on a reward model."""

import json

import numpy as np
import pytest

from jaxllm import LLM
from jaxllm.engine.request import SamplingParams
from tests.engine.engine_helpers import TEST_FLAGS, TINY_CONFIG, random_prompts
from tests.models.test_reward import our_scores

PAD = 7


@pytest.fixture(scope="module")
def reward_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward3")
    raw = dict(TINY_CONFIG, architectures=["LlamaForSequenceClassification"], num_labels=3, pad_token_id=PAD)
    (path / "config.json").write_text(json.dumps(raw))
    with LLM(str(path), warmup=0, use_reward_model=True, splitfuse_mode=True, splitfuse_block_size=16,
             **{**TEST_FLAGS, "disable_log_stats": True}) as llm:
        yield llm


def test_batched_chunked_scores_equal_the_model(reward_llm):
    prompts = [[t if t != PAD else PAD + 1 for t in p] for p in random_prompts(5, 9, max_len=38)]
    padded = prompts[0] + [PAD, PAD]  # scored at its last token that is not padding, as transformers pools
    scores = np.array(reward_llm.score(prompts + [padded], use_tqdm=False))
    runner = reward_llm.engine.runner
    expected = our_scores(runner.model, runner.params, [np.array(p) for p in prompts])  # one step, all prompts
    assert scores.shape == (len(prompts) + 1, 3)
    np.testing.assert_allclose(scores[:-1], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores[-1], scores[0], atol=1e-6, rtol=0)
    assert reward_llm.engine.wait_idle(10) and reward_llm.engine.stats()["kv_used"] == 0


def test_a_reward_engine_does_not_generate(reward_llm):
    with pytest.raises(ValueError, match="reward model"):
        reward_llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2), use_tqdm=False)
