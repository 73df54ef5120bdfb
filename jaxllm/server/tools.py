"""Tool calling on /v1/chat/completions: `tools` and `tool_choice` checked, the tools rendered by the chat
template (or, when the template has no place for them, described in a system message), `required` and named
choices forced by a grammar, and the answer's text parsed into `tool_calls` (jaxllm.server.tool_parsers)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxllm.engine.detokenizer import special_ids
from jaxllm.engine.request import Guided
from jaxllm.server.errors import ApiError, bad_shape, invalid
from jaxllm.server.tool_parsers import TOOL_FORMATS, ToolCall, ToolCallStream, ToolFormat, guess_format, lark_literal
from jaxllm.server.validation import obj, require, string


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    """A chat request's tools: the functions offered, the family format, and whether a call is forced."""

    functions: list[dict]  # OpenAI function definitions: name, description, parameters
    fmt: ToolFormat
    forced: bool  # tool_choice required or named: the grammar makes the answer a call

    def message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """The assistant message of a finished answer, and its finish_reason ("tool_calls" when it calls)."""
        content, calls = self.fmt.parse(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        message = {"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]}
        return message, "tool_calls" if finish_reason == "stop" else finish_reason

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.fmt)


def tool_format(engine) -> ToolFormat:
    """--tool_call_parser: a named format, or `auto`'s guess from the chat template."""
    name = getattr(engine.args, "tool_call_parser", "auto")
    if name == "auto":
        return guess_format(getattr(engine.tokenizer, "chat_template", None))
    return TOOL_FORMATS[name]


def _function(i: int, tool: Any) -> dict:
    where = f"tools[{i}]"
    tool = obj(where, tool)
    if tool.get("type", "function") != "function":
        raise invalid(f"{where}.type: only \"function\" tools are supported", f"{where}.type")
    function = obj(f"{where}.function", require(tool, "function", obj, where))
    name = require(function, "name", string, f"{where}.function")
    if not name:
        raise invalid(f"{where}.function.name: must not be empty", f"{where}.function.name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_shape(f"{where}.function.parameters: expected a JSON schema object", f"{where}.function.parameters")
    return {"name": name, "description": function.get("description") or "",
            "parameters": parameters or {"type": "object", "properties": {}}}


def parse_tools(engine, body: dict) -> ToolCalling | None:
    """The request's ToolCalling (None without tools, or with tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice: needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad_shape("tools: expected a non-empty list of tools", "tools")
    try:
        functions = [_function(i, t) for i, t in enumerate(tools)]
    except ApiError as err:  # named in the message; the field is `tools`
        raise ApiError(err.status, err.message, param="tools") from None
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise invalid("tools: function names must be distinct", "tools")
    if choice is None or choice == "auto":
        forced = False
    elif choice == "none":
        return None
    elif choice == "required":
        forced = True
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise invalid(f"tool_choice: no tool named {name!r}", "tool_choice")
        functions, forced = [functions[names.index(name)]], True
    else:
        raise invalid('tool_choice: expected "none", "auto", "required" or {"type": "function", "function": '
                      '{"name": ...}}', "tool_choice")
    return ToolCalling(functions, tool_format(engine), forced)


def tool_grammar(engine, tools: ToolCalling) -> Guided:
    """The grammar forcing a call (tool_choice required or named)."""
    return Guided("lark", tools.fmt.grammar(tools.functions, _marker_term(engine.tokenizer, tools.fmt.marker)),
                  "tool_choice")


def _marker_term(tokenizer, marker: str) -> str:
    """The marker as a Lark term: its special token (by id) when the tokenizer has one, else the text."""
    token_id = tokenizer.convert_tokens_to_ids(marker) if tokenizer is not None else None
    special = special_ids(tokenizer)
    # (an unknown token converts to the unknown token's id, a special one too)
    if isinstance(token_id, int) and token_id in special and tokenizer.convert_ids_to_tokens(token_id) == marker:
        return f"<[{token_id}]>"
    return lark_literal(marker)


def template_messages(conversation: list[dict], tools: ToolCalling | None, chat_template: str | None) -> list[dict]:
    """The conversation as the template gets it: when the template has no place for tools, a system message
    describes them and how to call them."""
    if tools is None or "tools" in (chat_template or ""):
        return conversation
    described = "\n".join(json.dumps({"type": "function", "function": f}) for f in tools.functions)
    note = (f"You may call these functions:\n{described}\nTo call one, answer with {tools.fmt.example()}")
    if conversation and conversation[0]["role"] == "system":
        first = dict(conversation[0], content=f"{conversation[0]['content']}\n\n{note}")
        return [first, *conversation[1:]]
    return [{"role": "system", "content": note}, *conversation]


def assistant_tool_calls(where: str, message: dict) -> list[dict] | None:
    """An assistant message's earlier tool_calls, arguments as objects (what chat templates expect)."""
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise bad_shape(f"{where}.tool_calls: expected a list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        function = obj(f"{where}.tool_calls[{j}].function", obj(f"{where}.tool_calls[{j}]", call).get("function"))
        args = function.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            raise invalid(f"{where}.tool_calls[{j}].function.arguments: not valid JSON",
                          f"{where}.tool_calls") from None
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function.get("name"), "arguments": args}})
    return out


def calls_as_text(fmt: ToolFormat, calls: list[dict]) -> str:
    """Earlier calls written in the family's format (for templates that do not render tool_calls)."""
    as_calls = [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    if fmt.name == "hermes":
        return "\n".join(f'<tool_call>\n{json.dumps({"name": c.name, "arguments": c.arguments})}\n</tool_call>'
                         for c in as_calls)
    if fmt.name == "mistral":
        return "[TOOL_CALLS] " + json.dumps([{"name": c.name, "arguments": c.arguments} for c in as_calls])
    return "; ".join(json.dumps({"name": c.name, "parameters": c.arguments}) for c in as_calls)
