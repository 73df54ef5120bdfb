"""The grammar mask worker, `python -m jaxllm.engine.mask_worker CONTROL_FD STEP_FD MASK_FD`, started by the
engine (jaxllm.engine.mask_client) with the first constrained request: it owns every live constrained request's
llguidance matcher, so that taking tokens and filling masks run beside the engine's process, not inside its GIL.
Two channels (jaxllm.child.Channel), each answered in order:
- control, from the threads that submit, one call at a time: "start" (the tokenizer, the eos ids, the mask
  block's shape, llguidance's thread count), "compile" (a new request's grammar, or one only checked), "stats";
- step, from the engine thread: "advance" (the tokens constrained rows took; answered per request: why it was
  refused, and whether the grammar is complete), "fill" (the next step's rows, written into the shared mask
  block, row k for key k; answered when written), "drop" (requests that ended; not answered).
The mask block is int32 [rows, mask words] in memory shared with the engine (MASK_FD: a memfd it made)."""

from __future__ import annotations

import mmap
import selectors
import socket
import sys
import time

import llguidance
import numpy as np

from jaxllm.child import Channel
from jaxllm.engine.grammar import GrammarCompiler, StepRows


class MatcherTable:
    """The worker's state: the compiled grammars, the live requests' matchers by key, the shared mask block."""

    def __init__(self, tokenizer_json: str, eos_ids: list[int], rows: int, words: int, threads: int | None,
                 mask_fd: int):
        self.eos_ids = tuple(eos_ids)
        # One eos id for llguidance (versions before 1.9 take no list): StepRows allows, and stop
        # on, every id of the model's eos list once the grammar accepts.
        tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=self.eos_ids[0] if self.eos_ids else None)
        self.step_rows = StepRows(tokenizer.vocab_size, self.eos_ids, threads)
        # Two families per thread: a step's rows then seldom wait for another row of their family.
        self.compiler = GrammarCompiler(tokenizer, families=2 * self.step_rows.threads)
        self._map = mmap.mmap(mask_fd, rows * words * 4)
        self.block = np.frombuffer(self._map, np.int32).reshape(rows, words)
        self.matchers: dict = {}

    def handle(self, message: tuple):
        """One message's answer (None: it has none)."""
        kind, *body = message
        if kind == "drop":
            for key in body[0]:
                self.matchers.pop(key, None)
            return None
        try:
            return getattr(self, f"_{kind}")(*body)
        except ValueError as exc:
            return ("invalid", str(exc))
        except Exception as exc:  # noqa: BLE001 - the engine fails the requests concerned; the worker goes on
            return ("error", f"{type(exc).__name__}: {exc}")

    def _compile(self, kind: str, value: str, field: str, key):
        matcher = self.compiler.matcher(kind, value, field)
        if key is not None:
            self.matchers[key] = matcher
        return ("ok", matcher.is_stopped())

    def _stats(self):
        return ("stats", {"grammars": len(self.compiler), "matchers": len(self.matchers)})

    def _advance(self, entries: list[tuple[int, int]]):
        present = [(k, self.matchers[key], token) for k, (key, token) in enumerate(entries) if key in self.matchers]
        answers = [(None, True)] * len(entries)  # a dropped key: its request ended (the engine ignores the answer)
        errors = self.step_rows.take([(matcher, token) for _, matcher, token in present])
        for (k, matcher, _), error in zip(present, errors):
            answers[k] = (error, matcher.is_stopped())
        return ("advanced", answers)

    def _fill(self, keys: list[int]):
        if len(keys) > len(self.block):
            raise ValueError(f"{len(keys)} rows asked, the mask block holds {len(self.block)}")
        started = time.perf_counter()
        self.step_rows.fill([self.matchers.get(key) for key in keys], self.block[: len(keys)])
        return ("filled", time.perf_counter() - started)


def main(argv: list[str]) -> int:
    """Answer the engine until it closes either channel (it stopped, or its process is gone)."""
    control, step = (Channel(socket.socket(fileno=int(fd))) for fd in argv[:2])
    try:
        kind, *start = control.receive()
        assert kind == "start", kind
        table = MatcherTable(*start, mask_fd=int(argv[2]))
    except (EOFError, OSError):
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer llguidance cannot read: reported, then exit
        control.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    control.send(("ready", table.step_rows.words))
    selector = selectors.DefaultSelector()
    for channel in (control, step):
        selector.register(channel.sock, selectors.EVENT_READ, channel)
    while True:
        for ready, _ in selector.select():
            channel = ready.data
            try:
                answer = table.handle(channel.receive())
                if answer is not None:
                    channel.send(answer)
            except (EOFError, OSError):
                return 0


if __name__ == "__main__":
    from jaxllm.without_torch import hide_torch

    hide_torch()
    sys.exit(main(sys.argv[1:]))
