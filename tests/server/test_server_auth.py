"""--api_key over a ScriptedEngine: every route but the probes' needs `Authorization: Bearer KEY` (any of the
keys, scheme in any case); a refusal is a 401 in the route's own error format, before the body is read."""

import pytest
from app_client import run

KEYS = ("--api_key", "key-one", "--api_key", "key-two")
MESSAGES = [{"role": "user", "content": "Hi"}]
KEYED_ROUTES = [
    ("POST", "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
    ("POST", "/tokens", {"text": "Hi"}),
    ("GET", "/token_load", None),
    ("POST", "/get_score", {"chat": "Hi"}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 2, "stream": True}),
    ("GET", "/no/such/route", None),
]
OPEN_ROUTES = ["/health", "/healthz", "/liveness", "/readiness", "/metrics"]


async def call(client, method, path, body=None, authorization=None):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.open(path, method=method, json=body, headers=headers)
    return response.status_code, await response.get_data(), response.headers


def test_keyed_routes_refuse_requests_without_a_valid_key(make_client):
    client, state = make_client(*KEYS)
    for authorization in (None, "", "Bearer", "Bearer ", "Basic key-one", "Bearer key-on", "Bearer key-one2",
                          "key-one", "Bearer key-one key-two"):
        for method, path, body in KEYED_ROUTES:
            status, data, headers = run(call(client, method, path, body, authorization))
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (authorization, path)
            assert b"key-one" not in data and b"key-two" not in data
    assert state.engine.submitted == []


def test_refusals_are_in_each_routes_error_format(make_client):
    client, _ = make_client(*KEYS)

    async def go(path, authorization=None, client=client):
        response = await client.post(path, json={}, headers={"Authorization": authorization} if authorization else {})
        return response.status_code, await response.get_json()

    status, out = run(go("/v1/chat/completions"))
    assert status == 401 and out == {"error": {
        "message": "this server needs an API key: send the header `Authorization: Bearer KEY`",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    status, out = run(go("/v1/completions", "Bearer wrong"))
    assert status == 401 and out["error"]["message"] == "invalid API key"
    status, out = run(go("/generate", "Bearer wrong"))
    assert status == 401 and out == {"message": "invalid API key"}  # LightLLM's form: no "error" key
    tgi_client, _ = make_client(*KEYS, "--use_tgi_api")
    status, out = run(go("/generate", client=tgi_client))
    assert status == 401 and out["error_type"] == "validation" and "API key" in out["error"]


@pytest.mark.parametrize("authorization", ["Bearer key-one", "bearer key-two", "BEARER  key-one "])
def test_any_key_opens_every_route(make_client, authorization):
    client, state = make_client(*KEYS)
    for method, path, body in KEYED_ROUTES:
        status, _, _ = run(call(client, method, path, body, authorization))
        assert status == {"/get_score": 400, "/no/such/route": 404}.get(path, 200), path
    assert len(state.engine.submitted) == 5


def test_probes_and_metrics_need_no_key(make_client):
    client, _ = make_client(*KEYS)
    for path in OPEN_ROUTES:
        status, _, _ = run(call(client, "GET", path))
        assert status == 200, path
    assert run(call(client, "HEAD", "/health"))[0] == 200


def test_without_api_key_nothing_is_asked(make_client):
    client, _ = make_client()
    assert run(call(client, "GET", "/v1/models"))[0] == 200
    assert run(call(client, "GET", "/v1/models", authorization="Bearer anything"))[0] == 200
