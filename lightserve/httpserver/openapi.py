"""The OpenAPI 3.1 document served at `GET /openapi.json`.

Request bodies are the JSON schemas of the pydantic models the routes parse with, so the
document follows the parser's field names and types by construction. The checks that live
outside the models are written into those schemas from the same constants the checks use:
ranges of `SamplingParams.validate`, the token budget of `--max_req_total_len` and the KV pool,
stop-string and choice limits, the neutral values of unsupported fields, the served model name.
What JSON Schema cannot say (a prompt's length in tokens, `n` times the number of prompts,
`top_logprobs` needing `logprobs`) is left to the descriptions; the document never allows less
than the server accepts, so every body it calls invalid is refused (tests/test_fuzz_openapi.py
sends schema-violating bodies and checks that).

Responses list every status a route answers, with the error shape of its API family.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import models_json_schema

from lightserve.httpserver import openai_params, tgi_params
from lightserve.httpserver.openai_params import MAX_CHOICES, MAX_TOP_LOGPROBS, ChatCompletionRequest, CompletionRequest
from lightserve.httpserver.params import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, token_limit
from lightserve.io_struct import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY
from lightserve.httpserver.tgi_params import TGIRequest
from lightserve.server_args import ServerArgs

Schema = dict[str, Any]

_REF = "#/components/schemas/{model}"

# The ranges `SamplingParams.validate` (and `params.finalize_sampling`) enforce;
# tests/test_fuzz_openapi.py checks each bound.
SAMPLING_RANGES: dict[str, Schema] = {
    "temperature": {"minimum": 0, "maximum": 100},
    "top_p": {"exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"minimum": -1},
    "repetition_penalty": {"minimum": MIN_REPETITION_PENALTY, "maximum": MAX_REPETITION_PENALTY},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "seed": {"minimum": 0, "maximum": 2**63 - 1},
}

_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_TGI_ERROR: Schema = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": _STRING, "error_type": _STRING},
}
_OPENAI_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": _STRING, "type": _STRING, "param": _NULLABLE_STRING, "code": _NULLABLE_STRING},
    }},
}
_RESPONSE_SCHEMAS: dict[str, Schema] = {
    "TGIError": _TGI_ERROR,
    "OpenAIError": _OPENAI_ERROR,
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "GenerateResponse": {
        "type": "object",
        "required": ["generated_text"],
        "properties": {"generated_text": _STRING, "details": {"type": "object"}},
    },
    "ModelCard": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": _STRING, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STRING,
                       "max_model_len": {"type": "integer"}},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"},
                       "data": {"type": "array", "items": {"$ref": _REF.format(model="ModelCard")}}},
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {"id": _STRING, "object": _STRING, "created": {"type": "integer"}, "model": _STRING,
                       "choices": {"type": "array", "items": {"type": "object"}}, "usage": {"type": "object"}},
    },
}

_ERROR_TEXT = {
    400: "invalid request (the message names the field in `param`)",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body over --max_body_bytes (multimodal servers add room for the images a request may carry)",
    415: "a Content-Type other than application/json",
    422: "invalid request (the message names the field), including an unreadable, oversized or remote image",
    429: "overloaded: --running_max_req_size + --max_waiting_reqs generations are in flight, or (images) every "
         "image-cache record is in use; retry later",
    500: "the generation failed",
    503: "the server lost one of its processes or is shutting down",
}


def openapi_document(args: ServerArgs, model_name: str, vocab_size: int) -> Schema:
    """The document for a server started with `args`, serving `model_name`."""
    schemas = {**_request_schemas(args, model_name, vocab_size), **copy.deepcopy(_RESPONSE_SCHEMAS)}
    doc: Schema = {
        "openapi": "3.1.0",
        "info": {"title": "lightserve", "version": "1", "description":
                 "TGI-compatible and OpenAI-compatible text generation. Errors are JSON: "
                 "`{error, error_type}` on TGI routes, `{error: {message, type, param, code}}` under /v1/."},
        "paths": _paths(bool(args.api_key)),
        "components": {"schemas": schemas},
    }
    if args.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


# ---- request bodies --------------------------------------------------------------------------


def _request_schemas(args: ServerArgs, model_name: str, vocab_size: int) -> dict[str, Schema]:
    _, top = models_json_schema(
        [(TGIRequest, "validation"), (CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
        ref_template=_REF,
    )
    schemas: dict[str, Schema] = top["$defs"]
    # A prompt has at least one token, so at most token_limit - 1 can be generated.
    new_tokens = {"minimum": 1, "maximum": token_limit(args) - 1}
    _tgi(schemas, args, new_tokens)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _openai_common(schemas[name], model_name, new_tokens)
    _completion(schemas["CompletionRequest"]["properties"], vocab_size)
    _chat(schemas, new_tokens, args)
    _images(schemas, args)
    return schemas


def _tgi(schemas: dict[str, Schema], args: ServerArgs, new_tokens: Schema) -> None:
    request = schemas["TGIRequest"]["properties"]
    request["inputs"]["minLength"] = 1
    # `"parameters": null` means the defaults.
    request["parameters"] = {"anyOf": [{"$ref": _REF.format(model="TGIParameters")}, {"type": "null"}]}
    parameters = schemas["TGIParameters"]
    props = parameters["properties"]
    _sampling_ranges(props)
    _constrain(props["max_new_tokens"], new_tokens)
    _constrain(props["truncate"], {"minimum": 1})
    props["decoder_input_details"]["description"] = (
        "`details.prefill`: every prompt token with its logprob (null for the first); implies `details`; "
        "refused (422) when streaming")
    # Unknown keys are ignored, as TGI does; each field may be given under either spelling, not both.
    for name, alias in tgi_params.ALIASES:
        props[alias] = props[name]
    props["stop"] = props["stop_sequences"] = _stop()
    parameters["allOf"] = [{"not": {"required": list(pair)}} for pair in tgi_params.ALIASES]
    _unsupported(props, tgi_params.UNSUPPORTED_NEUTRAL)
    props["grammar"] = {"anyOf": [
        {"type": "object", "required": ["type", "value"], "additionalProperties": False,
         "properties": {"type": {"enum": ["json", "regex"]},
                        "value": {"anyOf": [{"type": "object"}, _STRING],
                                  "description": "a JSON schema (`json`) or a regular expression (`regex`)"}}},
        {"type": "null"}], "description": "structured output: the answer follows this JSON schema or regex"}


def _openai_common(schema: Schema, model_name: str, new_tokens: Schema) -> None:
    props = schema["properties"]
    props["model"]["enum"] = [model_name]
    _sampling_ranges(props)
    _constrain(props["max_tokens"], new_tokens)
    _constrain(props["n"], {"minimum": 1, "maximum": MAX_CHOICES})
    props["stop"] = _stop()
    _unsupported(props, openai_params.UNSUPPORTED_NEUTRAL)
    # Unknown fields are refused, so a typo never falls back to a default.
    schema["additionalProperties"] = False


def _completion(props: Schema, vocab_size: int) -> None:
    text = {"type": "string", "minLength": 1}
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    props["prompt"] = {
        "anyOf": [text, {"type": "array", "minItems": 1, "items": text},
                  ids, {"type": "array", "minItems": 1, "items": ids}],
        "description": f"at most {MAX_CHOICES} prompts x `n` per request; each prompt's tokens plus `max_tokens` "
                       "within the token budget",
    }
    _constrain(props["logprobs"], {"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    props["echo"]["description"] = ("the prompt before the answer; with `logprobs`, the prompt's tokens, scored, "
                                     "before the answer's")
    # 0 scores the prompt without answering, only with `echo` (refused otherwise).
    _constrain(props["max_tokens"], {"minimum": 0})
    props["max_tokens"]["description"] = "0 only with `echo`: the answer is the prompt alone"


def _images(schemas: dict[str, Schema], args: ServerArgs) -> None:
    """TGI's `multimodal_params.images`: none without --enable_multimodal, else the intake's limits."""
    images = schemas["MultimodalParams"]["properties"]["images"]
    if not args.enable_multimodal:
        images["maxItems"] = 0
        images["description"] = "images need a server started with --enable_multimodal"
        return
    images["maxItems"] = args.max_images_per_request
    images["description"] = (
        "one image per image tag of `inputs`, in order (the tag is the model's image token, e.g. `<image>`); "
        f"each at most {args.max_image_bytes} bytes encoded and {args.max_image_pixels} pixels; "
        "PNG, JPEG, WEBP, GIF or BMP")
    props = schemas["ImageInput"]["properties"]
    props["type"]["enum"] = ["base64", "url"]
    remote = "fetched by the server" if args.allow_remote_images else "refused: this server has no --allow_remote_images"
    props["data"]["description"] = (
        f"`base64`: the image bytes in base64, or a `data:image/...;base64,` URI; `url`: an http(s) URL ({remote}) "
        "or a data: URI")


def _chat(schemas: dict[str, Schema], new_tokens: Schema, args: ServerArgs) -> None:
    props = schemas["ChatCompletionRequest"]["properties"]
    props["messages"]["minItems"] = 1
    _constrain(props["max_completion_tokens"], new_tokens)
    _constrain(props["top_logprobs"], {"minimum": 0, "maximum": MAX_TOP_LOGPROBS})
    message = schemas["ChatMessage"]["properties"]
    message["role"]["enum"] = list(openai_params.ROLES)
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": _STRING}}
    if not args.enable_multimodal:
        url_text = "refused: this server was started without --enable_multimodal"
    else:
        remote = "http(s) URLs are fetched" if args.allow_remote_images else "http(s) URLs are refused (no --allow_remote_images)"
        url_text = (f"a `data:image/...;base64,` URI; {remote}. The image goes where the part is "
                    f"(parts are joined with newlines); at most {args.max_images_per_request} images per request, "
                    f"{args.max_image_bytes} bytes and {args.max_image_pixels} pixels each")
    image_part = {"type": "object", "required": ["type", "image_url"],
                  "properties": {"type": {"const": "image_url"},
                                 "image_url": {"type": "object", "required": ["url"],
                                               "properties": {"url": {**_STRING, "description": url_text}}}}}
    message["content"] = {"anyOf": [_STRING, {"type": "array", "items": {"anyOf": [text_part, image_part]}},
                                    {"type": "null"}],
                          "description": "null only in an assistant message that has `tool_calls`"}


# ---- helpers ---------------------------------------------------------------------------------


def _constrain(prop: Schema, constraints: Schema) -> None:
    """Add `constraints` to a property, or to each non-null branch of an `anyOf`."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(constraints)


