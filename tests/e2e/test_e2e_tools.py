"""Tool calling against the real server (SmolLM2, temperature 1; its chat template has no place for tools, so
they are described in a system message, and `auto` picks the Hermes format): tool_choice "required" always
yields a valid call, a named choice calls that function, streamed calls join to the same call, "none" and no
tools answer in text, and a conversation carrying earlier calls and their results renders."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
                   "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = {"temperature": 1.0, "max_tokens": 40}


@pytest.fixture(scope="module")
def tools_server(lightllm_server):
    """Prompts that describe tools are long: the main server has room for 320 prompt tokens."""
    return lightllm_server


@pytest.fixture(scope="module")
def client(tools_server):
    return openai.OpenAI(base_url=tools_server.base + "/v1", api_key="unused", max_retries=0, timeout=600)


def check_call(call):
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.type == "function" and call.id.startswith("call_")


def test_tool_choice_required_always_yields_a_valid_call(client):
    def ask(seed):
        return client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", seed=seed, **SAMPLED).choices[0]

    with ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(ask, range(4)))
    for choice in choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            check_call(call)


def test_a_named_tool_choice_calls_that_function_streamed_or_not(client):
    request = dict(model="m", messages=ASK, tools=[WEATHER, TIME], seed=4, **SAMPLED,
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**request).choices[0]
    assert [c.function.name for c in whole.message.tool_calls] == ["get_time"] * len(whole.message.tool_calls)
    check_call(whole.message.tool_calls[0])
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def test_tool_choice_none_and_a_conversation_with_earlier_calls(client):
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s(tools_server, extra, param):
    status, out = tools_server.post("/v1/chat/completions", {"model": "m", "messages": ASK, **extra})
    assert status == 400 and out["error"]["param"] == param
