"""The LightLLM wire format and the common routes, through the Quart app over a ScriptedEngine (an object with
the engine's API answering a fixed script): answer fields, SSE events, error statuses and bodies, aborts."""

import asyncio
import json

import pytest

from jaxllm.server.app import MAX_BODY_BYTES


def run(coro):
    return asyncio.run(coro)


async def post(client, path, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(path, data=data, headers={"Content-Type": "application/json"}, **kw)
    return response.status_code, await response.get_data()


def sse_events(raw: bytes) -> list[dict]:
    chunks = raw.decode().split("\n\n")
    assert chunks[-1] == ""
    assert all(c.startswith("data:{") for c in chunks[:-1]), raw  # no space after the colon
    return [json.loads(c[len("data:"):]) for c in chunks[:-1]]


def test_generate_answers_lightllm_fields(make_client, tokenizer):
    client, state = make_client()
    status, raw = run(post(client, "/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 5}}))
    body = json.loads(raw)
    assert status == 200
    assert list(body) == ["generated_text", "count_output_tokens", "finish_reason", "prompt_tokens"]
    script = state.engine.script
    assert body["generated_text"] == [tokenizer.decode(script[:5])]
    assert body["count_output_tokens"] == 5 and body["finish_reason"] == "length"
    assert body["prompt_tokens"] == len(tokenizer.encode("Hello there"))
    (_, ids, params), = state.engine.submitted
    assert ids == tokenizer.encode("Hello there") and params.greedy and not params.prompt_logprobs


def test_generate_details_and_best_of(make_client):
    client, state = make_client()
    parameters = {"max_new_tokens": 3, "best_of": 2, "do_sample": True, "return_details": True}
    status, raw = run(post(client, "/generate", {"inputs": "Hi", "parameters": parameters}))
    body = json.loads(raw)
    assert status == 200 and len(state.engine.submitted) == 2  # one group of best_of members
    assert all(p.best_of == 2 and p.n == 2 for _, _, p in state.engine.submitted)
    assert len(body["generated_text"]) == 2
    assert body["count_output_tokens"] == [3, 3] and body["finish_reason"] == ["length", "length"]
    assert isinstance(body["prompt_tokens"], int)
    tokens = body["tokens"]
    assert len(tokens) == 2 and len(tokens[0]) == 3
    assert set(tokens[0][0]) == {"id", "text", "logprob", "special", "count_output_tokens", "prompt_tokens"}
    assert [t["count_output_tokens"] for t in tokens[1]] == [1, 2, 3]


def test_stop_sequence_text_is_kept(make_client):
    client, _ = make_client()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 30, "stop_sequences": ["capital"]}}
    status, raw = run(post(client, "/generate", body))
    out = json.loads(raw)
    assert status == 200 and out["finish_reason"] == "stop"
    assert out["generated_text"][0].endswith("capital")


def test_prompt_logprobs_with_the_flag(make_client, tokenizer):
    client, state = make_client("--return_all_prompt_logprobs")
    status, raw = run(post(client, "/generate", {"inputs": "one two three", "parameters": {"max_new_tokens": 2}}))
    body = json.loads(raw)
    ids = tokenizer.encode("one two three")
    assert status == 200 and body["prompt_token_ids"] == ids
    assert body["prompt_logprobs"] == [[ids[i], {str(ids[i + 1]): -1.5}] for i in range(len(ids) - 1)]
    assert state.engine.submitted[0][2].prompt_logprobs


def test_generate_stream_events(make_client):
    client, _ = make_client()
    status, raw = run(post(client, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 4}}))
    events = sse_events(raw)
    assert status == 200 and len(events) == 4
    for i, e in enumerate(events):
        assert list(e) == ["token", "generated_text", "finished", "finish_reason", "details"]
        assert set(e["token"]) == {"id", "text", "logprob", "special", "count_output_tokens", "prompt_tokens"}
        assert e["token"]["count_output_tokens"] == i + 1 and e["generated_text"] is None and e["details"] is None
    assert [e["finished"] for e in events] == [False, False, False, True]
    assert [e["finish_reason"] for e in events] == [None, None, None, "length"]


