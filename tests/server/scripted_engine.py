"""An object with the engine's API (check_prompt, check_guided, submit, abort, token_load, tokenizer) that answers every
request with a fixed script of tokens: unit tests of the HTTP layer use it; e2e tests use the real engine."""

from __future__ import annotations

import asyncio
import re
import threading

from jaxllm.engine.group import member_params
from jaxllm.engine.request import SamplingParams, TokenEvent
from jaxllm.engine.scheduler import check_prompt

SCRIPT_TEXT = "Paris is the capital of France. It is a big city with many museums and parks."


class ScriptedStream:
    def __init__(self, engine: "ScriptedEngine", request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.engine = engine
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.aborted = False
        self.done = False
        self._events = self._generate()

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._events.__anext__()

    def _logprob(self, i: int) -> float:
        return -0.25 * (i + 1) - 0.01 * (self.params.seed or 0)

    async def _generate(self):
        p = self.params
        script = self.engine.script
        text = ""
        for i in range(p.max_new_tokens):
            await asyncio.sleep(self.engine.delay_s)
            if self.aborted:
                self.done = True
                yield TokenEvent(-1, "", 0.0, False, i, len(self.prompt_ids), True, "abort")
                return
            token_id = script[i % len(script)]
            piece = self.engine.tokenizer.decode([token_id])
            eos = token_id in self.engine.eos_ids and not p.ignore_eos
            if eos and not p.print_eos_token:
                piece = ""
            text += piece
            stop = next((s for s in p.stop_sequences if s in text), None)
            if stop is not None:
                cut = text.index(stop) + len(stop)
                piece = piece[: len(piece) - (len(text) - cut)]
            finished = eos or stop is not None or i + 1 == p.max_new_tokens
            reason = ("stop" if eos or stop else "length") if finished else None
            prompt_logprobs = None
            if i == 0 and p.prompt_logprobs:
                ids = self.prompt_ids
                prompt_logprobs = [[ids[j], {str(ids[j + 1]): -1.5}] for j in range(len(ids) - 1)]
            self.done = finished
            yield TokenEvent(token_id, piece, self._logprob(i), token_id in self.engine.special_ids, i + 1,
                             len(self.prompt_ids), finished, reason, prompt_logprobs, stop_sequence=stop)
            if finished:
                return


class ScriptedScore:
    """A reward model's answer: one event whose two-label score is derived from the prompt's length."""

    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.aborted = self.done = False

    def __aiter__(self):
        return self._score()

    async def _score(self):
        self.done = True
        event = TokenEvent(-1, "", 0.0, False, 0, len(self.prompt_ids), True, "stop")
        event.score = [len(self.prompt_ids) / 10, -1.0]
        yield event


class ScriptedEngine:
    def __init__(self, tokenizer, args, *, script_text: str = SCRIPT_TEXT, delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.args = args
        self.eos_ids = set(args.eos_id)
        self.special_ids = set(tokenizer.all_special_ids)
        self.script = tokenizer.encode(script_text)
        self.delay_s = delay_s
        self.submitted: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self.streams: dict[str, ScriptedStream] = {}
        self.image_processor = None  # a text model: requests with images are refused
        # check_guided waits for this (set: at once), as the engine client waits for the core's mask worker
        self.grammars_compiled = threading.Event()
        self.grammars_compiled.set()

    def check_guided(self, guided) -> None:
        """A grammar is "compiled" once `grammars_compiled` is set; a regex that does not compile is invalid."""
        self.grammars_compiled.wait(10)
        if guided.kind == "regex":
            try:
                re.compile(guided.value)
            except re.error as exc:
                raise ValueError(f"{guided.field}: invalid regular expression: {exc}") from None

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        return check_prompt(prompt_ids, params, self.args)  # the engine's own length checks

    def submit(self, prompt_ids, params, request_id=None) -> ScriptedStream:
        stream = ScriptedStream(self, request_id, list(prompt_ids), params)
        self.submitted.append((request_id, list(prompt_ids), params))
        self.streams[request_id] = stream
        return stream

    def submit_group(self, prompt_ids, params, request_ids, images=()) -> list[ScriptedStream]:
        """Independent members, member i with seed + i (the engine's rule); a text model takes no images."""
        assert not images, "the server let images through to a text model"
        return [self.submit(prompt_ids, member_params(params, i), rid) for i, rid in enumerate(request_ids)]

    def submit_score(self, prompt_ids, request_id=None) -> ScriptedScore:
        self.streams[request_id] = ScriptedScore(request_id, list(prompt_ids))
        return self.streams[request_id]

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.streams[request_id].aborted = True

    def token_load(self) -> dict:
        return {"current_load": 0, "logical_max_load": 0.0, "dynamic_max_load": 0.0}

    def stats(self) -> dict:
        running = sum(1 for s in self.streams.values() if not s.done)
        return {"running": running, "waiting": 0, "paused": 0, "token_load": self.token_load()}
