"""Sequence groups against the real server: the `openai` client's n, logprobs and top_logprobs (also streamed,
n=2), completions' logprobs k / best_of / echo; and --beam_mode, whose first result equals transformers' beam
search (SmolLM2, float32) for widths 2 and 4, through /generate and vLLM's `use_beam_search`."""

import math

import numpy as np
import openai
import pytest
from e2e_server import API_KEYS

QUESTION = "Name three colours of the rainbow."
BEAM_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
BEAM_TOKENS = 16


@pytest.fixture(scope="module")
def client(lightllm_server):
    return openai.OpenAI(base_url=lightllm_server.base + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_chat_n3_with_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, n=3, temperature=1.0, seed=11,
        logprobs=True, top_logprobs=5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        for t in content:
            top = [alt.logprob for alt in t.top_logprobs]
            assert len(top) == 5 and top == sorted(top, reverse=True) and t.logprob <= top[0] + 1e-6
            assert sum(math.exp(lp) for lp in top) <= 1 + 1e-4
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def test_chat_streamed_n2_tags_each_chunk_with_its_choice(client):
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=5, n=2, temperature=1.0, seed=3,
        stream=True, logprobs=True, top_logprobs=2)
    texts, finished = {0: "", 1: ""}, {}
    for chunk in stream:
        choice, = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.logprobs is not None:
            assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1} and all(texts.values())
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=5, n=2, temperature=1.0, seed=3)
    assert [c.message.content for c in again.choices] == [texts[0], texts[1]]


def test_completions_logprobs_k_best_of_and_echo(client, tokenizer):
    reply = client.completions.create(model="m", prompt="The sky is", max_tokens=4, n=2, best_of=3,
                                      temperature=1.0, seed=5, logprobs=3, echo=True)
    assert len(reply.choices) == 2
    n = len(tokenizer.encode("The sky is"))  # echoed: the prompt's tokens first (the first with no logprob)
    for choice in reply.choices:
        assert choice.text.startswith("The sky is")
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 4
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(len(top) == 3 for top in lp.top_logprobs[1:n])
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[n:])
    assert reply.choices[0].logprobs.token_logprobs[:n] == reply.choices[1].logprobs.token_logprobs[:n]  # one prompt
    means = [np.mean(c.logprobs.token_logprobs[n:]) for c in reply.choices]
    assert means[0] >= means[1]  # the best n of best_of, by the completion's mean logprob


# --- beam search ---------------------------------------------------------------------------------------
class BeamServer:
    """The shared keyed server (test_e2e_auth's, also started with --beam_mode), every request with its key."""

    def __init__(self, server):
        self.server = server
        self.auth = {"Authorization": f"Bearer {API_KEYS[0]}"}

    def post(self, path: str, body, **kw):
        return self.server.post(path, body, headers=self.auth, **kw)


@pytest.fixture(scope="module")
def beam_server(keyed_beam_server):
    return BeamServer(keyed_beam_server)


def hf_beams(model, tokenizer, prompt: str, width: int) -> list[list[int]]:
    import torch

    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, num_beams=width, num_return_sequences=width, do_sample=False, length_penalty=1.0,
                             early_stopping=True, max_new_tokens=BEAM_TOKENS, eos_token_id=2, pad_token_id=2)
    return [[t for t in row[ids.shape[1]:].tolist()] for row in out]


# Width 4 on every prompt; width 2 (the same code with fewer beams) on one, for the suite's time.
@pytest.mark.parametrize("width,prompts", [(2, BEAM_PROMPTS[:1]), (4, BEAM_PROMPTS)])
def test_beam_search_first_result_equals_transformers(beam_server, smollm2_transformers, tokenizer, width, prompts):
    for prompt in prompts:
        status, out = beam_server.post("/generate", {"inputs": prompt, "parameters": {
            "best_of": width, "max_new_tokens": BEAM_TOKENS, "return_details": True}}, timeout=600)
        assert status == 200, out
        ours = [[t["id"] for t in seq] for seq in out["tokens"]]
        expected = hf_beams(smollm2_transformers, tokenizer, prompt, width)
        first = expected[0]
        if first and first[-1] == 2:  # transformers pads after eos; our sequences end at it
            first = first[: first.index(2) + 1]
        assert ours[0] == first, prompt
        scores = [seq[-1]["cumlogprob"] / len(seq) for seq in out["tokens"]]
        assert scores == sorted(scores, reverse=True)  # best first
        assert len(out["generated_text"]) == width


def test_use_beam_search_and_beam_mode_refusals(beam_server, tokenizer):
    prompt = BEAM_PROMPTS[0]
    status, out = beam_server.post("/v1/completions", {"model": "m", "prompt": prompt, "n": 2, "max_tokens": 8,
                                                       "use_beam_search": True}, timeout=600)
    assert status == 200, out
    status, reference = beam_server.post("/generate", {"inputs": prompt, "parameters": {"best_of": 2,
                                                                                          "max_new_tokens": 8}},
                                         timeout=600)
    assert [c["text"] for c in out["choices"]] == reference["generated_text"]
    status, out = beam_server.post("/v1/completions", {"model": "m", "prompt": prompt, "n": 2, "stream": True})
    assert status == 400 and out["error"]["param"] == "stream"
    status, out = beam_server.post("/generate", {"inputs": prompt, "parameters": {"best_of": 2,
                                                                                 "stop_sequences": ["."]}})
    assert status == 400 and "beam_mode" in out["message"]
    status, out = beam_server.post("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 3}}, timeout=600)
    assert status == 200 and len(out["generated_text"]) == 1  # best_of 1: an ordinary greedy request
