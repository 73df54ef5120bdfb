"""RequestStream between the engine thread and asyncio readers: wake-ups gathered in a WakeBatch reach no
reader before `send()`, then every reader gets its events in order; a reader whose loop closed is reported."""

import asyncio
import threading

import pytest

from jaxllm.engine.request import TokenEvent
from jaxllm.engine.stream import RequestStream, WakeBatch


def event(i: int, finished: bool = False) -> TokenEvent:
    return TokenEvent(token_id=i, text=str(i), logprob=-0.5 * i, special=False, count_output_tokens=i + 1,
                      prompt_tokens=3, finished=finished, finish_reason="length" if finished else None)


class LoopThread:
    """An event loop on its own thread, like the server's."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def read_all(stream: RequestStream, first_seen: threading.Event) -> list[int]:
    ids = []
    async for e in stream:
        ids.append(e.token_id)
        first_seen.set()
    return ids


async def wait_for_waiter(stream: RequestStream) -> None:
    while stream._waiter is None:  # the reader is parked on its future
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("loops", [1, 2])
def test_batched_wakeups_deliver_every_event_in_order_only_after_send(loops):
    threads = [LoopThread() for _ in range(loops)]
    try:
        streams = [RequestStream(f"r{i}") for i in range(6)]
        seen = [threading.Event() for _ in streams]
        readers = [threads[i % loops].submit(read_all(s, f)) for i, (s, f) in enumerate(zip(streams, seen))]
        for i, s in enumerate(streams):
            threads[i % loops].submit(wait_for_waiter(s)).result(timeout=5)
        lengths = [3, 1, 4, 2, 5, 3]
        for step in range(max(lengths)):
            wakes = WakeBatch()
            for s, n in zip(streams, lengths):
                if step < n:
                    assert s.put(event(step, finished=step == n - 1), wakes)
            if step == 0:
                assert not any(f.wait(timeout=0.05) for f in seen)  # nothing woke before send()
            assert wakes.send() == []
        assert [r.result(timeout=5) for r in readers] == [list(range(n)) for n in lengths]
    finally:
        for t in threads:
            t.close()


def test_a_reader_whose_loop_closed_is_reported_by_send():
    alive, gone = LoopThread(), LoopThread()
    try:
        a, b = RequestStream("alive"), RequestStream("gone")
        reader = alive.submit(read_all(a, threading.Event()))
        orphan = gone.submit(read_all(b, threading.Event()))
        alive.submit(wait_for_waiter(a)).result(timeout=5)
        gone.submit(wait_for_waiter(b)).result(timeout=5)
        orphan.cancel()  # the reader goes with its loop (its parked future stays in the stream)
        gone.submit(asyncio.sleep(0.05)).result(timeout=5)  # the loop runs the cancellation
        gone.close()
        wakes = WakeBatch()
        assert a.put(event(0, finished=True), wakes) and b.put(event(0, finished=True), wakes)
        assert wakes.send() == ["gone"]
        assert reader.result(timeout=5) == [0]
    finally:
        alive.close()


def test_take_ready_takes_the_backlog_up_to_the_finished_event_without_waiting():
    stream = RequestStream("r")
    assert stream.take_ready() == []
    for i in range(3):
        stream.put(event(i, finished=i == 2))
    stream.put(event(9))  # nothing after the finished event is read
    assert next(stream).token_id == 0
    assert [e.token_id for e in stream.take_ready()] == [1, 2]
    assert stream.take_ready() == []
    assert list(stream) == []
