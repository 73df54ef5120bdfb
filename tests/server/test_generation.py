"""A stream read late: the events already waiting in an engine stream (a reader a step or more behind) leave in
one write, in order and complete, for each wire format; an error behind good events ends the stream after them."""

import json

from jaxllm.engine.request import TokenEvent
from jaxllm.engine.stream import RequestStream
from app_client import run


def token(i: int, *, last: int, error: bool = False) -> TokenEvent:
    finished = i == last
    reason = ("error" if error else "length") if finished else None
    return TokenEvent(token_id=300 + i, text=f" w{i}", logprob=-0.1 * (i + 1), special=False,
                      count_output_tokens=i + 1, prompt_tokens=2, finished=finished, finish_reason=reason,
                      error="device lost" if error and finished else None)


def with_backlog(state, backlogs: list[list[TokenEvent]]) -> None:
    """The engine answers each member of a request with a stream whose events all came before it is read."""

    def submit_group(prompt_ids, params, request_ids, images=()):
        streams = []
        for request_id, events in zip(request_ids, backlogs):
            stream = RequestStream(request_id)
            for e in events:
                stream.put(e)
            streams.append(stream)
        return streams

    state.engine.submit_group = submit_group


async def stream_chunks(client, path: str, body: dict) -> list[bytes]:
    """The body chunks of a streamed reply, as the server wrote them."""
    chunks = []
    async with client.request(path, method="POST", headers={"Content-Type": "application/json"}) as conn:
        await conn.send(json.dumps(body).encode())
        await conn.send_complete()
        while True:
            chunk = await conn.receive()
            if not chunk:
                break
            chunks.append(chunk)
    return chunks


def data_events(chunk: bytes) -> list[str]:
    parts = chunk.decode().split("\n\n")
    assert parts[-1] == ""
    return [p.split(":", 1)[1].strip() for p in parts[:-1]]


def test_lightllm_backlog_leaves_in_one_write(make_client):
    client, state = make_client()
    with_backlog(state, [[token(i, last=4) for i in range(5)]])
    chunks = run(stream_chunks(client, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}))
    assert len(chunks) == 1
    events = [json.loads(d) for d in data_events(chunks[0])]
    assert [e["token"]["id"] for e in events] == [300, 301, 302, 303, 304]
    assert [e["token"]["text"] for e in events] == [" w0", " w1", " w2", " w3", " w4"]
    assert [e["finished"] for e in events] == [False] * 4 + [True]


def test_tgi_backlog_leaves_in_one_write_with_the_whole_text_last(make_client):
    client, state = make_client("--use_tgi_api")
    with_backlog(state, [[token(i, last=2) for i in range(3)]])
    chunks = run(stream_chunks(client, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 3,
                                                                                            "details": True}}))
    events = [json.loads(d) for chunk in chunks for d in data_events(chunk)]
    assert len(chunks) == 1 and [e["token"]["id"] for e in events] == [300, 301, 302]
    assert [e["generated_text"] for e in events] == [None, None, " w0 w1 w2"]


def test_an_error_behind_good_events_ends_the_stream_after_them(make_client):
    client, state = make_client()
    with_backlog(state, [[token(i, last=2, error=True) for i in range(3)]])
    chunks = run(stream_chunks(client, "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}))
    events = [json.loads(d) for chunk in chunks for d in data_events(chunk)]
    assert [e["token"]["id"] for e in events[:2]] == [300, 301]
    assert events[2] == {"message": "generation failed: device lost"} and len(events) == 3


def test_openai_choices_backlogs_all_arrive_in_order(make_client):
    client, state = make_client()
    with_backlog(state, [[token(i, last=3) for i in range(4)], [token(i, last=1) for i in range(2)]])
    body = {"model": "m", "prompt": "Hi", "max_tokens": 4, "n": 2, "stream": True}
    chunks = run(stream_chunks(client, "/v1/completions", body))
    datas = [d for chunk in chunks for d in data_events(chunk)]
    assert datas[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    finishes = {}
    for d in datas[:-1]:
        (choice,) = json.loads(d)["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: " w0 w1 w2 w3", 1: " w0 w1"} and finishes == {0: "length", 1: "length"}
    assert len(chunks) < len(datas)  # tokens that waited together were written together
