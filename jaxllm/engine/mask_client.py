"""The engine's side of the grammar mask worker (jaxllm.engine.mask_worker, a process of its own, so that the
grammar engine never waits for the engine process's GIL): `Grammars` starts a worker with the first constrained
request (a fresh one after a worker died), `MaskWorker` talks to one worker, and each constrained request holds a
`GrammarConstraint`: a key in the worker. A step's constrained rows go to the worker at once: the tokens they took
(`start_advance`, answered before the step's events are made) and the next step's rows (`start_fill`: written
by the worker into shared memory, copied into the step's mask just before its sampler)."""

from __future__ import annotations

import copy
import itertools
import logging
import mmap
import os
import signal
import subprocess
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from jaxllm.child import Channel, spawn_with, wait_or_kill

log = logging.getLogger(__name__)
START_TIMEOUT_S = 120.0  # the worker builds llguidance's tokenizer (~1 s) before it answers "start"


class MaskWorkerDied(RuntimeError):
    """The worker process is gone: the grammar state of its requests is lost."""


def tokenizer_json(tokenizer) -> str:
    """The model tokenizer as llguidance reads it: the Rust tokenizer's JSON (a slow tokenizer's fast twin)."""
    if not getattr(tokenizer, "is_fast", False):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path, use_fast=True, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"constrained decoding needs a fast tokenizer, none in {tokenizer.name_or_path}: "
                             f"{exc}") from None
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


class _Answer:
    """One awaited answer on the step channel (they come back in the order asked)."""

    __slots__ = ("value", "done")

    def __init__(self):
        self.value, self.done = None, False