def _sampling_ranges(props: Schema) -> None:
    for name, constraints in SAMPLING_RANGES.items():
        if name in props:
            _constrain(props[name], constraints)


def _stop() -> Schema:
    one = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}
    return {"anyOf": [one, {"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": one}, {"type": "null"}]}


def _unsupported(props: Schema, neutral: dict[str, tuple[Any, ...]]) -> None:
    for name, values in neutral.items():
        props[name] = {"enum": list(values), "description": "not supported by this server: accepted only when off"}


# ---- paths -----------------------------------------------------------------------------------


def _json(ref: str) -> Schema:
    return {"application/json": {"schema": {"$ref": _REF.format(model=ref)}}}


# One server-sent event (OpenAPI before 3.2 reads `schema` of an event stream as one event): its
# `data` is a JSON object (a token, the last one with the whole answer; or an error), or `[DONE]`
# at the end of an OpenAI stream.
_EVENTS = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": _STRING, "event": _STRING},
}}}


def _responses(ok: Schema, errors: tuple[int, ...], error_ref: str, keyed: bool) -> Schema:
    responses = {"200": ok}
    for status in sorted(errors + ((401,) if keyed else ())):
        responses[str(status)] = {"description": _ERROR_TEXT[status], "content": _json(error_ref)}
    return responses