def test_root_route_dispatches_on_stream(make_client):
    client, _ = make_client()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    status, raw = run(post(client, "/", {**body, "stream": True}))
    assert status == 200 and len(sse_events(raw)) == 2
    status, raw = run(post(client, "/", {**body, "stream": False}))
    assert status == 200 and json.loads(raw)["count_output_tokens"] == 2


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
@pytest.mark.parametrize("body, status, fragment", [
    ({"parameters": {}}, 422, "body: missing field 'inputs'"),
    ({"inputs": "Hi"}, 422, "body: missing field 'parameters'"),
    ({"inputs": 5, "parameters": {}}, 422, "inputs: expected a string"),
    ({"inputs": "Hi", "parameters": []}, 422, "parameters: expected an object"),
    ({"inputs": "Hi", "parameters": {"bogus": 1}}, 422, "unknown field 'bogus'"),
    ({"inputs": "Hi", "parameters": {"top_p": 2.0, "do_sample": True}}, 400, "top_p:"),
    ({"inputs": "", "parameters": {}}, 400, "inputs: the prompt is empty"),
    ({"inputs": "word " * 80, "parameters": {}}, 400, "--max_req_input_len"),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": 96}}, 400, "--max_req_total_len"),
    ({"inputs": "Hi", "parameters": {}, "multimodal_params": {"images": [{"type": "url", "data": "x"}]}}, 400,
     "multimodal"),
    ([1, 2], 422, "body: expected an object"),
])
def test_bad_requests_get_json_errors(make_client, path, body, status, fragment):
    client, state = make_client()
    got, raw = run(post(client, path, body))
    out = json.loads(raw)
    assert got == status and list(out) == ["message"] and fragment in out["message"]
    assert state.engine.submitted == []


def test_streaming_refuses_best_of_before_the_stream_starts(make_client):
    client, state = make_client()
    status, raw = run(post(client, "/generate_stream",
                           {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True}}))
    assert status == 400 and "best_of" in json.loads(raw)["message"] and state.engine.submitted == []


@pytest.mark.parametrize("mode, kept", [("head", lambda ids: ids[-64:]), ("center", lambda ids: ids[:32] + ids[-32:])])
def test_long_truncation_modes(make_client, tokenizer, mode, kept):
    client, state = make_client("--long_truncation_mode", mode)
    prompt = " ".join(f"w{i}" for i in range(60))
    status, raw = run(post(client, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 2}}))
    ids = tokenizer.encode(prompt)
    assert len(ids) > 64 and status == 200
    assert state.engine.submitted[0][1] == kept(ids) and json.loads(raw)["prompt_tokens"] == 64


def test_malformed_bodies(make_client):
    client, _ = make_client()
    for raw_body, fragment in [(b"{nope", "malformed JSON"), (b"\xc3\x28", "UTF-8"), (b"", "empty")]:
        status, raw = run(post(client, "/generate", raw_body))
        assert status == 400 and fragment in json.loads(raw)["message"]


def test_oversized_body_is_413(make_client):
    client, _ = make_client()
    status, raw = run(post(client, "/generate", b"{\"inputs\": \"" + b"a" * MAX_BODY_BYTES + b"\"}"))
    assert status == 413 and "larger than" in json.loads(raw)["message"]


def test_unknown_route_and_method_are_json(make_client):
    client, _ = make_client()

    async def go():
        r1 = await client.get("/nope")
        r2 = await client.get("/generate")
        return (r1.status_code, await r1.get_json()), (r2.status_code, await r2.get_json())

    (s1, b1), (s2, b2) = run(go())
    assert s1 == 404 and "message" in b1 and s2 == 405 and "message" in b2


def test_get_score_needs_a_reward_model(make_client):
    client, _ = make_client()
    status, raw = run(post(client, "/get_score", {"chat": "hi"}))
    assert status == 400 and "--use_reward_model" in json.loads(raw)["message"]


def test_get_score_of_several_labels_is_a_list(make_client, tokenizer):
    client, _ = make_client("--use_reward_model")
    status, raw = run(post(client, "/get_score", {"chat": "Is this a good answer?", "parameters": {"x": 1}}))
    count = len(tokenizer.encode("Is this a good answer?"))
    assert status == 200 and json.loads(raw) == {"score": [count / 10, -1.0], "prompt_tokens": count,
                                                 "finish_reason": "stop"}


