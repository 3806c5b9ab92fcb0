"""The request fields that constrain an output to a grammar (serving/structured.py), as vLLM reads
them: OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` {json,
regex, choice, grammar, json_object} and its older `guided_json` / `guided_regex` / `guided_choice`
/ `guided_grammar`. Each grammar is compiled here, in a parser thread, so a malformed one is a 400
naming the field and the problem, and the engine thread only copies the compiled matcher."""

from __future__ import annotations

from serving.server.errors import ApiError, bad
from serving.structured import StructuredOutputs

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
OPTIONS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


def requested(body: dict) -> tuple[StructuredOutputs | None, str | None]:
    """(the constraint, the field that asked for it); (None, None) for free text."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None:
        found.append((_response_format(fmt), "response_format"))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict) or set(so) - set(OPTIONS):
            raise bad(f"structured_outputs must be an object with one of json, regex, choice, grammar, json_object "
                      f"(and disable_any_whitespace), got {so!r:.200}", "structured_outputs")
        found.append((_spec(so, "structured_outputs"), "structured_outputs"))
    for field, kind in GUIDED.items():
        if body.get(field) is not None:
            found.append((_spec({kind: body[field]}, field), field))
    found = [(spec, field) for spec, field in found if spec is not None]
    if len(found) > 1:
        raise bad(f"only one field may constrain the output, got {', '.join(f for _, f in found)}", found[1][1])
    return found[0] if found else (None, None)


def _spec(raw: dict, field: str) -> StructuredOutputs:
    try:
        return StructuredOutputs(**raw)
    except (TypeError, ValueError) as e:
        raise bad(f"{field}: {e}", field) from None


def _response_format(fmt) -> StructuredOutputs | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema", inner.get("json_schema")) if isinstance(inner, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise bad("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                      "response_format")
        return _spec({"json": schema if isinstance(schema, dict) else ("{}" if schema else '{"not": {}}')},
                     "response_format")
    if kind == "structural_tag":
        raise ApiError(400, "response_format structural_tag is not supported by this server", "response_format",
                       "unsupported")
    raise bad(f'response_format type must be "text", "json_object" or "json_schema", got {fmt!r:.200}',
              "response_format")


def compile_check(grammars, spec: StructuredOutputs, field: str) -> None:
    """Compiles the grammar now (cached for the engine): a 400 naming the field if llguidance refuses it."""
    try:
        grammars.compile(spec)
    except ValueError as e:
        raise bad(f"{field}: {e}", field) from None