def _paths(keyed: bool) -> Schema:
    tgi_errors = (413, 415, 422, 429, 500, 503)
    openai_errors = (400, 404, 413, 415, 429, 500, 503)

    def tgi(summary: str, ok: Schema) -> Schema:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": _json("TGIRequest")},
                         "responses": _responses(ok, tgi_errors, "TGIError", keyed)}}

    def openai(summary: str, body: str, ok: str) -> Schema:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": _json(body)},
                         "responses": _responses({"description": "the answer, or its events with `stream: true`",
                                                  "content": {**_json(ok), **_EVENTS}},
                                                 openai_errors, "OpenAIError", keyed)}}

    def get(summary: str, ok: Schema, errors: tuple[int, ...] = (), error_ref: str = "TGIError") -> Schema:
        return {"get": {"summary": summary, "responses": _responses(ok, errors, error_ref, keyed)}}

    health = get("200 while serving, 503 once a process died or the server is stopping",
                 {"description": "serving", "content": _json("Health")}, (503,))
    health["get"]["security"] = []  # open: load balancers probe it without the key
    health["get"]["responses"].pop("401", None)
    model = get("one model card", {"description": "the card", "content": _json("ModelCard")}, (404,), "OpenAIError")
    model["get"]["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": _STRING}]
    flush = {"post": get("drop every prefix-cache entry no running request uses",
                         {"description": "done before the next step",
                          "content": {"application/json": {"schema": {"type": "object"}}}}, (503,))["get"]}
    return {
        "/health": health,
        "/flush_cache": flush,
        "/metrics": get("Prometheus metrics", {"description": "text exposition format",
                                               "content": {"text/plain": {"schema": _STRING}}}),
        "/openapi.json": get("this document", {"description": "OpenAPI 3.1",
                                               "content": {"application/json": {"schema": {"type": "object"}}}}),
        "/generate": tgi("TGI: generate text", {"description": "the answer", "content": _json("GenerateResponse")}),
        "/generate_stream": tgi("TGI: generate text as server-sent events, one per token",
                                {"description": "the events", "content": _EVENTS}),
        "/": tgi("TGI compat: /generate answered in a list, or /generate_stream with `stream: true`",
                 {"description": "the answer in a list, or the events",
                  "content": {"application/json": {"schema": {"type": "array", "items": {
                      "$ref": _REF.format(model="GenerateResponse")}}}, **_EVENTS}}),
        "/v1/models": get("the served model", {"description": "the list", "content": _json("ModelList")},
                          error_ref="OpenAIError"),
        "/v1/models/{model}": model,
        "/v1/completions": openai("OpenAI: text completions", "CompletionRequest", "Completion"),
        "/v1/chat/completions": openai("OpenAI: chat completions", "ChatCompletionRequest", "Completion"),
    }
