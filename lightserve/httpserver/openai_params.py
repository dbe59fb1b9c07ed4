"""The OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) and their mapping to
`SamplingParams`.

Pure functions of the body, the prompt length and the server limits, like `tgi_params`, so the
validation is tested without a server. Every field this server does not implement is refused by
name (400) instead of being silently ignored, except at the value that means "off", which
clients such as LangChain send on every request.

Beyond OpenAI, `top_k`, `repetition_penalty`, `ignore_eos` and the `guided_*` constraints are
accepted (as vLLM does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Union

import msgspec
from pydantic import BaseModel, ConfigDict, model_validator

from lightserve.httpserver.errors import validation_error
from lightserve.httpserver.params import finalize_sampling, normalize_stop, resolve_max_new_tokens
from lightserve.httpserver.structured import GuidedFields
from lightserve.httpserver.tools import Tool, ToolChoice, hermes_call_text
from lightserve.io_struct import Grammar, SamplingParams
from lightserve.server_args import ServerArgs

# One request may fan out into at most this many generations (prompts x n): each one is a
# request in the router, and one client must not be able to fill the batch by itself.
MAX_CHOICES = 64
MAX_TOP_LOGPROBS = 20  # the backend returns at most this many alternatives per token

# OpenAI fields this server does not implement, with the values that mean "not used".
UNSUPPORTED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None,),
}

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def _check_field_names(model: type[BaseModel], data: Any) -> Any:
    """Refuse unsupported fields (at a non-neutral value) and unknown ones, by name.

    OpenAI itself refuses unknown fields; a typo such as `max_token` must not silently give a
    default-length answer.
    """
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        if name in model.model_fields:
            continue
        if name in UNSUPPORTED_NEUTRAL:
            if not _is_neutral(value, UNSUPPORTED_NEUTRAL[name]):
                raise validation_error(f"`{name}` is not supported by this server", name)
        else:
            raise validation_error(f"`{name}` is not a recognized request field", name)
    return data


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # JSON tells `false` from `0` and `true` from `1`; Python's `==` (and so `in`) does not.
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: Optional[bool] = None


class CommonRequest(GuidedFields):
    """The fields `/v1/completions` and `/v1/chat/completions` share (structured output's
    `response_format` and `guided_*` come from `GuidedFields`)."""

    model_config = _STRICT

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # an end-user id for the client's own bookkeeping; not used
    # Extensions beyond OpenAI.
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return _check_field_names(cls, data)

    @property
    def choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonRequest):
    # A string, a list of strings, a list of token ids or a list of lists of token ids.
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None  # number of top alternatives per token
    echo: Optional[bool] = None  # the prompt before the answer; with `logprobs`, the prompt's too


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: str
    # A string, or a list of content parts ({"type": "text"} / {"type": "image_url"}), checked
    # by `chat_conversation` for messages that name the offending part. None only in an
    # assistant turn that called tools.
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant turn's calls, as OpenAI returned them
    tool_call_id: Optional[str] = None  # a `tool` message: the call it answers


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None


# ---- checks beyond types ---------------------------------------------------------------------


def check_common(req: CommonRequest) -> None:
    """Checks of fields that are not sampling parameters, shared by both routes."""
    n = req.choices_per_prompt
    if not 1 <= n <= MAX_CHOICES:
        raise validation_error(f"`n` must be an integer in [1, {MAX_CHOICES}], got {n}", "n")
    if req.stream_options is not None and not req.stream:
        raise validation_error("`stream_options` is only allowed when `stream` is true", "stream_options")


def completion_prompts(req: CompletionRequest, vocab_size: int) -> list[Union[str, list[int]]]:
    """The prompts of a completion request: strings, or token-id lists checked against the vocabulary."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts: list[Union[str, list[int]]] = [prompt]  # type: ignore[list-item]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise validation_error("`prompt` must not be empty", "prompt")
    if len(prompts) * req.choices_per_prompt > MAX_CHOICES:
        raise validation_error(
            f"`prompt` x `n` must be at most {MAX_CHOICES} completions, got {len(prompts)} x {req.choices_per_prompt}",
            "prompt",
        )
    for p in prompts:
        if not isinstance(p, str) and not all(0 <= t < vocab_size for t in p):
            raise validation_error(f"`prompt`: token ids must be in [0, {vocab_size})", "prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise validation_error(f"`logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}], got {req.logprobs}", "logprobs")
    return prompts


def completion_max_tokens(req: CompletionRequest) -> tuple[Optional[int], bool]:
    """The output length to ask the engine for, and whether the answer is the prompt alone.

    `max_tokens: 0` with `echo` answers the prompt alone, scored with `logprobs` (as vLLM does):
    the engine still draws one token, from the logits of the prompt's last position, which it
    computes anyway, and the answer leaves that token out.
    """
    if req.max_tokens == 0:
        if not req.echo:
            raise validation_error("`max_tokens` must be a positive integer (0 only with `echo`)", "max_tokens")
        return 1, True
    return req.max_tokens, False


def chat_top_logprobs(req: ChatCompletionRequest) -> int:
    """The number of alternatives per token a chat request asks for (0 without logprobs)."""
    if req.top_logprobs is None:
        return 0
    if not req.logprobs:
        raise validation_error("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise validation_error(
            f"`top_logprobs` must be an integer in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}", "top_logprobs")
    return req.top_logprobs


def chat_max_tokens(req: ChatCompletionRequest) -> tuple[Optional[int], str]:
    """The requested output length and the name it was given under."""
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise validation_error("give only one of `max_tokens` and `max_completion_tokens`", "max_completion_tokens")
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


# ---- chat messages ---------------------------------------------------------------------------

# "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass
class ImageRef:
    """An `image_url` content part: where it was and what it points to (a URL or `data:` URI)."""

    message: int
    part: int
    url: str


@dataclass
class Conversation:
    """Messages ready for the tokenizer's chat template, and the images they referred to."""

    messages: list[dict[str, Any]]
    images: list[ImageRef]


def chat_conversation(messages: list[ChatMessage], image_tag: Optional[str] = None,
                      native_tools: bool = False) -> Conversation:
    """Template-ready messages: roles checked, text parts joined, image parts collected.

    Parts are joined with newlines; each image part becomes `image_tag` (the model's image
    token, which the intake expands into the image's placeholders), or nothing on a server
    without images (which refuses image parts, see `check_images`).

    Tool turns: with `native_tools` (the template renders tools itself) an assistant turn keeps
    its `tool_calls` (arguments as objects, as templates expect) and a tool result keeps its
    role; otherwise both become text, the calls as Hermes `<tool_call>` blocks and a result as a
    user turn in `<tool_response>` tags.
    """
    if not messages:
        raise validation_error("`messages` must not be empty", "messages")
    out: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise validation_error(
                f"`messages[{i}].role`: `{msg.role}` is not supported (use one of {', '.join(ROLES)})",
                f"messages[{i}].role")
        if msg.content is None and not (msg.role == "assistant" and msg.tool_calls):
            raise validation_error(f"`messages[{i}].content` is required", f"messages[{i}].content")
        if msg.tool_calls is not None and msg.role != "assistant":
            raise validation_error(f"`messages[{i}].tool_calls` belongs to assistant messages", f"messages[{i}].tool_calls")
        content = msg.content or ""
        text = content if isinstance(content, str) else _join_parts(content, i, images, image_tag)
        entry: dict[str, Any] = {"role": ROLES[msg.role], "content": text}
        if msg.name is not None:
            entry["name"] = msg.name
        if msg.tool_calls:
            if native_tools:
                entry["tool_calls"] = [_native_call(call) for call in msg.tool_calls]
            else:
                entry["content"] = (text + "\n" if text else "") + hermes_call_text(msg.tool_calls)
        if msg.role == "tool":
            if native_tools:
                if msg.tool_call_id is not None:
                    entry["tool_call_id"] = msg.tool_call_id
            else:
                entry = {"role": "user", "content": "<tool_response>\n" + text + "\n</tool_response>"}
        out.append(entry)
    return Conversation(out, images)


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`messages` with `text` at the end of the first system message (added when there is none)."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": (messages[0]["content"] + "\n\n" + text).strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _native_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function", {}))
    try:
        if isinstance(function.get("arguments"), str):
            function["arguments"] = json.loads(function["arguments"])
    except ValueError:
        pass
    return {"type": "function", "function": function, **({"id": call["id"]} if "id" in call else {})}


def _join_parts(parts: list[dict[str, Any]], message: int, images: list[ImageRef], image_tag: Optional[str]) -> str:
    texts = []
    for j, part in enumerate(parts):
        where = f"messages[{message}].content[{j}]"
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
            images.append(ImageRef(message, j, part["image_url"]["url"]))
            if image_tag is not None:
                texts.append(image_tag)
        elif kind in ("text", "image_url"):
            field = "text" if kind == "text" else "image_url.url"
            raise validation_error(f"`{where}`: a `{kind}` part needs a string `{field}`", where)
        else:
            raise validation_error(f"`{where}.type`: `{kind}` content parts are not supported", f"{where}.type")
    return "\n".join(texts)


def check_images(images: list[ImageRef], args: ServerArgs) -> None:
    """Image parts need a multimodal server; their contents are checked by `ImageIntake`."""
    if images and not args.enable_multimodal:
        where = f"messages[{images[0].message}].content[{images[0].part}]"
        raise validation_error(f"`{where}`: images need --enable_multimodal", where)


# ---- sampling --------------------------------------------------------------------------------


def derive_seed(seed: int, choice: int) -> int:
    """The seed of the `choice`-th answer to a prompt of a request with `seed`.

    Choice 0 uses the seed itself, so `n=1` and the first choice of `n>1` agree; the others get
    well-mixed seeds of their own, so the answers differ but replay exactly.
    """
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # in [0, 2^63)


def openai_sampling(
    req: CommonRequest,
    prompt_len: int,
    args: ServerArgs,
    *,
    max_tokens: Optional[int],
    max_tokens_field: str,
    prompt_field: str,
    logprobs: int,
    grammar: Optional[Grammar] = None,
    prompt_logprobs: Optional[int] = None,
) -> list[SamplingParams]:
    """One `SamplingParams` per choice (`n` of them) for a prompt of `prompt_len` tokens;
    `prompt_logprobs`: score the prompt with that many alternatives per token (completions' `echo`).

    OpenAI semantics: the default temperature is 1 (sampling); `temperature: 0` is greedy.
    Without `max_tokens` the server default applies, shortened to what fits beside the prompt.
    """
    base = SamplingParams(
        max_new_tokens=resolve_max_new_tokens(max_tokens, prompt_len, args, max_tokens_field, prompt_field),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if not req.top_k else req.top_k,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        seed=req.seed,
        stop=normalize_stop([req.stop] if isinstance(req.stop, str) else req.stop, "stop"),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        grammar=grammar,
        prompt_logprobs=prompt_logprobs,
    )
    return [
        finalize_sampling(msgspec.structs.replace(base, stop=list(base.stop), seed=None if req.seed is None else derive_seed(req.seed, i)))
        for i in range(req.choices_per_prompt)
    ]
