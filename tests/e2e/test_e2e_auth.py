"""--api_key against the real server (started with two keys; it also serves test_e2e_groups' beam search): the official `openai` client
with either key works, streamed too, and with a wrong key gets a 401 AuthenticationError; LightLLM's routes need
the header, the probes and /metrics do not; `jaxllm.bench serve --api-key`; no key reaches the server's log."""

import json

import openai
import pytest
from e2e_server import API_KEYS as KEYS

from jaxllm.bench.__main__ import main as bench_main

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def keyed_server(keyed_beam_server):
    return keyed_beam_server


def client(server, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=api_key, max_retries=0, timeout=120)


def test_the_openai_client_works_with_either_key(keyed_server):
    reply = client(keyed_server, KEYS[0]).chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 4
    chunks = list(client(keyed_server, KEYS[1]).completions.create(
        model="m", prompt="Red, green and", max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("api_key", ["wrong", KEYS[0] + "x", KEYS[1][:-1]])
def test_the_openai_client_with_a_wrong_key_gets_a_401(keyed_server, api_key):
    with pytest.raises(openai.AuthenticationError) as err:
        client(keyed_server, api_key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, api_key).models.list()


def test_lightllm_routes_need_the_header_and_probes_do_not(keyed_server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    status, data, headers = keyed_server.request("POST", "/generate", body)
    assert status == 401 and json.loads(data) == {
        "message": "this server needs an API key: send the header `Authorization: Bearer KEY`"}
    assert headers["WWW-Authenticate"] == "Bearer"
    status, data, _ = keyed_server.request("POST", "/generate", body, headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert status == 200 and json.loads(data)["count_output_tokens"] == 2
    for path in ("/health", "/healthz", "/liveness", "/readiness", "/metrics"):
        assert keyed_server.request("GET", path)[0] == 200, path


def test_the_benchmark_client_sends_its_key(keyed_server, smollm2_dir, tmp_path):
    flags = ["serve", "--base-url", keyed_server.base, "--tokenizer", str(smollm2_dir), "--num-prompts", "2",
             "--input-len", "8", "--output-len", "2", "--result-json", str(tmp_path / "result.json")]
    assert bench_main([*flags, "--api-key", KEYS[0]]) == 0
    assert json.loads((tmp_path / "result.json").read_text())["completed"] == 2
    assert bench_main([*flags, "--api", "openai"]) == 1  # no key: every request refused
    assert json.loads((tmp_path / "result.json").read_text())["failed"] == 2


def test_no_key_reaches_the_log(keyed_server):
    log = keyed_server.log_path.read_text(errors="replace")
    assert "serving on" in log and not any(key in log for key in KEYS)
