"""The constrained-decoding fields of each wire format → one `Guided` spec (ours, not LightLLM's at the seed):
OpenAI's `response_format`, vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` (also in
LightLLM's `parameters`), TGI's `grammar`. A request carries at most one; an invalid one is a 400 naming it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jaxllm.engine.request import Guided
from jaxllm.server.errors import bad_shape, invalid
from jaxllm.server.validation import obj, string

# Where each constraint may come from, in the order they are looked for.
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "response_format", "grammar")


def _schema_text(name: str, schema: Any) -> str:
    """A JSON schema given as an object (or a JSON string of one) → its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise invalid(f"{name}: the JSON schema is not valid JSON: {exc}", name) from None
    if not isinstance(schema, (dict, bool)):
        raise bad_shape(f"{name}: expected a JSON schema object", name)
    return json.dumps(schema)


def guided_json(name: str, value: Any) -> Guided:
    return Guided("json_schema", _schema_text(name, value), name)


def guided_regex(name: str, value: Any) -> Guided:
    return Guided("regex", string(name, value), name)


def guided_choice(name: str, value: Any) -> Guided:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise bad_shape(f"{name}: expected a non-empty list of non-empty strings", name)
    return Guided("choice", json.dumps(value), name)


def guided_grammar(name: str, value: Any) -> Guided:
    return Guided("lark", string(name, value), name)


def response_format(name: str, value: Any) -> Guided | None:
    """OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", ...}}."""
    value = obj(name, value)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Guided("json_object", "", name)
    if kind == "json_schema":
        spec = obj(f"{name}.json_schema", value.get("json_schema"))
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:  # OpenAI: a schema-less json_schema is any JSON object
            return Guided("json_object", "", name)
        return Guided("json_schema", _schema_text(f"{name}.json_schema.schema", schema), name)
    raise invalid(f"{name}.type: expected \"text\", \"json_object\" or \"json_schema\", got {kind!r}", f"{name}.type")


def tgi_grammar(name: str, value: Any) -> Guided | None:
    """TGI's {"type": "json" | "json_schema" | "regex", "value": schema or regex}."""
    value = obj(name, value)
    kind = value.get("type")
    if kind in ("json", "json_schema"):
        return Guided("json_schema", _schema_text(f"{name}.value", value.get("value")), name)
    if kind == "regex":
        return Guided("regex", string(f"{name}.value", value.get("value")), name)
    raise invalid(f"{name}.type: expected \"json\" or \"regex\", got {kind!r}", f"{name}.type")


# Type checks for request schemas (validation.read_fields): each gives a Guided (or None for "no constraint").
GUIDED_CHECKS = {
    "guided_json": guided_json,
    "guided_regex": guided_regex,
    "guided_choice": guided_choice,
    "guided_grammar": guided_grammar,
}


def take_guided(fields: dict) -> None:
    """Replace the checked constraint fields in `fields` by one `guided` entry (400 when several are set)."""
    given = [(k, fields.pop(k)) for k in GUIDED_FIELDS if k in fields]
    given = [(k, g) for k, g in given if g is not None]
    if len(given) > 1:
        names = ", ".join(k for k, _ in given)
        raise invalid(f"{given[1][0]}: only one output constraint per request (got {names})", given[1][0])
    if given:
        fields["guided"] = given[0][1]


async def check_guided(engine, guided: Guided | None) -> None:
    """Compile the grammar now (cached for the request's submit): an invalid one is a 400 naming its field. A
    grammar not seen before waits for the engine core's mask worker to compile it: on a worker thread, so that
    the event loop goes on streaming every other request meanwhile."""
    if guided is not None:
        await asyncio.to_thread(_check, engine, guided)


def _check(engine, guided: Guided) -> None:
    try:
        engine.check_guided(guided)
    except ValueError as exc:
        raise invalid(str(exc), guided.field) from None