class MaskWorker:
    """One worker process and the mask block [rows, words] shared with it. Control calls (compile, stats) from
    any thread, one at a time; step messages (advance, fill, drop) from the engine thread only."""

    def __init__(self, tokenizer_text: str, eos_ids, rows: int, words: int, threads: int | None = None):
        size = rows * words * 4
        fd = os.memfd_create("jaxllm-masks")  # anonymous: freed with the last process that maps it
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            # Not tied to the starting thread (a request's, maybe short-lived): the worker ends when its
            # channels close, which our process's end closes too.
            self.proc, sockets = spawn_with("jaxllm.engine.mask_worker", [str(fd)], sockets=2, pass_fds=(fd,),
                                            tied_to_thread=False)
        finally:
            os.close(fd)
        self.block = np.frombuffer(self._map, np.int32).reshape(rows, words)
        self._control, self._step = (Channel(s) for s in sockets)
        self._control_lock = threading.Lock()
        self._awaited: deque[_Answer] = deque()
        self._keys = itertools.count()
        self._fill_owner: object | None = None  # the fill whose rows the block holds (or will)
        self.died: str | None = None  # why the worker is gone
        self.answer_s = 0.0  # time the engine thread waited for step answers (read and reset by the engine)
        self._control.sock.settimeout(START_TIMEOUT_S)
        try:
            answer = self.call(("start", tokenizer_text, list(eos_ids), rows, words, threads))
        finally:
            self._control.sock.settimeout(None)
        if answer[0] != "ready":
            self.close()
            raise MaskWorkerDied(f"the grammar worker could not start: {answer[1]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    # --- control channel (any thread) ------------------------------------------------------------
    def call(self, message: tuple) -> tuple:
        with self._control_lock:
            self._raise_if_died()
            try:
                self._control.send(message)
                return self._control.receive()
            except (EOFError, OSError) as exc:
                raise self._gone(exc) from None

    def new_key(self) -> int:
        return next(self._keys)

    # --- step channel (the engine thread) --------------------------------------------------------
    def post(self, message: tuple) -> _Answer | None:
        """Send a step message; its answer to come (None for "drop", which has none)."""
        self._raise_if_died()
        try:
            self._step.send(message)
        except OSError as exc:
            raise self._gone(exc) from None
        if message[0] == "drop":
            return None
        answer = _Answer()
        self._awaited.append(answer)
        return answer

    def wait(self, answer: _Answer):
        """The worker's answer to a posted message (those posted before it are read first, in order)."""
        started = time.perf_counter()
        try:
            while not answer.done:
                self._raise_if_died()
                first = self._awaited.popleft()
                try:
                    first.value = self._step.receive()
                except (EOFError, OSError) as exc:
                    self._awaited.appendleft(first)
                    raise self._gone(exc) from None
                first.done = True
        finally:
            self.answer_s += time.perf_counter() - started
        return answer.value

    def start_fill(self, keys: list[int], owner: object) -> _Answer:
        self._fill_owner = owner
        return self.post(("fill", keys))

    def rows_of(self, owner: object, count: int) -> np.ndarray:
        """The block's first `count` rows, written for `owner`'s fill (no later fill has been asked since)."""
        if self._fill_owner is not owner:
            raise RuntimeError("the mask block was refilled before its rows were read")
        return self.block[:count]

    # --- life ---------------------------------------------------------------------------------------
    def _raise_if_died(self) -> None:
        if self.died is not None:
            raise MaskWorkerDied(self.died)

    def _gone(self, exc: BaseException) -> MaskWorkerDied:
        if self.died is None:
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exit code {code}" if code is not None else f"its channel failed: {exc}")
            self.died = f"the grammar worker (pid {self.proc.pid}) died ({how}): its requests' grammar state is lost"
            log.error("%s", self.died)
        return MaskWorkerDied(self.died)

    def close(self) -> None:
        """Stop the worker (it exits once its channels close)."""
        self.died = self.died or "the grammar worker was stopped"
        self._control.close()
        self._step.close()
        wait_or_kill(self.proc, 5)


class Grammars:
    """The engine's grammar service: compiles and checks grammars in the worker, makes requests' constraints,
    and replaces a dead worker on the next call (its requests fail; new ones get the new worker)."""

    def __init__(self, tokenizer, eos_ids, rows: int, words: int, threads: int | None = None):
        """rows, words: the mask block's shape (a step's constrained rows at most, the model's mask width);
        threads: the worker's llguidance threads (None: its default)."""
        if tokenizer is None:
            raise ValueError("constrained decoding needs the model's tokenizer")
        self._hf_tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self.rows, self.words, self.threads = rows, words, threads
        self._tokenizer_text: str | None = None
        self._worker: MaskWorker | None = None
        self._lock = threading.Lock()
        self.restarts = 0  # workers started after one died

    def worker(self) -> MaskWorker:
        """The live worker (started now if there is none, or if it died)."""
        with self._lock:
            if self._worker is None or self._worker.died is not None:
                if self._tokenizer_text is None:
                    self._tokenizer_text = tokenizer_json(self._hf_tokenizer)
                if self._worker is not None:  # it died: its constraints fail on their next step
                    self._worker.close()
                    self.restarts += 1
                self._worker = MaskWorker(self._tokenizer_text, self.eos_ids, self.rows, self.words, self.threads)
            return self._worker

    def _compile(self, spec, key_wanted: bool) -> tuple[MaskWorker, int | None, bool]:
        for attempt in range(2):  # a worker that died since the last call is replaced once
            worker = self.worker()
            key = worker.new_key() if key_wanted else None
            try:
                answer = worker.call(("compile", spec.kind, spec.value, spec.field, key))
            except MaskWorkerDied:
                if attempt:
                    raise
                continue
            if answer[0] == "invalid":
                raise ValueError(answer[1])
            if answer[0] != "ok":
                raise RuntimeError(f"the grammar worker failed to compile {spec.field}: {answer[1]}")
            return worker, key, answer[1]
        raise AssertionError("unreachable")

    def check(self, spec) -> None:
        """Compile a grammar (cached in the worker for the requests that follow); ValueError("<field>: reason")
        when it is invalid."""
        self._compile(spec, key_wanted=False)

    def constraint(self, spec) -> GrammarConstraint:
        """A fresh constraint for one request; ValueError("<field>: reason") for an invalid grammar."""
        worker, key, complete = self._compile(spec, key_wanted=True)
        return GrammarConstraint(worker, key, complete)

    def stats(self) -> dict:
        """The worker's counts: compiled grammars kept, live matchers (empty when no worker runs)."""
        with self._lock:
            worker = self._worker
        if worker is None or worker.died is not None:
            return {}
        return worker.call(("stats",))[1]

    def take_answer_s(self) -> float:
        """Seconds the engine thread waited for the worker's step answers since the last call."""
        worker = self._worker
        if worker is None:
            return 0.0
        waited, worker.answer_s = worker.answer_s, 0.0
        return waited

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None


class GrammarConstraint:
    """A request's grammar (TokenConstraint): a key of its matcher in the mask worker, and what the worker last
    said about it. Its steps' work goes to the worker with the other rows of the step (start_advance,
    start_fill)."""

    active = True

    def __init__(self, worker: MaskWorker, key: int, complete: bool):
        self._worker, self.key = worker, key
        self.complete = complete
        self._released = False

    def advance(self, token: int) -> None:
        error = GrammarConstraint.start_advance([(self, token)])()[0]
        if error is not None:
            raise ValueError(error)

    def fill(self, row: np.ndarray) -> None:
        mask = row[None]
        failed, _ = GrammarConstraint.start_fill([(self, 0)])(mask)
        if failed:
            raise ValueError(failed[0][1])

    def release(self) -> None:
        """The request ended: the worker drops its matcher."""
        if not self._released and self._worker.died is None:
            self._released = True
            try:
                self._worker.post(("drop", [self.key]))
            except MaskWorkerDied:
                pass

    @staticmethod
    def start_advance(entries: list[tuple["GrammarConstraint", int]]) -> Callable[[], list[str | None]]:
        """Send the tokens the rows took, per worker; the returned call gives, per entry, why it was refused."""
        by_worker = _by_worker(entries)
        asked = {}
        for worker, group in by_worker.items():
            try:
                asked[worker] = worker.post(("advance", [(c.key, token) for _, (c, token) in group]))
            except MaskWorkerDied:
                pass

        def finish() -> list[str | None]:
            errors: list[str | None] = [None] * len(entries)
            for worker, group in by_worker.items():
                try:
                    if worker not in asked:
                        raise MaskWorkerDied(worker.died)
                    answer = worker.wait(asked[worker])
                except MaskWorkerDied as exc:
                    for k, _ in group:
                        errors[k] = str(exc)
                    continue
                if answer[0] != "advanced":
                    for k, _ in group:
                        errors[k] = f"the grammar worker failed: {answer[1]}"
                    continue
                for (k, (constraint, _)), (error, complete) in zip(group, answer[1]):
                    errors[k] = error
                    constraint.complete = complete
            return errors

        return finish

    @staticmethod
    def start_fill(entries: list[tuple["GrammarConstraint", int]]) -> Callable[[np.ndarray], tuple[list, float]]:
        """Ask each worker for its rows of a step's mask; the returned call copies them into the mask and gives
        the rows that failed (row, why) and the workers' seconds spent filling."""
        by_worker = _by_worker(entries)
        owner = object()
        asked = {}
        for worker, group in by_worker.items():
            try:
                asked[worker] = worker.start_fill([c.key for _, (c, _) in group], owner)
            except MaskWorkerDied:
                pass

        def finish(mask: np.ndarray) -> tuple[list[tuple[int, str]], float]:
            failed, build_s = [], 0.0
            for worker, group in by_worker.items():
                rows = [i for _, (_, i) in group]
                try:
                    if worker not in asked:
                        raise MaskWorkerDied(worker.died)
                    answer = worker.wait(asked[worker])
                    if answer[0] != "filled":
                        raise RuntimeError(f"the grammar worker failed: {answer[1]}")
                    mask[rows] = worker.rows_of(owner, len(rows))
                    build_s += answer[1]
                except (MaskWorkerDied, RuntimeError) as exc:
                    failed.extend((i, str(exc)) for i in rows)
            return failed, build_s

        return finish


def _by_worker(entries: list) -> dict[MaskWorker, list[tuple[int, tuple]]]:
    """Entries (constraint, x) grouped by the worker holding the constraint, each with its index in entries."""
    groups: dict[MaskWorker, list] = {}
    for k, entry in enumerate(entries):
        groups.setdefault(entry[0]._worker, []).append((k, entry))
    return groups
