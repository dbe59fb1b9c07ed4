"""Structured output at the door: the constraint a request asks for, as a checked `Grammar`.

Every route's spelling ends here:
- OpenAI `response_format`: `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`;
- vLLM's extra fields `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`
  (a Lark or GBNF grammar);
- TGI `parameters.grammar`: `{"type": "json", "value": schema}` or `{"type": "regex", "value": ...}`;
- tool calls (`tools.py`) build their JSON schemas and come through `checked_grammar` too.

The grammar is compiled and checked here (`utils/grammar.py`), so a bad schema or regex is
refused (422 on TGI routes, 400 on OpenAI routes) with llguidance's words for the problem, and no
worker ever sees it.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from lightserve.httpserver.errors import validation_error
from lightserve.io_struct import Grammar
from lightserve.utils.grammar import GrammarError, compile_grammar

# "Any JSON object": what `response_format: {"type": "json_object"}` promises.
ANY_JSON_OBJECT = '{"type": "object"}'


def checked_grammar(kind: str, text: str, field: str) -> Grammar:
    """A `Grammar` llguidance accepts, or a validation error on `field` saying why not."""
    grammar = Grammar(kind, text)
    try:
        compile_grammar(grammar)
    except GrammarError as exc:
        raise validation_error(f"`{field}`: {exc}", field) from None
    return grammar


def schema_text(schema: Any, field: str) -> str:
    """A JSON schema given as an object (or as its JSON text) as JSON text."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, (dict, bool)):
        return json.dumps(schema)
    raise validation_error(f"`{field}` must be a JSON schema (an object)", field)


# ---- OpenAI ------------------------------------------------------------------------------------


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: Optional[str] = None
    # `schema` shadows a BaseModel attribute; the field is read under its JSON name.
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class GuidedFields(BaseModel):
    """The constraint fields both OpenAI routes accept (mixed into their request models)."""

    response_format: Optional[ResponseFormat] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None


def openai_grammar(req: GuidedFields) -> Optional[Grammar]:
    """The one constraint an OpenAI request asks for, checked; None without one."""
    given = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        given.append("response_format")
    given += [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
              if getattr(req, name) is not None]
    if len(given) > 1:
        raise validation_error(f"give only one of {', '.join(f'`{g}`' for g in given)}", given[1])
    if not given:
        return None
    if given[0] == "response_format":
        if fmt.type == "json_object":
            if fmt.json_schema is not None:
                raise validation_error("`response_format.json_schema` goes with `type: json_schema`",
                                       "response_format.json_schema")
            return checked_grammar("json_schema", ANY_JSON_OBJECT, "response_format")
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise validation_error("`response_format` of type `json_schema` needs `json_schema.schema`",
                                   "response_format.json_schema")
        return checked_grammar("json_schema", json.dumps(fmt.json_schema.schema_), "response_format.json_schema.schema")
    if given[0] == "guided_json":
        return checked_grammar("json_schema", schema_text(req.guided_json, "guided_json"), "guided_json")
    if given[0] == "guided_regex":
        return checked_grammar("regex", req.guided_regex, "guided_regex")
    if given[0] == "guided_choice":
        return checked_grammar("choice", json.dumps(req.guided_choice), "guided_choice")
    return checked_grammar("lark", req.guided_grammar, "guided_grammar")


# ---- TGI ---------------------------------------------------------------------------------------


def tgi_grammar(grammar: Any) -> Optional[Grammar]:
    """TGI's `parameters.grammar`: `{"type": "json", "value": schema}` or `{"type": "regex", "value": str}`."""
    field = "parameters.grammar"
    if grammar is None:
        return None
    if not isinstance(grammar, dict) or set(grammar) != {"type", "value"}:
        raise validation_error(f"`{field}` must be an object with `type` and `value`", field)
    kind, value = grammar["type"], grammar["value"]
    if kind == "json":
        return checked_grammar("json_schema", schema_text(value, f"{field}.value"), f"{field}.value")
    if kind == "regex":
        if not isinstance(value, str):
            raise validation_error(f"`{field}.value` must be a string (a regular expression)", f"{field}.value")
        return checked_grammar("regex", value, f"{field}.value")
    raise validation_error(f"`{field}.type` must be `json` or `regex`, got {kind!r}", f"{field}.type")
