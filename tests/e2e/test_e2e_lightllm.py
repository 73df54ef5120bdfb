"""LightLLM's wire format and the common routes against the real server: every field of /generate and
/generate_stream, the parameters that change generation, the routes beside them, and JSON errors for bad input."""

import http.client
import json
import time

import pytest
from e2e_server import chat_text

POEM = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def poem_prompt(tokenizer):
    return chat_text(tokenizer, POEM)


@pytest.fixture(scope="module")
def greedy(lightllm_server, poem_prompt):
    """The greedy answer to the poem prompt, with details."""
    status, body = lightllm_server.post("/generate", {"inputs": poem_prompt, "parameters": {
        "max_new_tokens": 12, "return_details": True}})
    assert status == 200, body
    return body


def test_generate_fields(greedy, tokenizer, poem_prompt):
    assert list(greedy) == ["generated_text", "count_output_tokens", "finish_reason", "prompt_tokens", "tokens"]
    text, = greedy["generated_text"]
    assert text.strip() and greedy["count_output_tokens"] == 12 and greedy["finish_reason"] == "length"
    assert greedy["prompt_tokens"] == len(tokenizer.encode(poem_prompt))
    tokens = greedy["tokens"]
    assert [t["count_output_tokens"] for t in tokens] == list(range(1, 13))
    assert all(set(t) == {"id", "text", "logprob", "special", "count_output_tokens", "prompt_tokens"} for t in tokens)
    assert "".join(t["text"] for t in tokens) == text
    assert tokenizer.decode([t["id"] for t in tokens]) == text
    assert all(t["logprob"] <= 0 and t["prompt_tokens"] == greedy["prompt_tokens"] for t in tokens)


def test_stream_matches_generate(lightllm_server, greedy, poem_prompt):
    status, events = lightllm_server.stream("/generate_stream", {"inputs": poem_prompt, "parameters": {
        "max_new_tokens": 12}})
    assert status == 200 and len(events) == 12
    assert [e["token"] for e in events] == greedy["tokens"]
    assert [e["finished"] for e in events] == [False] * 11 + [True]
    assert [e["finish_reason"] for e in events] == [None] * 11 + ["length"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events)


def test_root_route(lightllm_server, greedy, poem_prompt):
    body = {"inputs": poem_prompt, "parameters": {"max_new_tokens": 12}}
    status, out = lightllm_server.post("/", {**body, "stream": False})
    assert status == 200 and out["generated_text"] == greedy["generated_text"]
    status, events = lightllm_server.stream("/", {**body, "stream": True})
    assert "".join(e["token"]["text"] for e in events) == greedy["generated_text"][0]


def test_stop_sequence_across_tokens_is_kept(lightllm_server, greedy, poem_prompt):
    tokens = greedy["tokens"]
    # A stop string made of the end of token 3 and the start of token 4: matched on text, kept in the output.
    left, right = tokens[2]["text"], tokens[3]["text"]
    stop = left[-2:] + right[:2]
    expected = "".join(t["text"] for t in tokens[:3]) + right[:2]
    assert stop.strip() and stop in expected
    status, out = lightllm_server.post("/generate", {"inputs": poem_prompt, "parameters": {
        "max_new_tokens": 12, "stop_sequences": ["never seen", stop]}})
    assert out["finish_reason"] == "stop" and out["generated_text"] == [expected[:expected.index(stop) + len(stop)]]


def test_best_of_gives_independent_samples(lightllm_server, poem_prompt):
    status, out = lightllm_server.post("/generate", {"inputs": poem_prompt, "parameters": {
        "max_new_tokens": 6, "best_of": 3, "do_sample": True, "temperature": 1.5, "return_details": True}})
    assert status == 200
    assert len(out["generated_text"]) == 3 and out["count_output_tokens"] == [6, 6, 6]
    assert out["finish_reason"] == ["length"] * 3 and isinstance(out["prompt_tokens"], int)
    assert len(out["tokens"]) == 3 and all(len(t) == 6 for t in out["tokens"])
    assert len(set(out["generated_text"])) > 1


def test_eos_min_new_tokens_and_ignore_eos(lightllm_server, tokenizer):
    prompt = "What is the capital of France?"  # without the chat template the model ends at once
    status, out = lightllm_server.post("/generate", {"inputs": prompt, "parameters": {
        "max_new_tokens": 8, "return_details": True}})
    assert out["finish_reason"] == "stop" and out["tokens"][-1]["id"] == 2 and out["tokens"][-1]["text"] == ""
    assert out["tokens"][-1]["special"] is True
    status, out = lightllm_server.post("/generate", {"inputs": prompt, "parameters": {
        "max_new_tokens": 8, "min_new_tokens": 3, "return_details": True}})
    assert out["count_output_tokens"] >= 3 and 2 not in [t["id"] for t in out["tokens"][:2]]
    status, out = lightllm_server.post("/generate", {"inputs": prompt, "parameters": {
        "max_new_tokens": 5, "ignore_eos": True}})
    assert out["finish_reason"] == "length" and out["count_output_tokens"] == 5


