"""The TGI wire format (--use_tgi_api) over a ScriptedEngine: TGI's parameter names and nulls, the JSON list
answer with TGI's details, stream events, truncate/seed/return_full_text/decoder_input_details, errors."""

import json

import pytest
from app_client import post_json as post
from app_client import run


# What Hugging Face's text-generation client sends: every parameter, unset ones as null.
CLIENT_PARAMETERS = {
    "best_of": None, "details": True, "decoder_input_details": False, "do_sample": False, "max_new_tokens": 4,
    "repetition_penalty": None, "frequency_penalty": None, "return_full_text": False, "seed": None, "stop": [],
    "temperature": None, "top_k": None, "top_p": None, "truncate": None, "typical_p": None, "watermark": False,
    "top_n_tokens": None, "grammar": None,
}


def test_generate_answers_a_list_with_tgi_details(make_client, tokenizer):
    client, state = make_client("--use_tgi_api")
    status, body = run(post(client, "/", {"inputs": "Hello", "parameters": CLIENT_PARAMETERS, "stream": False}))
    assert status == 200 and isinstance(body, list) and len(body) == 1
    item = body[0]
    assert item["generated_text"] == tokenizer.decode(state.engine.script[:4])
    assert item["count_output_tokens"] == 4 and item["finish_reason"] == "length"
    details = item["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 4
    assert details["seed"] is None and details["prefill"] == []
    assert [set(t) for t in details["tokens"]] == [{"id", "text", "logprob", "special", "count_output_tokens"}] * 4


def test_finish_reasons_in_tgi_terms(make_client):
    client, _ = make_client("--use_tgi_api")
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 40, "stop": ["capital"], "details": True}}
    status, out = run(post(client, "/generate", body))
    assert status == 200 and out[0]["finish_reason"] == "stop"
    assert out[0]["details"]["finish_reason"] == "stop_sequence" and out[0]["generated_text"].endswith("capital")


def test_eos_is_eos_token(make_client, tokenizer):
    client, state = make_client("--use_tgi_api")
    state.engine.script = tokenizer.encode("Yes.") + [2]  # 2: SmolLM2's <|im_end|>, the default --eos_id
    status, out = run(post(client, "/generate", {"inputs": "Hi", "parameters": {"details": True, "max_new_tokens": 9}}))
    assert out[0]["details"]["finish_reason"] == "eos_token" and out[0]["generated_text"] == "Yes."


def test_seed_truncate_full_text_and_prefill(make_client, tokenizer):
    client, state = make_client("--use_tgi_api")
    parameters = {**CLIENT_PARAMETERS, "seed": 7, "do_sample": True, "truncate": 3, "return_full_text": True,
                  "decoder_input_details": True, "max_new_tokens": 2}
    prompt = "one two three four five"
    status, out = run(post(client, "/generate", {"inputs": prompt, "parameters": parameters}))
    assert status == 200
    (_, ids, params), = state.engine.submitted
    assert ids == tokenizer.encode(prompt)[-3:] and params.seed == 7 and params.prompt_logprobs
    item = out[0]
    assert item["generated_text"].startswith(prompt)
    assert item["details"]["seed"] == 7
    prefill = item["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids
    assert prefill[0]["logprob"] is None and [t["logprob"] for t in prefill[1:]] == [-1.5, -1.5]


def test_sampling_without_a_seed_reports_the_one_chosen(make_client):
    client, state = make_client("--use_tgi_api")
    status, out = run(post(client, "/generate", {"inputs": "Hi", "parameters": {"do_sample": True, "details": True,
                                                                                "max_new_tokens": 2}}))
    assert out[0]["details"]["seed"] == state.engine.submitted[0][2].seed is not None


def test_best_of_puts_the_most_likely_first(make_client):
    client, state = make_client("--use_tgi_api")
    parameters = {"best_of": 3, "do_sample": True, "seed": 10, "details": True, "max_new_tokens": 2}
    status, out = run(post(client, "/generate", {"inputs": "Hi", "parameters": parameters}))
    # the scripted logprobs fall with the seed: seed 10 is the most likely
    assert [o["details"]["seed"] for o in out] == [10, 11, 12]
    others = out[0]["details"]["best_of_sequences"]
    assert [o["seed"] for o in others] == [11, 12] and all("generated_text" in o for o in others)


def test_stream_events(make_client, tokenizer):
    client, state = make_client("--use_tgi_api")
    body = {"inputs": "Hi", "parameters": {**CLIENT_PARAMETERS, "return_full_text": True}, "stream": True}
    status, raw = run(post(client, "/", body, raw=True))
    events = [json.loads(c[len("data:"):]) for c in raw.decode().split("\n\n") if c]
    assert status == 200 and len(events) == 4
    assert all("prompt_tokens" not in e["token"] for e in events)
    assert [e["generated_text"] for e in events[:-1]] == [None] * 3
    last = events[-1]
    assert last["generated_text"] == "Hi" + tokenizer.decode(state.engine.script[:4])
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 4, "seed": None}


@pytest.mark.parametrize("parameters, status, fragment", [
    ({"watermark": True}, 400, "watermark"),
    ({"typical_p": 1.5, "do_sample": True}, 400, "typical_p"),
    ({"top_n_tokens": 6}, 400, "top_n_tokens"),
    ({"grammar": {"type": "xml", "value": "<a/>"}}, 400, "grammar"),
    ({"truncate": 0}, 400, "truncate"),
    ({"bogus": 1}, 422, "unknown field 'bogus'"),
    ({"temperature": "hot"}, 422, "temperature"),
])
def test_tgi_errors_carry_the_fields_its_client_reads(make_client, parameters, status, fragment):
    client, state = make_client("--use_tgi_api")
    got, out = run(post(client, "/generate", {"inputs": "Hi", "parameters": parameters}))
    assert got == status and fragment in out["message"] and out["error"] == out["message"]
    assert out["error_type"] == "validation" and state.engine.submitted == []


def test_parameters_may_be_omitted(make_client):
    client, _ = make_client("--use_tgi_api")
    status, out = run(post(client, "/generate", {"inputs": "Hi"}))
    assert status == 200 and out[0]["count_output_tokens"] == 16 and "details" not in out[0]
