"""Tool-call formats: each family's text (Hermes `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`) parsed into
OpenAI tool_calls, whole and streamed in pieces; text without a call stays content; each format's grammar
forces one call its parser reads; `auto` guesses the format from the chat template."""

import json

import llguidance
import llguidance.hf
import pytest

from jaxllm.args import TOOL_CALL_PARSERS
from jaxllm.server.tool_parsers import TOOL_FORMATS, guess_format, lark_literal
from jaxllm.server.tools import calls_as_text

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
CALLS = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]

ANSWERS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
               "Let me check."),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}', ""),
    "mistral": ('Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', "Sure."),
}


def as_pairs(openai_calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in openai_calls]


def stream_all(fmt, text, size):
    stream = fmt_stream(fmt)
    deltas = []
    for at in range(0, len(text), size):
        deltas += stream.feed(text[at:at + size])
    more, called = stream.finish()
    return deltas + more, called


def fmt_stream(fmt):
    from jaxllm.server.tool_parsers import ToolCallStream
    return ToolCallStream(fmt)


@pytest.mark.parametrize("name", list(ANSWERS))
def test_each_format_parses_whole_answers(name):
    fmt = TOOL_FORMATS[name]
    text, content = ANSWERS[name]
    got_content, calls = fmt.parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in calls] == CALLS
    assert all(c.openai()["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("name", list(ANSWERS))
@pytest.mark.parametrize("size", [1, 3, 17])
def test_each_format_streams_the_same_calls_and_content(name, size):
    fmt = TOOL_FORMATS[name]
    text, content = ANSWERS[name]
    deltas, called = stream_all(fmt, text, size)
    assert called
    streamed_content = "".join(d.get("content", "") for d in deltas)
    assert streamed_content.strip() == content
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == list(range(len(CALLS)))
    assert as_pairs(calls) == CALLS


@pytest.mark.parametrize("name", list(ANSWERS))
def test_text_without_a_call_is_content_whole_and_streamed(name):
    fmt = TOOL_FORMATS[name]
    for text in ["The weather is fine {really}.", "{not json at all", "Use <tool and [TOOL then stop"]:
        assert fmt.parse(text) == (text, [])
        deltas, called = stream_all(fmt, text, 2)
        assert not called and "".join(d["content"] for d in deltas) == text


def test_an_unclosed_hermes_call_at_the_end_still_parses():
    content, calls = TOOL_FORMATS["hermes"].parse('<tool_call>\n{"name": "get_time", "arguments": {}}')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_time", {})]


@pytest.fixture(scope="module")
def lltokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    return tok, llguidance.hf.from_tokenizer(tok)


@pytest.mark.parametrize("name", list(ANSWERS))
def test_each_grammar_forces_one_call_its_parser_reads_and_refuses_other_tools(name, lltokenizer):
    tok, lltok = lltokenizer
    fmt = TOOL_FORMATS[name]
    grammar = llguidance.LLMatcher.grammar_from_lark(fmt.grammar([WEATHER, TIME], lark_literal(fmt.marker)))
    text = calls_as_text(fmt, [{"function": {"name": n, "arguments": a}} for n, a in CALLS[:1]])
    if name == "llama3_json":
        text = fmt.marker + text
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert matcher.consume_tokens(tok.encode(text)) and matcher.is_stopped(), matcher.get_error()
    assert [(c.name, c.arguments) for c in fmt.parse(text)[1]] == CALLS[:1]
    only_time = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(
        fmt.grammar([TIME], lark_literal(fmt.marker))))
    assert only_time.validate_tokens(tok.encode(text)) < len(tok.encode(text))  # get_weather is not allowed


def test_auto_guesses_the_format_from_the_chat_template():
    assert guess_format("{{ '<tool_call>' }}").name == "hermes"
    assert guess_format("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert guess_format("<|start_header_id|>ipython<|end_header_id|>").name == "llama3_json"
    assert guess_format(None).name == "hermes"
    assert TOOL_CALL_PARSERS == ["auto", *TOOL_FORMATS]


def test_a_marker_is_a_special_token_only_when_the_tokenizer_has_one(lltokenizer):
    from jaxllm.server.tools import _marker_term
    tok, _ = lltokenizer
    assert _marker_term(tok, "<tool_call>") == '"<tool_call>"'  # unknown: not the unknown token's id
    assert _marker_term(tok, "<|im_end|>") == f"<[{tok.convert_tokens_to_ids('<|im_end|>')}]>"