def test_common_routes(make_client, tokenizer):
    client, state = make_client()

    async def go():
        out = {}
        for method, path in [("GET", "/liveness"), ("POST", "/liveness"), ("GET", "/readiness"),
                             ("POST", "/readiness"), ("GET", "/health"), ("GET", "/healthz"), ("GET", "/token_load")]:
            r = await client.open(path, method=method)
            out[method, path] = (r.status_code, await r.get_json())
        head = await client.head("/health")
        out["HEAD", "/health"] = (head.status_code, await head.get_data())
        for method in ("GET", "POST"):
            r = await client.open("/tokens", method=method, json={"text": "Hello world"})
            out[method, "/tokens"] = (r.status_code, await r.get_json())
        return out

    out = run(go())
    assert out["GET", "/liveness"] == out["POST", "/readiness"] == (200, {"status": "ok"})
    assert out["GET", "/health"] == out["GET", "/healthz"] == (200, {"message": "Ok"})
    assert out["HEAD", "/health"] == (200, b"")
    assert out["GET", "/token_load"] == (200, {"current_load": 0.0, "logical_max_load": 0.0, "dynamic_max_load": 0.0})
    assert out["GET", "/tokens"] == out["POST", "/tokens"] == (200, {"ntokens": len(tokenizer.encode("Hello world"))})
    # the two health probes ran a one-token generation each
    assert [p.max_new_tokens for _, _, p in state.engine.submitted] == [1, 1, 1]


def test_health_fails_with_503_when_generation_fails(make_client):
    client, state = make_client()

    def broken_submit(*args, **kwargs):
        raise RuntimeError("device lost")

    state.engine.submit = broken_submit

    async def go():
        r = await client.get("/health")
        return r.status_code, await r.get_json()

    assert run(go()) == (503, {"message": "Error"})


def test_tokens_needs_text(make_client):
    client, _ = make_client()
    status, raw = run(post(client, "/tokens", {"txt": "x"}))
    assert status == 422 and "text" in json.loads(raw)["message"]


def test_client_disconnect_aborts_the_stream(make_client):
    client, state = make_client(delay_s=0.02)

    async def go():
        body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 50}}).encode()
        async with client.request("/generate_stream", method="POST",
                                  headers={"Content-Type": "application/json"}) as conn:
            await conn.send(body)
            await conn.send_complete()
            first = await conn.receive()
            await conn.disconnect()
        for _ in range(100):
            if state.engine.aborted:
                break
            await asyncio.sleep(0.01)
        return first

    first = run(go())
    assert first.startswith(b"data:{")
    (request_id, _, _), = state.engine.submitted
    assert state.engine.aborted == [request_id]


def test_disconnect_during_generate_aborts_every_sample(make_client):
    client, state = make_client(delay_s=0.02)

    async def go():
        body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 50, "best_of": 3,
                                                          "do_sample": True}}).encode()
        async with client.request("/generate", method="POST", headers={"Content-Type": "application/json"}) as conn:
            await conn.send(body)
            await conn.send_complete()
            await asyncio.sleep(0.1)
            await conn.disconnect()
        for _ in range(100):
            if len(state.engine.aborted) == 3:
                break
            await asyncio.sleep(0.01)

    run(go())
    assert sorted(state.engine.aborted) == sorted(rid for rid, _, _ in state.engine.submitted)


def test_metrics_count_requests_in_prometheus_text(make_client):
    client, _ = make_client()

    async def go():
        await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
        await client.post("/generate", json={"inputs": "Hi", "parameters": {"top_k": 0, "do_sample": True}})
        r = await client.get("/metrics")
        return r.status_code, r.headers["Content-Type"], (await r.get_data()).decode()

    status, content_type, text = run(go())
    assert status == 200 and content_type.startswith("text/plain") and "version=0.0.4" in content_type
    assert "lightllm_request_count_total 2.0" in text
    assert "lightllm_request_success_total 1.0" in text and "lightllm_request_failure_total 1.0" in text
    assert "lightllm_request_generated_tokens_count 1.0" in text
    assert "lightllm_batch_current_size 0.0" in text


def test_a_grammar_being_compiled_holds_up_no_other_request(make_client):
    """A constrained request waits for its grammar off the event loop: a plain request sent after it is answered
    meanwhile; then the constrained one is, and an invalid grammar is a 400 naming its field."""
    client, state = make_client()
    state.engine.grammars_compiled.clear()

    async def scenario():
        guided = asyncio.ensure_future(post(client, "/generate", {
            "inputs": "Hello", "parameters": {"max_new_tokens": 3, "guided_regex": "[ab]+"}}))
        await asyncio.sleep(0.2)
        plain = await asyncio.wait_for(post(client, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
                                       5)
        assert not guided.done()  # still waiting for its grammar
        state.engine.grammars_compiled.set()
        bad = await post(client, "/generate", {"inputs": "Hi", "parameters": {"guided_regex": "(unclosed"}})
        return plain, await guided, bad

    plain, guided, bad = run(scenario())
    assert plain[0] == 200 and guided[0] == 200
    assert [params.guided.value for _, _, params in state.engine.submitted if params.guided] == ["[ab]+"]
    assert bad[0] == 400 and "guided_regex" in json.loads(bad[1])["message"]