def test_penalties_change_the_text(lightllm_server, poem_prompt, greedy):
    parameters = {"max_new_tokens": 12, "repetition_penalty": 3.0, "frequency_penalty": 1.0,
                  "presence_penalty": 1.0, "input_penalty": True, "exponential_decay_length_penalty": [2, 1.5]}
    status, out = lightllm_server.post("/generate", {"inputs": poem_prompt, "parameters": parameters})
    assert status == 200 and out["generated_text"] != greedy["generated_text"]


def test_common_routes(lightllm_server, tokenizer):
    s = lightllm_server
    assert s.get("/health") == (200, {"message": "Ok"})
    assert s.get("/healthz") == (200, {"message": "Ok"})
    status, body, _ = s.request("HEAD", "/health")
    assert status == 200 and body == b""
    for path in ("/liveness", "/readiness"):
        assert s.get(path) == (200, {"status": "ok"}) == s.post(path)
    for method in ("GET", "POST"):
        status, body, _ = s.request(method, "/tokens", {"text": "Hello world, how are you?"})
        assert status == 200 and json.loads(body) == {"ntokens": len(tokenizer.encode("Hello world, how are you?"))}
    status, load = s.get("/token_load")
    assert status == 200 and set(load) == {"current_load", "logical_max_load", "dynamic_max_load"}
    assert all(isinstance(v, float) for v in load.values())
    status, out = s.post("/get_score", {"chat": "hi"})
    assert status == 400 and "reward model" in out["message"]


def test_metrics_are_prometheus_text(lightllm_server, greedy):
    status, body, headers = lightllm_server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("lightllm_request_count_total", "lightllm_request_success_total", "lightllm_request_duration_bucket",
                 "lightllm_request_first_token_duration_count", "lightllm_queue_size", "lightllm_batch_current_size"):
        assert name in text
    count = next(line for line in text.splitlines() if line.startswith("lightllm_request_success_total"))
    assert float(count.split()[1]) >= 1


@pytest.mark.parametrize("raw, status, fragment", [
    (b"{\"inputs\": \"Hi\", ", 400, "malformed JSON"),
    (b"{\"inputs\": \"\xff\xfe\", \"parameters\": {}}", 400, "UTF-8"),
    (b"{\"inputs\": \"\\udc80\", \"parameters\": {}}", 400, "unpaired surrogate"),
    (b"{\"inputs\": \"Hi\", \"parameters\": {\"temperature\": NaN}}", 400, "NaN"),
    (b"{\"inputs\": \"Hi\"}", 422, "missing field 'parameters'"),
    (b"{\"inputs\": \"Hi\", \"parameters\": {\"max_new_token\": 3}}", 422, "unknown field 'max_new_token'"),
    (b"{\"inputs\": \"Hi\", \"parameters\": {\"max_new_tokens\": \"3\"}}", 422, "max_new_tokens: expected an integer"),
    (b"{\"inputs\": \"Hi\", \"parameters\": {\"do_sample\": true, \"top_p\": 1.5}}", 400, "top_p"),
    (b"{\"inputs\": \"Hi\", \"parameters\": {\"min_new_tokens\": 9, \"max_new_tokens\": 3}}", 400, "min_new_tokens"),
    (b"{\"inputs\": \"\", \"parameters\": {}}", 400, "empty"),
    (b"{\"inputs\": \"Hi\", \"parameters\": {\"max_new_tokens\": 384}}", 400, "--max_req_total_len"),
])
@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_bad_input_is_a_json_4xx(lightllm_server, path, raw, status, fragment):
    got, body, headers = lightllm_server.request("POST", path, raw=raw)
    out = json.loads(body)
    assert got == status and headers["Content-Type"] == "application/json"
    assert list(out) == ["message"] and fragment in out["message"]


def test_over_long_prompt_and_oversized_body(lightllm_server):
    status, out = lightllm_server.post("/generate", {"inputs": "sea " * 400, "parameters": {}})
    assert status == 400 and "--max_req_input_len" in out["message"]
    # A 17 MiB body: the server answers 413 from the Content-Length, before reading it all.
    conn = http.client.HTTPConnection("127.0.0.1", lightllm_server.port, timeout=60)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(17 * 1024 * 1024))
    conn.endheaders(b"{\"inputs\": \"" + b"a" * 65536)
    response = conn.getresponse()
    assert response.status == 413 and "larger than" in json.loads(response.read())["message"]
    conn.close()
    status, out = lightllm_server.post("/generate_stream", {"inputs": "Hi", "parameters": {
        "best_of": 2, "do_sample": True}})
    assert status == 400 and "best_of" in out["message"]
    assert lightllm_server.get("/liveness") == (200, {"status": "ok"})


def test_an_idle_connection_outlives_the_clients_pool_expiry(lightllm_server):
    # httpx (the openai client) drops idle connections after 5 s: the server must not close them first.
    conn = http.client.HTTPConnection("127.0.0.1", lightllm_server.port, timeout=30)
    for pause_s in (6, 0):
        conn.request("GET", "/liveness")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
        time.sleep(pause_s)
    conn.close()
