"""A reward model end to end: the real server (--use_reward_model, the prompt cache on) over a tiny random
Llama classifier written by the test with SmolLM2's tokenizer. /get_score equals transformers' score of the same
text, concurrent requests batch, repeated chats (served from the prompt cache) score the same, and the
generation routes, bad chats and a mismatched flag are refused."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from e2e_server import running_server

from jaxllm import serve
from tests.models.hf_oracle import saved_random_hf_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHATS = [
    "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes, on a clear day.<|im_end|>",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "def add(a, b):\n    return a + b\n",
    "Bonjour, comment allez-vous ? Très bien, merci.",
]


@pytest.fixture(scope="module")
def reward_dir(smollm2_dir, tmp_path_factory):
    """(dir, the transformers classifier saved there): one label, SmolLM2's vocabulary and tokenizer."""
    path = tmp_path_factory.mktemp("reward_model")
    raw = dict(model_type="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
               num_labels=1, pad_token_id=2)
    model = saved_random_hf_model(raw, path, transformers.AutoModelForSequenceClassification)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, path / name)
    return path, model


@pytest.fixture(scope="module")
def server(reward_dir, tmp_path_factory):
    yield from running_server(reward_dir[0], ["--use_reward_model", "--use_dynamic_prompt_cache"],
                              tmp_path_factory.mktemp("reward") / "server.log")


@pytest.fixture(scope="module")
def oracle(reward_dir):
    """chat → (transformers' score of its tokens, their count)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(reward_dir[0]), local_files_only=True)

    def score(chat: str) -> tuple[float, int]:
        ids = tokenizer.encode(chat)
        with torch.no_grad():
            return float(reward_dir[1](torch.tensor([ids])).logits[0, 0]), len(ids)

    return score


def test_concurrent_scores_equal_transformers(server, oracle):
    with ThreadPoolExecutor(len(CHATS)) as pool:
        replies = list(pool.map(lambda chat: server.post("/get_score", {"chat": chat, "parameters": {}}), CHATS))
    for chat, (status, body) in zip(CHATS, replies):
        expected, count = oracle(chat)
        assert status == 200, body
        assert set(body) == {"score", "prompt_tokens", "finish_reason"} and body["finish_reason"] == "stop"
        assert body["prompt_tokens"] == count
        assert body["score"] == pytest.approx(expected, abs=1e-4)
    # Again: the prompts now come from the prompt cache (all but the last token), the scores do not change.
    for chat, (_, first) in zip(CHATS[:2], replies):
        status, again = server.post("/get_score", {"chat": chat})
        assert status == 200 and again["score"] == pytest.approx(first["score"], abs=1e-5)


def test_generation_routes_are_refused(server):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    for path, payload in [("/generate", body), ("/generate_stream", body), ("/", body),
                          ("/v1/completions", {"model": "m", "prompt": "hi"}),
                          ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})]:
        status, raw, _ = server.request("POST", path, payload)
        assert status == 400 and "reward model" in raw.decode(), (path, raw)
    assert server.get("/health")[0] == 200  # scored through the engine


@pytest.mark.parametrize("body, status, reason", [
    ({}, 400, "chat"), ({"chat": ""}, 400, "chat"), ({"chat": 3}, 400, "chat"),
    ({"chat": "word " * 200}, 400, "--max_req_input_len"), (["chat"], 422, "body"),
])
def test_bad_chats_are_refused(server, body, status, reason):
    answer, reply = server.post("/get_score", body)
    assert answer == status and reason in reply["message"]
    assert server.post("/get_score", {"chat": "still up"})[0] == 200


def test_the_flag_and_the_checkpoint_must_agree(reward_dir, smollm2_dir, capsys):
    assert serve.main(["--model_dir", str(reward_dir[0]), "--load_format", "dummy"]) == 2
    assert "is a reward model" in capsys.readouterr().err
    assert serve.main(["--model_dir", str(smollm2_dir), "--use_reward_model", "--load_format", "dummy"]) == 2
    assert "is not a reward model" in capsys.readouterr().err
    assert json.loads((reward_dir[0] / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
