"""Tool-call text formats of the model families (Hermes / Qwen 2.5+ `<tool_call>` tags, Llama 3.1+ JSON,
Mistral `[TOOL_CALLS]`): how a call is written (the grammar that forces one), and the parsers that turn a
model's text back into OpenAI `tool_calls`, whole or as streamed deltas."""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from jaxllm.engine.grammar import JSON_OPTIONS

_DECODER = json.JSONDecoder()


def lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict

    def openai(self, index: int | None = None) -> dict:
        """The call as an OpenAI tool_calls entry (with its index, for a streamed delta)."""
        entry = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return entry if index is None else {"index": index, **entry}


def _call_from(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            return ToolCall(obj["name"], args) if isinstance(args, dict) else None
    return ToolCall(obj["name"], {})


def _json_values(text: str) -> tuple[list[Any], str]:
    """The JSON values written one after another in text (separated by blanks or ';'), and what is left."""
    values, at = [], 0
    while True:
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
        if at >= len(text):
            return values, ""
        try:
            value, at = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            return values, text[at:]
        values.append(value)


class ToolFormat(ABC):
    """One family's way of writing tool calls. `marker`: the text that opens the calls."""

    name: str
    marker: str
    args_key: str = "arguments"

    def call_schema(self, tools: list[dict]) -> dict:
        """The JSON schema of one call to any of `tools` (OpenAI function definitions)."""
        options = [{
            "type": "object",
            "properties": {"name": {"const": t["name"]},
                           self.args_key: t.get("parameters") or {"type": "object"}},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        } for t in tools]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return {**schema, "x-guidance": JSON_OPTIONS}  # llguidance's JSON options inside a Lark grammar

    @abstractmethod
    def grammar(self, tools: list[dict], marker: str) -> str:
        """Lark text forcing one call (complete once it is written: a small model would otherwise run on into
        more); `marker` is the marker as a Lark term (a literal, or a special token's id)."""

    @abstractmethod
    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole answer; text that holds no well-formed call is all content."""

    def complete_calls(self, calls_text: str) -> int:
        """How many calls of `calls_text` (the text from the marker on) are complete while it still grows
        (a stream may send those before the answer ends)."""
        return 0

    @abstractmethod
    def example(self) -> str:
        """How a call looks, for a system prompt when the chat template does not render tools."""


class HermesFormat(ToolFormat):
    """Hermes / Qwen 2.5+: each call `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

    name = "hermes"
    marker = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def grammar(self, tools, marker):
        return (f"start: {marker} {lark_literal(chr(10))} body {lark_literal(chr(10) + '</tool_call>')}\n"
                f"body: %json {json.dumps(self.call_schema(tools))}\n")

    def parse(self, text):
        calls = []
        for block in self._BLOCK.findall(text):
            call = _call_from(next(iter(_json_values(block)[0]), None), (self.args_key,))
            if call is None:
                return text, []
            calls.append(call)
        content = self._BLOCK.sub("", text)
        tail = content.find(self.marker)  # an unclosed last block (the answer ran out of tokens)
        if tail >= 0:
            values, rest = _json_values(content[tail + len(self.marker):])
            call = _call_from(values[0], (self.args_key,)) if len(values) == 1 and not rest.strip() else None
            if call is None:
                return text, []
            calls.append(call)
            content = content[:tail]
        return (content.strip() if calls else text), calls

    def complete_calls(self, calls_text):
        return len(self._BLOCK.findall(calls_text))

    def example(self):
        return '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>'


class Llama3JsonFormat(ToolFormat):
    """Llama 3.1+ JSON calls: `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`, several
    separated by `; `), the whole answer."""

    name = "llama3_json"
    marker = "<|python_tag|>"
    args_key = "parameters"

    def grammar(self, tools, marker):
        return f"start: {marker}? call\ncall: %json {json.dumps(self.call_schema(tools))}\n"

    def parse(self, text):
        body = text.strip()
        if body.startswith(self.marker):
            body = body[len(self.marker):]
        if not body.lstrip().startswith("{"):
            return text, []
        values, rest = _json_values(body)
        calls = [_call_from(v, ("parameters", "arguments")) for v in values]
        if not calls or rest.strip() or any(c is None for c in calls):
            return text, []
        return "", calls

    def example(self):
        return '{"name": "<function name>", "parameters": {<arguments>}}'


class MistralFormat(ToolFormat):
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`."""

    name = "mistral"
    marker = "[TOOL_CALLS]"

    def grammar(self, tools, marker):
        array = {"type": "array", "minItems": 1, "maxItems": 1, "items": self.call_schema(tools)}
        return f"start: {marker} {lark_literal(' ')}? calls\ncalls: %json {json.dumps(array)}\n"

    def parse(self, text):
        at = text.find(self.marker)
        if at < 0:
            return text, []
        values, rest = _json_values(text[at + len(self.marker):])
        items = values[0] if len(values) == 1 and isinstance(values[0], list) else values
        calls = [_call_from(v, (self.args_key,)) for v in items]
        if not calls or rest.strip() or any(c is None for c in calls):
            return text, []
        return text[:at].strip(), calls

    def example(self):
        return '[TOOL_CALLS] [{"name": "<function name>", "arguments": {<arguments>}}]'


TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat(), MistralFormat())}


def guess_format(chat_template: str | None) -> ToolFormat:
    """--tool_call_parser auto: the format the chat template writes (Hermes when it names none)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return TOOL_FORMATS["mistral"]
    if "<|python_tag|>" in template or "ipython" in template:
        return TOOL_FORMATS["llama3_json"]
    return TOOL_FORMATS["hermes"]


class ToolCallStream:
    """A streamed answer's text → OpenAI chat deltas: content as it comes (holding back what may open a call),
    each call once complete (at the latest when the answer ends)."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self.sent = 0  # content characters sent
        self.calls_at: int | None = None  # where the calls begin, once seen
        self.calls_sent = 0

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        deltas = []
        if self.calls_at is None:
            start = self._calls_start()
            if start is None:
                upto = len(self.text) - _partial_suffix(self.text, self._openers())
                if self._may_open_at_start():
                    upto = self.sent
                if upto > self.sent:
                    deltas.append({"content": self.text[self.sent:upto]})
                    self.sent = upto
                return deltas
            self.calls_at = start
            if start > self.sent:
                deltas.append({"content": self.text[self.sent:start]})
                self.sent = start
        complete = self.fmt.complete_calls(self.text[self.calls_at:])
        if complete > self.calls_sent:
            _, calls = self.fmt.parse(self.text)
            deltas += self._call_deltas(calls[self.calls_sent:complete])
        return deltas

    def finish(self) -> tuple[list[dict], bool]:
        """The deltas left when the answer ends, and whether it made any call."""
        _, calls = self.fmt.parse(self.text)
        deltas = []
        if calls:
            deltas += self._call_deltas(calls[self.calls_sent:])
        elif len(self.text) > self.sent:  # no call after all: the held-back text is content
            deltas.append({"content": self.text[self.sent:]})
            self.sent = len(self.text)
        return deltas, self.calls_sent > 0

    def _call_deltas(self, calls: list[ToolCall]) -> list[dict]:
        deltas = [{"tool_calls": [c.openai(self.calls_sent + k)]} for k, c in enumerate(calls)]
        self.calls_sent += len(calls)
        return deltas

    def _openers(self) -> tuple[str, ...]:
        return (self.fmt.marker,)

    def _may_open_at_start(self) -> bool:
        """Llama's calls are the whole answer: while the answer may still be a bare JSON call, hold it."""
        return isinstance(self.fmt, Llama3JsonFormat) and self.text.lstrip()[:1] in ("", "{") and self.sent == 0

    def _calls_start(self) -> int | None:
        at = self.text.find(self.fmt.marker)
        return None if at < 0 else at


def _partial_suffix(text: str, openers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `openers` (held back: it may grow into one)."""
    best = 0
    for opener in openers:
        for n in range(min(len(opener) - 1, len(text)), 0, -1):
            if text.endswith(opener[:n]):
                best = max(best, n)
                break
    return best
