"""Request-field checking shared by the wire formats: JSON types (422 when wrong), LightLLM's parameter
schema, and SamplingParams built, normalised and validated in LightLLM's order (400 when out of range).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from jaxllm.engine.request import SamplingParams
from jaxllm.server.errors import bad_shape, invalid

Check = Callable[[str, Any], Any]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _wrong(name: str, expected: str, value: Any) -> Exception:
    return bad_shape(f"{name}: expected {expected}, got {_json_type(value)}", name)


def integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    return value


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(name, "a number", value)
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong(name, "true or false", value)
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong(name, "a string", value)
    return value


def obj(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _wrong(name, "an object", value)
    return value


def logit_bias(name: str, value: Any) -> dict[int, float]:
    """OpenAI's logit_bias: an object of token ids (JSON keys: decimal strings) → biases."""
    biases = {}
    for key, bias in obj(name, value).items():
        token = str(key).strip()
        if not token.lstrip("-").isdigit():
            raise invalid(f"{name}: keys must be token ids (got {key!r})", name)
        biases[int(token)] = number(f"{name}[{key!r}]", bias)
    return biases


def nullable(check: Check) -> Check:
    """`check`, letting JSON null through as None."""

    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return checked


def stop_strings(name: str, value: Any) -> tuple[str, ...]:
    """null, one string or a list of strings → a tuple of non-empty strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _wrong(name, "a string or a list of strings", value)
    if any(s == "" for s in items):
        raise invalid(f"{name}: a stop sequence must not be empty", name)
    return tuple(items)


def decay_pair(name: str, value: Any) -> tuple[int, float]:
    """LightLLM's exponential_decay_length_penalty: [start index (int), factor (number)]."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _wrong(name, "a pair [start_index, factor]", value)
    return integer(f"{name}[0]", value[0]), number(f"{name}[1]", value[1])


# LightLLM's `parameters` (return_details is taken out before); defaults are SamplingParams' own.
LIGHTLLM_PARAMETERS: dict[str, Check] = {
    "best_of": integer,
    "n": nullable(integer),
    "do_sample": boolean,
    "presence_penalty": number,
    "frequency_penalty": number,
    "repetition_penalty": number,
    "exponential_decay_length_penalty": decay_pair,
    "temperature": number,
    "top_p": number,
    "top_k": integer,
    "ignore_eos": boolean,
    "max_new_tokens": integer,
    "min_new_tokens": integer,
    "stop_sequences": stop_strings,
    "skip_special_tokens": boolean,
    "add_spaces_between_special_tokens": boolean,
    "print_eos_token": boolean,
    "input_penalty": boolean,
}


def read_fields(body: Mapping[str, Any], schema: Mapping[str, Check], where: str) -> dict[str, Any]:
    """Type-check the keys of `body` that `schema` knows; an unknown key is a 422 naming it."""
    out = {}
    for key, value in body.items():
        check = schema.get(key)
        if check is None:
            raise bad_shape(f"{where}: unknown field {key!r}", f"{where}.{key}")
        out[key] = check(key, value)
    return out


def require(body: Mapping[str, Any], key: str, check: Check, where: str = "body") -> Any:
    if key not in body:
        raise bad_shape(f"{where}: missing field {key!r}", key)
    return check(key, body[key])


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams from checked fields: n defaults to best_of, then LightLLM's normalisation
    (do_sample false or temperature < 1e-5 → greedy), then its range checks (400 on failure)."""
    fields = dict(fields)
    if fields.get("n") is None:
        fields["n"] = fields.get("best_of", 1)
    params = SamplingParams(**fields).normalized()
    try:
        params.validate()
    except ValueError as exc:
        field = str(exc).split(":", 1)[0] if ":" in str(exc) else None
        raise invalid(str(exc), field) from None
    return params
