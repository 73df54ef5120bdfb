"""The OpenAI routes against the real server through the official `openai` client: chat and completions,
streamed and not, give /generate's greedy text; n, stop, logprobs, seed, logit_bias, usage, /v1/models and error
objects."""

import openai
import pytest
from e2e_server import chat_text

QUESTION = "Name three colours of the rainbow."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(lightllm_server):
    return openai.OpenAI(base_url=lightllm_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(lightllm_server, tokenizer):
    """/generate's greedy answer to the chat-templated question."""
    status, out = lightllm_server.post("/generate", {"inputs": chat_text(tokenizer, QUESTION), "parameters": {
        "max_new_tokens": MAX_TOKENS}})
    assert status == 200
    return out


def test_chat_gives_the_greedy_text(client, reference, tokenizer):
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=MAX_TOKENS)
    choice, = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == reference["generated_text"][0]
    assert choice.finish_reason == reference["finish_reason"] and reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion" and reply.model == "smollm2"
    prompt_tokens = len(tokenizer.encode(chat_text(tokenizer, QUESTION)))
    assert reply.usage.prompt_tokens == prompt_tokens == reference["prompt_tokens"]
    assert reply.usage.completion_tokens == reference["count_output_tokens"]
    assert reply.usage.total_tokens == prompt_tokens + reference["count_output_tokens"]


def test_chat_stream_gives_the_greedy_text(client, reference):
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["generated_text"][0]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reference["finish_reason"]]
    assert chunks[-1].usage.completion_tokens == reference["count_output_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_completions_give_the_greedy_text(client, reference, tokenizer):
    prompt = chat_text(tokenizer, QUESTION)
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == reference["generated_text"][0] and reply.id.startswith("cmpl-")
    assert reply.usage.prompt_tokens == reference["prompt_tokens"]
    streamed = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed[:-1]) == reference["generated_text"][0]
    assert all(c.usage is None for c in streamed[:-1])
    assert streamed[-1].choices == [] and streamed[-1].usage == reply.usage


def test_stop_string_is_dropped(client, reference):
    text = reference["generated_text"][0]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.index(stop)]
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS, stop=[stop])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_n_seed_and_logprobs(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    kwargs = dict(model="m", messages=messages, max_tokens=6, temperature=1.2, seed=1234, logprobs=True)
    first = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
    again = client.chat.completions.create(n=3, **kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert len({c.message.content for c in first.choices}) > 1  # seeds seed, seed+1, seed+2
    for choice in first.choices:
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
    completion = client.completions.create(model="m", prompt="Once upon a time", max_tokens=4, logprobs=0)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and lp.text_offset[0] == 0


def test_models(client, smollm2_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [smollm2_dir.name]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"presence_penalty": -0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 500}}, "logit_bias"),
    ({"logit_bias": {"one": 5}}, "logit_bias"),
    ({"logit_bias": {"49152": 5}}, "logit_bias"),  # outside SmolLM2's vocabulary
    ({"max_tokens": 500}, "messages"),
])
def test_bad_requests_raise_openai_errors(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], **kwargs)
    assert info.value.status_code == 400 and info.value.body["param"] == param and info.value.body["message"]


def test_logit_bias_gives_what_transformers_gives_with_that_sequence_bias(client, tokenizer, smollm2_transformers):
    import torch

    prompt = "The three primary colours are"
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        plain = smollm2_transformers.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        bias = {plain[0]: -100.0, plain[2]: 4.5}
        biased = smollm2_transformers.generate(ids, max_new_tokens=8, do_sample=False,
                                               sequence_bias=[[[t], b] for t, b in bias.items()])
    expected = tokenizer.decode(biased[0, ids.shape[1]:])
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0,
                                      logit_bias={str(t): b for t, b in bias.items()})
    assert reply.choices[0].text == expected != tokenizer.decode(plain)


def test_completions_echo_scores_the_prompt_as_transformers_does(client, tokenizer, smollm2_transformers):
    """echo with logprobs (how lm-evaluation-harness scores a text): the echoed prompt's tokens come with the
    logprob the model gives each after the tokens before it (none for the first) and each position's most likely
    tokens, as transformers' logits give them, then the generated tokens'."""
    import torch

    prompt = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        expected = torch.log_softmax(smollm2_transformers(torch.tensor([ids])).logits[0].float(), dim=-1)
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2)
    choice, n = reply.choices[0], len(ids)
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 2
    assert lp.tokens[:n] == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:n + 1] == [sum(map(len, lp.tokens[:j])) for j in range(n + 1)]
    assert lp.token_logprobs[1:n] == pytest.approx([expected[j - 1, ids[j]].item() for j in range(1, n)], abs=0.05)
    for j in range(1, n):
        best = torch.topk(expected[j - 1], 3)
        top = lp.top_logprobs[j]
        assert len(top) == 2 and list(top.values()) == pytest.approx(best.values[:2].tolist(), abs=0.05)
        if best.values[0] - best.values[1] > 0.1:  # no near tie: the same most likely token
            assert next(iter(top)) == tokenizer.decode([best.indices[0].item()])
    assert all(lp.token_logprobs[j] <= 0 and len(lp.top_logprobs[j]) == 2 for j in (n, n + 1))
