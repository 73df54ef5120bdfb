"""The OpenAI-compatible routes over a ScriptedEngine: request mapping (chat template, do_sample default,
max_tokens, n/best_of, seed), answers and chunks, stop strings left out, logprobs, usage, error objects."""

import json

import pytest
from app_client import post_json as post
from app_client import run


def chunks(raw: bytes) -> list:
    parts = [p for p in raw.decode().split("\n\n") if p]
    assert all(p.startswith("data: ") for p in parts)
    assert parts[-1] == "data: [DONE]"
    return [json.loads(p[len("data: "):]) for p in parts[:-1]]


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_uses_the_tokenizer_template_and_greedy_by_default(make_client, tokenizer):
    client, state = make_client()
    status, out = run(post(client, "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 5}))
    assert status == 200
    (_, ids, params), = state.engine.submitted
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert params.greedy and params.max_new_tokens == 5
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == "m"
    choice, = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": tokenizer.decode(state.engine.script[:5])}
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}


def test_a_positive_temperature_samples_and_seed_passes(make_client):
    client, state = make_client()
    body = {"model": "m", "messages": MESSAGES, "temperature": 0.7, "top_p": 0.9, "seed": 3, "max_tokens": 2}
    run(post(client, "/v1/chat/completions", body))
    params = state.engine.submitted[0][2]
    assert params.do_sample and params.temperature == 0.7 and params.top_p == 0.9 and params.seed == 3
    run(post(client, "/v1/chat/completions", {**body, "temperature": 0}))
    assert state.engine.submitted[1][2].greedy


def test_chat_n_and_usage_summed(make_client):
    client, state = make_client()
    body = {"model": "m", "messages": MESSAGES, "n": 3, "temperature": 1.0, "max_tokens": 2}
    status, out = run(post(client, "/v1/chat/completions", body))
    assert status == 200 and len(state.engine.submitted) == 3
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == 6


def test_stop_string_is_left_out(make_client):
    client, _ = make_client()
    body = {"model": "m", "messages": MESSAGES, "stop": ["capital"], "max_tokens": 30}
    status, out = run(post(client, "/v1/chat/completions", body))
    assert out["choices"][0]["message"]["content"] == "Paris is the "
    assert out["choices"][0]["finish_reason"] == "stop"
    status, raw = run(post(client, "/v1/chat/completions", {**body, "stream": True}, raw=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks(raw))
    assert text == "Paris is the "


def test_chat_stream_chunks(make_client, tokenizer):
    client, state = make_client()
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 3, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    status, raw = run(post(client, "/v1/chat/completions", body, raw=True))
    out = chunks(raw)
    assert status == 200
    assert len({c["id"] for c in out}) == 1 and all(c["object"] == "chat.completion.chunk" for c in out)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = out[1:4]
    assert "".join(c["choices"][0]["delta"]["content"] for c in pieces) == tokenizer.decode(state.engine.script[:3])
    assert all(len(c["choices"][0]["logprobs"]["content"]) == 1 for c in pieces)
    assert out[4]["choices"][0]["finish_reason"] == "length" and out[4]["choices"][0]["delta"] == {}
    assert out[5]["choices"] == [] and out[5]["usage"]["completion_tokens"] == 3


def test_stream_usage_counts_every_prompt_and_choice_as_the_whole_answer_does(make_client, tokenizer):
    client, state = make_client()
    body = {"model": "m", "prompt": ["Hello", "Good day"], "n": 2, "max_tokens": 3, "temperature": 1.0}
    status, whole = run(post(client, "/v1/completions", body))
    assert status == 200
    prompt_tokens = len(tokenizer.encode("Hello")) + len(tokenizer.encode("Good day"))
    assert whole["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                              "total_tokens": prompt_tokens + 12}
    status, raw = run(post(client, "/v1/completions",
                           {**body, "stream": True, "stream_options": {"include_usage": True}}, raw=True))
    *pieces, last = chunks(raw)
    assert status == 200 and len(pieces) == 4 * 4  # 3 tokens and a finish_reason for each of 4 choices
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in pieces)
    assert last["choices"] == [] and last["usage"] == whole["usage"] and last["id"] == pieces[0]["id"]


def test_streams_carry_no_usage_unless_asked(make_client):
    client, _ = make_client()
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 2, "stream": True}
    for options in ({}, {"stream_options": None}, {"stream_options": {"include_usage": False}}):
        status, raw = run(post(client, "/v1/chat/completions", {**body, **options}, raw=True))
        out = chunks(raw)
        assert status == 200 and all(c["choices"] and "usage" not in c for c in out)


def test_chat_logprobs(make_client, tokenizer):
    client, state = make_client()
    status, out = run(post(client, "/v1/chat/completions",
                           {"model": "m", "messages": MESSAGES, "max_tokens": 2, "logprobs": True}))
    content = out["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in state.engine.script[:2]]
    assert [c["logprob"] for c in content] == [-0.25, -0.5]
    assert content[0]["bytes"] == list(content[0]["token"].encode())


def test_completions_with_several_prompts_echo_and_logprobs(make_client, tokenizer):
    client, state = make_client()
    body = {"model": "m", "prompt": ["Hello", tokenizer.encode("Good day")], "max_tokens": 2, "echo": True,
            "logprobs": 0}
    status, out = run(post(client, "/v1/completions", body))
    assert status == 200 and out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    generated = tokenizer.decode(state.engine.script[:2])
    assert [c["text"] for c in out["choices"]] == ["Hello" + generated, "Good day" + generated]
    # echoed prompts' tokens first, with their logprobs (the scripted engine gives -1.5 after the first token)
    for choice, prompt in zip(out["choices"], ["Hello", "Good day"]):
        lp, ids = choice["logprobs"], tokenizer.encode(prompt)
        assert lp["tokens"][:len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert lp["token_logprobs"] == [None] + [-1.5] * (len(ids) - 1) + [-0.25, -0.5]
        assert lp["top_logprobs"][0] is None and lp["text_offset"][len(ids)] == len(prompt)
    assert [params.prompt_logprobs for _, _, params in state.engine.submitted] == [True, True]
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode("Hello")) + len(tokenizer.encode("Good day"))


def test_completions_best_of_returns_the_best_n(make_client):
    client, state = make_client()
    body = {"model": "m", "prompt": "Hi", "max_tokens": 2, "n": 1, "best_of": 3, "temperature": 1, "seed": 5}
    status, out = run(post(client, "/v1/completions", body))
    assert status == 200 and len(state.engine.submitted) == 3 and len(out["choices"]) == 1


def test_completions_stream(make_client, tokenizer):
    client, state = make_client()
    status, raw = run(post(client, "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 3,
                                                        "stream": True}, raw=True))
    out = chunks(raw)
    assert "".join(c["choices"][0]["text"] for c in out) == tokenizer.decode(state.engine.script[:3])
    assert out[-1]["choices"][0]["finish_reason"] == "length"


def test_models(make_client, smollm2_dir):
    client, _ = make_client()

    async def go():
        r = await client.get("/v1/models")
        return r.status_code, await r.get_json()

    status, out = run(go())
    assert status == 200 and out["object"] == "list" and out["data"][0]["id"] == smollm2_dir.name


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": MESSAGES}, "model"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "logit_bias": {"1": -101}}, "logit_bias"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "n": 9}, "n"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "presence_penalty": -1}, "presence_penalty"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 200}, "messages"),
    ("/v1/completions", {"model": "m", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": [[1, 2], [10**9]]}, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "n": 2, "use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "best_of": 2, "n": 3}, "best_of"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "n": 9}, "n"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "n": 2, "best_of": 9}, "best_of"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True,
                              "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_errors_are_openai_error_objects(make_client, path, body, param):
    client, state = make_client()
    status, out = run(post(client, path, body))
    assert status in (400, 422) and set(out) == {"error"}
    assert out["error"]["param"] == param and out["error"]["message"]
    assert state.engine.submitted == []


def test_malformed_json_on_v1_is_an_openai_error(make_client):
    client, _ = make_client()

    async def go():
        r = await client.post("/v1/completions", data=b"{", headers={"Content-Type": "application/json"})
        return r.status_code, await r.get_json()

    status, out = run(go())
    assert status == 400 and "malformed JSON" in out["error"]["message"]
