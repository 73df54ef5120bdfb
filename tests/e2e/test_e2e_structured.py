"""Structured output against the real server (SmolLM2, temperature 1, so the grammar and not luck decides):
OpenAI's response_format (json_schema, json_object, the client's `parse` with a pydantic model), vLLM's guided_*
extras, LightLLM's /generate parameters and TGI's grammar; streamed answers; invalid grammars are 400s; a killed
mask worker fails its requests while the server goes on (and starts a new one)."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest
from e2e_server import child_pids, core_pid, kill_mid_stream

# Nested: objects, an array, enums, required keys, bounded numbers; short, so answers are quick and fit.
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "owl"]},
        "weight": {"type": "number", "minimum": 0, "maximum": 9},
        "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 90}},
                  "required": ["age"], "additionalProperties": False},
        "toys": {"type": "array", "maxItems": 2, "items": {"enum": ["ball", "rope"]}},
    },
    "required": ["kind", "weight", "owner", "toys"],
    "additionalProperties": False,
}
# A short system message (22 prompt tokens, not the template's default one's 36): 50 prompts prefill quicker.
ASK = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Describe a pet."}]
SAMPLED = {"temperature": 1.0, "max_tokens": 60}


@pytest.fixture(scope="module")
def client(lightllm_server):
    return openai.OpenAI(base_url=lightllm_server.base + "/v1", api_key="unused", max_retries=0, timeout=600)


def schema_format(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}


def test_twenty_four_sampled_answers_all_follow_a_nested_schema(client):
    def ask(seed):
        reply = client.chat.completions.create(model="m", messages=ASK, response_format=schema_format(),
                                               seed=seed, **SAMPLED)
        return reply.choices[0]

    with ThreadPoolExecutor(24) as pool:  # all in flight at once: the main server batches 16 at a time
        choices = list(pool.map(ask, range(24)))
    for choice in choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"
    assert len({c.message.content for c in choices}) > 10  # sampled, not one greedy answer


def test_regex_and_choice_constraints_on_completions_and_chat(client):
    regex = r"[A-Z][a-z]{2,6}-[0-9]{3}"
    colours = ["crimson", "teal", "ochre yellow"]

    def regex_completion(seed):
        reply = client.completions.create(model="m", prompt="A part number:", seed=seed, extra_body={
            "guided_regex": regex}, **SAMPLED)
        return reply.choices[0].text

    def choice_chat(seed):
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "A colour?"}],
                                               seed=seed, extra_body={"guided_choice": colours}, **SAMPLED)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        parts = list(pool.map(regex_completion, range(6)))
        picked = list(pool.map(choice_chat, range(6)))
    assert all(re.fullmatch(regex, p) for p in parts), parts
    assert all(c in colours for c in picked), picked


def test_the_openai_client_parses_into_a_pydantic_model(client):
    class Owner(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        age: int = pydantic.Field(ge=1, le=99)

    class Pet(pydantic.BaseModel):
        kind: str = pydantic.Field(max_length=8)
        legs: int = pydantic.Field(ge=0, le=8)
        owners: list[Owner] = pydantic.Field(max_length=1)

    reply = client.chat.completions.parse(model="m", messages=ASK, response_format=Pet, seed=3, **SAMPLED)
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet) and reply.choices[0].finish_reason == "stop"


def test_a_streamed_answer_joins_to_the_same_valid_json(client):
    request = dict(model="m", messages=ASK, response_format=schema_format(), seed=11, **SAMPLED)
    whole = client.chat.completions.create(**request).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **request)
              if c.choices]
    assert "".join(pieces) == whole
    jsonschema.validate(json.loads(whole), SCHEMA)


def test_json_object_and_the_lightllm_and_tgi_formats(client, lightllm_server, tgi_server):
    reply = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"},
                                           seed=5, temperature=1.0, max_tokens=80)
    if reply.choices[0].finish_reason == "stop":  # any object may run past max_tokens: then "length"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    status, out = lightllm_server.post("/generate", {"inputs": "Yes or no?", "parameters": {
        "do_sample": True, "max_new_tokens": 8, "guided_choice": ["yes", "no"]}})
    assert status == 200 and out["generated_text"][0] in ("yes", "no") and out["finish_reason"] == "stop"
    # Seeded: unseeded, an answer may sample a number's digits past max_new_tokens (then "length", and no JSON)
    status, out = tgi_server.post("/generate", {"inputs": "Pet:", "parameters": {
        "do_sample": True, "seed": 4, "max_new_tokens": 60, "details": True,
        "grammar": {"type": "json", "value": SCHEMA}}})
    assert status == 200 and out[0]["details"]["finish_reason"] != "length"
    jsonschema.validate(json.loads(out[0]["generated_text"]), SCHEMA)
    status, out = tgi_server.post("/generate", {"inputs": "Code:", "parameters": {
        "do_sample": True, "max_new_tokens": 8, "grammar": {"type": "regex", "value": "[0-9]{4}"}}})
    assert status == 200 and re.fullmatch("[0-9]{4}", out[0]["generated_text"])


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
])
def test_an_invalid_grammar_is_a_400_naming_its_field(lightllm_server, extra, field):
    status, out = lightllm_server.post("/v1/chat/completions", {"model": "m", "messages": ASK, **extra})
    assert status == 400 and out["error"]["param"] == field and field in out["error"]["message"]
    status, out = lightllm_server.post("/generate", {"inputs": "x", "parameters": {"guided_regex": "(("}})
    assert status == 400 and "guided_regex" in out["message"]
    assert lightllm_server.get("/health")[0] == 200


def test_a_killed_mask_worker_fails_its_requests_and_the_server_goes_on(lightllm_server):
    choice = {"do_sample": True, "max_new_tokens": 8, "guided_choice": ["yes", "no"]}
    assert lightllm_server.post("/generate", {"inputs": "Yes or no?", "parameters": choice})[0] == 200
    (worker,) = child_pids(core_pid(lightllm_server), "jaxllm.engine.mask_worker")
    last = kill_mid_stream(lightllm_server, "Digits:", {"max_new_tokens": 60, "guided_regex": "[0-9]{100}"}, worker)
    assert f"the grammar worker (pid {worker}) died (killed by SIGKILL)" in json.dumps(last), last
    assert lightllm_server.get("/health")[0] == 200  # the server serves: a new worker takes the next grammar
    status, out = lightllm_server.post("/generate", {"inputs": "Yes or no?", "parameters": choice})
    assert status == 200 and out["generated_text"][0] in ("yes", "no") and out["finish_reason"] == "stop"
    assert child_pids(core_pid(lightllm_server), "jaxllm.engine.mask_worker") != [worker]
