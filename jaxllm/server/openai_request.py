"""OpenAI request bodies → prompts and SamplingParams: /v1/chat/completions (the tokenizer's chat template)
and /v1/completions, with LightLLM's extras (do_sample, top_k, ignore_eos); unsupported features are a 400.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.engine.request import MAX_TOP_LOGPROBS, SamplingParams
from jaxllm.server.errors import ApiError, invalid
from jaxllm.server.generation import check_prompt
from jaxllm.server.images import ImageRef, check_placeholders, image_url_part
from jaxllm.server.tool_parsers import TOOL_FORMATS, ToolFormat
from jaxllm.server.tools import (
    ToolCalling,
    assistant_tool_calls,
    calls_as_text,
    parse_tools,
    template_messages,
    tool_format,
    tool_grammar,
)
from jaxllm.server.guided import GUIDED_CHECKS, GUIDED_FIELDS, response_format, take_guided
from jaxllm.server.validation import (
    boolean,
    integer,
    logit_bias,
    nullable,
    number,
    obj,
    require,
    sampling_params,
    stop_strings,
    string,
)

# Fields both endpoints take, with LightLLM's extras; null means "default" as OpenAI clients send it.
COMMON_FIELDS = {
    "temperature": nullable(number),
    "top_p": nullable(number),
    "n": nullable(integer),
    "stream": nullable(boolean),
    "stream_options": nullable(obj),
    "stop": stop_strings,
    "max_tokens": nullable(integer),
    "presence_penalty": nullable(number),
    "frequency_penalty": nullable(number),
    "seed": nullable(integer),
    "logit_bias": nullable(logit_bias),
    "user": nullable(string),
    "do_sample": nullable(boolean),
    "top_k": nullable(integer),
    "ignore_eos": nullable(boolean),
    "use_beam_search": nullable(boolean),  # vLLM's extra: beam search (this server must run --beam_mode)
    "response_format": nullable(response_format),
    **{name: nullable(check) for name, check in GUIDED_CHECKS.items()},
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "max_completion_tokens": nullable(integer),
    "logprobs": nullable(boolean),
    "top_logprobs": nullable(integer),
}
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "logprobs": nullable(integer),
    "echo": nullable(boolean),
    "best_of": nullable(integer),
}
# Our SamplingParams names → the OpenAI field a client sent (chat has no best_of: n is its sample count).
_COMPLETION_NAMES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop", "n": "best_of"}
_CHAT_NAMES = {**_COMPLETION_NAMES, "best_of": "n", "n": "n"}


@dataclasses.dataclass
class OpenAIRequest:
    model: str
    prompts: list[list[int]]  # one per prompt (chat: exactly one)
    prompt_texts: list[str]
    params: SamplingParams  # best_of samples per prompt
    n: int  # choices returned per prompt (the best n of best_of)
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool = False
    top_logprobs: int = 0  # alternatives reported per token (chat: top_logprobs; completions: logprobs)
    tools: ToolCalling | None = None  # chat with tools: the answer is parsed into tool_calls
    images: list[ImageRef] = dataclasses.field(default_factory=list)  # chat: its image_url parts, not loaded yet


def _any(name: str, value: Any) -> Any:
    return value


def _fields(body: dict, schema: dict) -> dict:
    """The known fields, type-checked; others are ignored, as LightLLM's (pydantic) models did."""
    return {k: schema[k](k, v) for k, v in body.items() if k in schema}


def _refuse_unsupported(body: dict) -> None:
    if body.get("function_call") not in (None, "none"):
        raise invalid("function_call: function calling is not supported", "function_call")
    if body.get("functions"):
        raise invalid("functions: the legacy function calling is not supported (use tools)", "functions")
    if body.get("suffix") is not None:
        raise invalid("suffix: not supported", "suffix")


def _beam_search(engine, f: dict, best_of: int, stream: bool) -> None:
    """vLLM's use_beam_search: this server's --beam_mode runs every best_of > 1 request as a beam search."""
    beam_mode = engine.args.beam_mode
    wanted = f.get("use_beam_search")
    if wanted and not beam_mode:
        raise invalid("use_beam_search: this server does not run --beam_mode", "use_beam_search")
    if wanted and best_of < 2:
        raise invalid("use_beam_search: beam search needs n (or best_of) > 1: the beam width", "use_beam_search")
    if beam_mode and best_of > 1 and wanted is False:
        raise invalid("use_beam_search: this server runs --beam_mode, where n (best_of) > 1 is a beam search",
                      "use_beam_search")
    if beam_mode and best_of > 1 and stream:
        raise invalid("stream: beam search results come when the search ends; streaming needs n == 1", "stream")


