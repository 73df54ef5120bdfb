"""The engine core in its own process, seen through the real server: concurrent streams each get every token once
and in order, with their text (made in the frontend, or in the core for a stop string that ends the stream); a killed core fails its in-flight requests with a clear error while the server stays up and says so
(/health 503, generation 503); the core goes away with the server."""

from __future__ import annotations

import os
import threading
import time

from e2e_server import core_pid, kill_mid_stream, running_server

STREAMS = 24


def test_concurrent_streams_get_every_token_once_in_order(lightllm_server, tokenizer):
    # Every fourth stream ends at a stop string spanning two tokens (its text is made in the core, which ends it
    # there); the others' text is made in the frontend.
    stop_prompt = "Tell me about the number 0."
    status, reference = lightllm_server.stream("/generate_stream", {"inputs": stop_prompt, "parameters": {
        "max_new_tokens": 12, "ignore_eos": True}})
    texts = [e["token"]["text"] for e in reference]
    stop = texts[4][-2:] + texts[5][:2]
    full = "".join(texts)
    assert status == 200 and stop.strip() and full.index(stop) + len(stop) > len("".join(texts[:5]))
    stopped_text = full[:full.index(stop) + len(stop)]
    results: list = [None] * STREAMS

    def client(i: int) -> None:
        body = {"inputs": f"Tell me about the number {i}.",
                "parameters": {"max_new_tokens": 8 + i % 13, "ignore_eos": True}}
        if i % 4 == 0:
            body = {"inputs": stop_prompt, "parameters": {"max_new_tokens": 12, "ignore_eos": True,
                                                          "stop_sequences": [stop]}}
        try:
            results[i] = (body["parameters"]["max_new_tokens"], lightllm_server.stream("/generate_stream", body))
        except Exception as exc:  # noqa: BLE001 - asserted on below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, result in enumerate(results):
        assert isinstance(result, tuple), (i, result)
        max_new_tokens, (status, events) = result
        assert status == 200, (i, events)
        text = "".join(e["token"]["text"] for e in events)
        if i % 4 == 0:
            assert text == stopped_text and events[-1]["finish_reason"] == "stop", i
            assert [e["token"]["id"] for e in events] == [e["token"]["id"] for e in reference[:len(events)]], i
            max_new_tokens = len(events)
        else:
            assert events[-1]["finish_reason"] == "length"
            ids = [e["token"]["id"] for e in events]
            assert text == tokenizer.decode(ids, skip_special_tokens=True), i
        assert [e["token"]["count_output_tokens"] for e in events] == list(range(1, max_new_tokens + 1)), i
        assert [e["finished"] for e in events] == [False] * (max_new_tokens - 1) + [True], i


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pid: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_a_killed_core_fails_requests_and_the_server_says_so(tiny_served_model, tmp_path):
    for server in running_server(tiny_served_model.path, list(tiny_served_model.flags), tmp_path / "server.log"):
        pid = core_pid(server)
        last = kill_mid_stream(server, "Count on.", {"max_new_tokens": 50, "ignore_eos": True}, pid)
        assert "engine core's process exited (exit code -9)" in last["message"], last

        assert server.get("/health") == (503, {"message": "Error"})
        status, body = server.post("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert status == 503 and "the engine is not running" in body["message"], body
        status, body = server.post("/v1/completions", {"model": "m", "prompt": "Hello", "max_tokens": 2})
        assert status == 503 and "the engine is not running" in body["error"]["message"], body
        assert server.get("/token_load")[0] == 503
        assert server.get("/liveness") == (200, {"status": "ok"})  # the frontend stays up
        assert server.request("GET", "/metrics")[0] == 200


def test_the_core_goes_with_the_server(tiny_served_model, tmp_path):
    for server in running_server(tiny_served_model.path, list(tiny_served_model.flags), tmp_path / "server.log"):
        pid = core_pid(server)
        status, out = server.post("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert status == 200 and out["count_output_tokens"] == 2
        server.proc.kill()  # even killed outright: the core sees its channel close and stops
        assert wait_gone(pid, 30)
