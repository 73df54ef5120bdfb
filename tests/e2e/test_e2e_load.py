"""A bounded load test against the real server: 64 concurrent streaming clients, a quarter of them hanging up
at random points; every finished stream is complete, the KV cache is empty afterwards, the server still answers."""

import http.client
import json
import random
import threading
import time

CLIENTS = 64
DEADLINE_S = 60.0
TOPICS = ["the sea", "a cat", "winter", "the moon", "bread", "a river", "mountains", "music"]


def stream_client(port: int, index: int, hang_up_after: int | None, results: list) -> None:
    """One client: POST /generate_stream and read events; with `hang_up_after`, close the socket after that
    many events."""
    max_new_tokens = 48 if hang_up_after is not None else 4 + index % 9
    body = {"inputs": f"Write about {TOPICS[index % len(TOPICS)]} ({index}).",
            "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": hang_up_after is not None}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    events = []
    try:
        conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                events.append(json.loads(line[len(b"data:"):]))
                if hang_up_after is not None and len(events) >= hang_up_after:
                    break
        results[index] = ("hung up" if hang_up_after is not None else "done", max_new_tokens, events)
    except Exception as exc:  # recorded, asserted on below
        results[index] = ("error", max_new_tokens, repr(exc))
    finally:
        conn.close()


def test_many_streams_with_disconnects(lightllm_server):
    rng = random.Random(0)
    hang_ups = set(rng.sample(range(CLIENTS), CLIENTS // 4))
    results: list = [None] * CLIENTS
    threads = [
        threading.Thread(target=stream_client, args=(
            lightllm_server.port, i, rng.randint(1, 20) if i in hang_ups else None, results))
        for i in range(CLIENTS)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads) and elapsed < DEADLINE_S

    assert [r[0] for r in results].count("error") == 0, [r for r in results if r[0] == "error"]
    for i, (kind, max_new_tokens, events) in enumerate(results):
        if kind == "hung up":
            continue
        # complete: consecutive counts, exactly one final event, at its end, with a finish reason
        assert [e["token"]["count_output_tokens"] for e in events] == list(range(1, len(events) + 1)), i
        assert [e["finished"] for e in events] == [False] * (len(events) - 1) + [True], i
        last = events[-1]
        assert last["finish_reason"] in ("stop", "length")
        assert len(events) == max_new_tokens or last["finish_reason"] == "stop"

    # Every aborted request gave its KV slots back.
    deadline = time.monotonic() + 10
    while True:
        status, load = lightllm_server.get("/token_load")
        if load["current_load"] == 0 and load["dynamic_max_load"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert load == {"current_load": 0.0, "logical_max_load": 0.0, "dynamic_max_load": 0.0}
    status, out = lightllm_server.post("/generate", {"inputs": "Still there?", "parameters": {"max_new_tokens": 2}})
    assert status == 200 and out["count_output_tokens"] >= 1
    assert lightllm_server.get("/health") == (200, {"message": "Ok"})


def wait_idle(server, limit_s: float) -> float:
    """Seconds until /token_load reads zero (fails past `limit_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if server.get("/token_load")[1]["current_load"] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"the KV cache is still in use {limit_s} s after the client hung up")


def test_hang_up_aborts_at_once(lightllm_server):
    # 100 tokens would take seconds; a hang-up must free the request's KV within a step or so.
    body = json.dumps({"inputs": "Count to a thousand.", "parameters": {"max_new_tokens": 100, "ignore_eos": True}})
    for path in ("/generate_stream", "/generate"):
        conn = http.client.HTTPConnection("127.0.0.1", lightllm_server.port, timeout=30)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        if path == "/generate_stream":
            response = conn.getresponse()
            assert response.readline().startswith(b"data:")  # generation is under way
        else:
            while lightllm_server.get("/token_load")[1]["current_load"] == 0:
                time.sleep(0.02)
        conn.sock.close()
        conn.close()
        assert wait_idle(lightllm_server, 1.5) < 1.5