def _top_logprobs(name: str, k: int | None) -> int:
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise invalid(f"{name}: must be between 0 and {MAX_TOP_LOGPROBS} (got {k})", name)
    return k or 0


def _sampling(f: dict, *, max_tokens: int, best_of: int, names: dict[str, str], top_logprobs: int = 0) -> SamplingParams:
    temperature = f.get("temperature")
    do_sample = f.get("do_sample")
    if do_sample is None:  # OpenAI clients expect a positive temperature to sample
        do_sample = temperature is not None and temperature > 0
    fields = {
        "do_sample": do_sample,
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if f.get("top_p") is None else f["top_p"],
        "top_k": -1 if f.get("top_k") is None else f["top_k"],
        "presence_penalty": f.get("presence_penalty") or 0.0,
        "frequency_penalty": f.get("frequency_penalty") or 0.0,
        "ignore_eos": bool(f.get("ignore_eos")),
        "max_new_tokens": max_tokens,
        "stop_sequences": f.get("stop", ()),
        "best_of": best_of,
        "n": best_of,
        "seed": f.get("seed"),
        "top_logprobs": top_logprobs,
        "logit_bias": f.get("logit_bias") or (),
        **{name: f[name] for name in GUIDED_FIELDS if f.get(name) is not None},
    }
    take_guided(fields)
    try:
        return sampling_params(fields)
    except ApiError as err:
        name = names.get(err.param or "", err.param)
        message = err.message if name == err.param else f"{name}{err.message[len(err.param):]}"
        raise invalid(message, name) from None


def _common(body: dict, f: dict) -> tuple[str, int, bool, bool]:
    model = require(body, "model", string)
    n = 1 if f.get("n") is None else f["n"]
    stream = bool(f.get("stream"))
    options = f.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options: only allowed when stream is true", "stream_options")
    include_usage = bool(nullable(boolean)("stream_options.include_usage", (options or {}).get("include_usage")))
    return model, n, stream, include_usage


def _message_text(i: int, message: Any, fmt: ToolFormat, template: str, images: ChatImages) -> dict:
    where = f"messages[{i}]"
    message = obj(where, message)
    role = require(message, "role", string, where)
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # content parts: text, and images where the model takes them
        texts = []
        for j, part in enumerate(content):
            part = obj(f"{where}.content[{j}]", part)
            if part.get("type") == "image_url":
                texts.append(images.add(image_url_part(f"{where}.content[{j}]", part)))
            elif part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content[{j}]: only text and image_url parts are supported", f"{where}.content")
            else:
                texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise invalid(f"{where}.content: expected a string or a list of content parts", f"{where}.content")
    out = {"role": role, "content": content}
    calls = assistant_tool_calls(where, message) if role == "assistant" else None
    if calls and "tool_calls" in template:
        out["tool_calls"] = calls
    elif calls:  # the template does not render calls: write them as the model would have
        out["content"] = "\n".join(filter(None, (content, calls_as_text(fmt, calls))))
    for key in ("tool_call_id", "name"):
        if role == "tool" and isinstance(message.get(key), str):
            out[key] = message[key]
    return out


_IMAGE_MARK = "\x00image\x00"  # an image part's place in a message's text, before the template sees it


@dataclasses.dataclass
class ChatImages:
    """The image_url parts of a chat, in order. A template that renders image parts (LLaVA's, Qwen2-VL's:
    transformers' processors give them `{"type": "image"}` items) gets every message's content as parts; to
    another template an image is the model's `placeholder` and a newline inside the text."""

    placeholder: str = ""
    refs: list[ImageRef] = dataclasses.field(default_factory=list)
    structured: bool = False  # the template renders image parts (set by chat_prompt)

    def add(self, ref: ImageRef) -> str:
        self.refs.append(ref)
        return _IMAGE_MARK if self.structured else self.placeholder + "\n"

    def as_parts(self, message: dict) -> dict:
        """`message` with its content as text and image parts (images where `add` marked them)."""
        pieces = message["content"].split(_IMAGE_MARK)
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return dict(message, content=parts)


def renders_image_parts(template: str) -> bool:
    """Whether a chat template handles `{"type": "image"}` content parts."""
    return "'image'" in template or '"image"' in template


