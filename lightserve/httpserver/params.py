"""Request parsing and validation shared by every API flavour (TGI now, OpenAI later).

Everything a client sends is checked here before a request id is spent: the body size and
declared media type, the JSON syntax and types (pydantic v2 in strict mode, so `"10"` is not an
integer and `true` is not 1), the stop strings, and the token budget of the request. Failures
become `ApiError`s whose message names the offending field; nothing here ever lets a stack trace
reach the client.
"""

from __future__ import annotations

import secrets
from typing import Optional, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from lightserve.httpserver.disconnect import ClientDisconnected
from lightserve.httpserver.errors import body_too_large, unsupported_media_type, validation_error
from lightserve.io_struct import SamplingParams
from lightserve.server_args import ServerArgs

# Stop strings are matched by the detokenizer on every token, and text that could still become
# one is held back from streams: both costs grow with the number and length of stop strings.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256  # characters

# Pydantic reports every problem; a client only needs the first few to fix its request.
_MAX_REPORTED_ERRORS = 3

Model = TypeVar("Model", bound=BaseModel)


def _is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes and (415) non-JSON media types.

    A body declared as anything but JSON is refused; one with no Content-Type is read as JSON.
    Besides telling a client at once that it sent a form or plain text, this stops HTML forms and
    other "simple" cross-site browser requests (text/plain, form encodings: no CORS preflight)
    from driving a server on localhost.

    The declared Content-Length is checked first so an honest oversized upload is refused before
    it is read; the running count catches chunked bodies and lying headers.
    """
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json_media_type(content_type):
        raise unsupported_media_type()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # gone before the whole body came: nobody to answer, nothing to log
        raise ClientDisconnected() from None
    return b"".join(chunks)


def parse_json(model: type[Model], body: bytes) -> Model:
    """Parse and type-check a JSON body into `model`, or raise a 422 naming the fields."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(_describe(exc), _first_param(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:_MAX_REPORTED_ERRORS]:
        loc = ".".join(str(p) for p in err["loc"])
        # For errors raised by our own validators, their message without pydantic's "Value error, ".
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        parts.append(f"`{loc}`: {msg}" if loc else msg)
    return "; ".join(parts)


def _first_param(exc: ValidationError) -> Optional[str]:
    loc = exc.errors(include_url=False)[0]["loc"]
    return ".".join(str(p) for p in loc) or None


def normalize_stop(stop: Optional[list[str]], field: str) -> list[str]:
    """The stop strings of a request (none if not given), within the limits."""
    stops = list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise validation_error(f"`{field}` may hold at most {MAX_STOP_SEQUENCES} strings, got {len(stops)}", field)
    for s in stops:
        if not s:
            # An empty stop string would match before the first token.
            raise validation_error(f"`{field}` must not contain an empty string", field)
        if len(s) > MAX_STOP_LENGTH:
            raise validation_error(f"`{field}` strings must be at most {MAX_STOP_LENGTH} characters, got {len(s)}", field)
    return stops


def check_prompt_length(prompt_len: int, field: str) -> None:
    if prompt_len < 1:
        raise validation_error(f"`{field}` must not be empty", field)


def token_limit(args: ServerArgs) -> int:
    """The most prompt + generated tokens one request may have.

    A request must fit in its token-table row and, alone, in the KV pool (the launcher fills
    `max_total_token_num` with the pool size the backend reported).
    """
    return min(args.max_req_total_len, args.max_total_token_num or args.max_req_total_len)


def resolve_max_new_tokens(
    requested: Optional[int], prompt_len: int, args: ServerArgs, field: str, prompt_field: str = "inputs"
) -> int:
    """The number of tokens the request may generate, within `args.max_req_total_len`.

    An explicit value that does not fit beside the prompt is refused (the client asked for
    something the server will not do). Without one, the default is shortened to what fits, so a
    long prompt still gets an answer instead of an error about a parameter it never sent.
    """
    limit = token_limit(args)
    if prompt_len >= limit:
        raise validation_error(
            f"`{prompt_field}`: the prompt must have fewer than {limit} tokens (max_req_total_len / KV capacity), "
            f"got {prompt_len}", prompt_field
        )
    if requested is None:
        return min(args.max_new_tokens_default, limit - prompt_len)
    if requested < 1:
        raise validation_error(f"`{field}` must be a positive integer, got {requested}", field)
    if prompt_len + requested > limit:
        raise validation_error(
            f"prompt tokens + `{field}` must be <= {limit} (max_req_total_len / KV capacity); "
            f"got {prompt_len} prompt tokens and {field}={requested}",
            field,
        )
    return requested


# No vocabulary is this large: a top_k above it is "no cut".
TOP_K_NO_CUT = 2**31 - 1


def finalize_sampling(sampling: SamplingParams) -> SamplingParams:
    """Run the message's own range checks and draw a seed for sampled requests without one.

    The seed is drawn here, not in the backend, so it can be reported to the client, which can
    then replay the same output.
    """
    try:
        sampling.validate()
    except ValueError as exc:
        message = str(exc)
        # The message starts with the field name in backticks: "`top_p` must be in (0, 1]".
        param = message.split("`")[1] if message.startswith("`") else None
        raise validation_error(message, param) from None
    if sampling.top_k > TOP_K_NO_CUT:
        # A cut beyond any vocabulary cuts nothing; and msgpack carries integers of 64 bits at most.
        sampling.top_k = -1
    if not sampling.is_greedy and sampling.seed is None:
        sampling.seed = secrets.randbits(63)
    return sampling