def chat_prompt(tokenizer, messages: Any, tools: ToolCalling | None = None,
                fmt: ToolFormat | None = None, images: ChatImages | None = None) -> tuple[str, list[int]]:
    """The tokenizer's chat template applied to the messages (and tools), with the assistant's turn opened;
    `images` collects the image parts."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: expected a non-empty list of messages", "messages")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise invalid("messages: this model's tokenizer has no chat template; use /v1/completions", "messages")
    fmt = fmt or (tools.fmt if tools else TOOL_FORMATS["hermes"])
    images = images if images is not None else ChatImages()
    images.structured = bool(images.placeholder) and renders_image_parts(template)
    conversation = [_message_text(i, m, fmt, template, images) for i, m in enumerate(messages)]
    conversation = template_messages(conversation, tools, template)
    if images.structured:
        conversation = [images.as_parts(m) for m in conversation]
    extra = {"tools": [{"type": "function", "function": f} for f in tools.functions]} if tools else {}
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as exc:  # jinja raises TemplateError (and others) for conversations a template refuses
        raise invalid(f"messages: the chat template refused them: {exc}", "messages") from None
    # The template writes the special tokens itself.
    return text, tokenizer.encode(text, add_special_tokens=False)


def parse_chat(engine, body: Any) -> OpenAIRequest:
    body = obj("body", body)
    _refuse_unsupported(body)
    f = _fields(body, CHAT_FIELDS)
    model, n, stream, include_usage = _common(body, f)
    top = _top_logprobs("top_logprobs", f.get("top_logprobs"))
    if top and not f.get("logprobs"):
        raise invalid("top_logprobs: needs logprobs: true", "top_logprobs")
    _beam_search(engine, f, n, stream)
    max_tokens = f.get("max_tokens") if f.get("max_tokens") is not None else f.get("max_completion_tokens")
    params = _sampling(f, max_tokens=16 if max_tokens is None else max_tokens, best_of=n, names=_CHAT_NAMES,
                       top_logprobs=top)
    tools = parse_tools(engine, body)
    if tools is not None:
        params = _with_tools(engine, params, tools)
    images = ChatImages(engine.config.vision.placeholder if engine.image_processor is not None else "")
    text, ids = chat_prompt(engine.tokenizer, require(body, "messages", _any), tools, tool_format(engine), images)
    ids = check_prompt(engine, ids, params, "messages")
    check_placeholders(engine, ids, images.refs, "messages")
    return OpenAIRequest(model, [ids], [text], params, n, stream, include_usage, bool(f.get("logprobs")),
                         top_logprobs=top, tools=tools, images=images.refs)


def _with_tools(engine, params: SamplingParams, tools: ToolCalling) -> SamplingParams:
    """A forced call's grammar; special tokens kept in the text (a family's call marker may be one)."""
    changes: dict[str, Any] = {"skip_special_tokens": False}
    if tools.forced:
        if params.guided is not None:
            raise invalid(f"tool_choice: a forced tool call cannot be combined with {params.guided.field}",
                          "tool_choice")
        changes["guided"] = tool_grammar(engine, tools)
    return dataclasses.replace(params, **changes)


def _prompts(tokenizer, prompt: Any) -> tuple[list[str], list[list[int]]]:
    """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt: expected a string, a list of strings or token ids, or a list of those", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    texts, ids = [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            texts.append(p)
            ids.append(tokenizer.encode(p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = len(tokenizer)
            if not all(0 <= t < vocab for t in p):
                raise invalid(f"prompt[{i}]: token ids must be in [0, {vocab})", "prompt")
            texts.append(tokenizer.decode(p))
            ids.append(list(p))
        else:
            raise invalid(f"prompt[{i}]: expected a non-empty string or a non-empty list of token ids", "prompt")
    return texts, ids


def parse_completion(engine, body: Any) -> OpenAIRequest:
    body = obj("body", body)
    _refuse_unsupported(body)
    f = _fields(body, COMPLETION_FIELDS)
    model, n, stream, include_usage = _common(body, f)
    best_of = n if f.get("best_of") is None else f["best_of"]
    if best_of < n:
        raise invalid(f"best_of: must be >= n ({n}), got {best_of}", "best_of")
    if stream and best_of != n:
        raise invalid("best_of: streaming requires best_of == n", "best_of")
    logprobs = f.get("logprobs")
    top = _top_logprobs("logprobs", logprobs)
    _beam_search(engine, f, best_of, stream)
    echo = bool(f.get("echo"))
    max_tokens = 16 if f.get("max_tokens") is None else f["max_tokens"]
    names = _CHAT_NAMES if f.get("best_of") is None else _COMPLETION_NAMES  # name what the client sent
    params = _sampling(f, max_tokens=max_tokens, best_of=best_of, names=names, top_logprobs=top)
    if echo and logprobs is not None and not stream:  # the echoed prompt's tokens with their logprobs (as vLLM's)
        params = dataclasses.replace(params, prompt_logprobs=True)
    texts, prompts = _prompts(engine.tokenizer, require(body, "prompt", _any))
    prompts = [check_prompt(engine, ids, params, "prompt") for ids in prompts]
    return OpenAIRequest(model, prompts, texts, params, n, stream, include_usage, logprobs is not None, echo,
                         top_logprobs=top)
