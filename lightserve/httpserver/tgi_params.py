"""The TGI request body (`/generate`, `/generate_stream`, `/`) and its mapping to `SamplingParams`.

Pure functions of the request body, the prompt length and the server limits, so the whole
validation layer is tested without a server.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from lightserve.httpserver.errors import validation_error
from lightserve.httpserver.images import ImageSource
from lightserve.httpserver.params import check_prompt_length, finalize_sampling, normalize_stop, parse_json, resolve_max_new_tokens
from lightserve.httpserver.structured import tgi_grammar
from lightserve.io_struct import SamplingParams
from lightserve.server_args import ServerArgs

# Fields with two accepted spellings (TGI's and an older or LightLLM one); giving both is refused
# rather than silently preferring one.
ALIASES = (("stop", "stop_sequences"), ("details", "return_details"))

# TGI parameters this server does not implement, with the values that mean "off". Clients such
# as huggingface_hub send every field, so these are accepted at their neutral values and refused
# (422) otherwise instead of being silently ignored.
UNSUPPORTED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "typical_p": (None, 1.0),
    "watermark": (None, False),
    "top_n_tokens": (None, 0),
    "adapter_id": (None,),
}

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TGIParameters(BaseModel):
    """`parameters` of a TGI request. Unknown keys are ignored, as TGI itself does."""

    model_config = _STRICT

    do_sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    max_new_tokens: Optional[int] = None
    stop: Optional[list[str]] = Field(None, validation_alias=AliasChoices("stop", "stop_sequences"))
    ignore_eos: Optional[bool] = None
    seed: Optional[int] = None
    details: Optional[bool] = Field(None, validation_alias=AliasChoices("details", "return_details"))
    # `details.prefill`: every prompt token with its logprob under the model (implies `details`).
    decoder_input_details: Optional[bool] = None
    return_full_text: Optional[bool] = None
    truncate: Optional[int] = None
    best_of: Optional[int] = None
    typical_p: Optional[float] = None
    watermark: Optional[bool] = None
    grammar: Optional[Any] = None  # structured output, checked by `structured.tgi_grammar`
    top_n_tokens: Optional[int] = None
    adapter_id: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, alias in ALIASES:
                if name in data and alias in data:
                    raise ValueError(f"give only one of `{name}` and `{alias}`")
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _lone_stop_string(cls, value: Any) -> Any:
        # Accept "stop": "###" as one stop string, as the OpenAI API does.
        return [value] if isinstance(value, str) else value


class ImageInput(BaseModel):
    """One image: `type` "base64" (raw base64 or a `data:image/...;base64,` URI) or "url" (an
    http(s) URL, fetched only with --allow_remote_images)."""

    model_config = _STRICT

    type: str
    data: str


class MultimodalParams(BaseModel):
    model_config = _STRICT

    images: list[ImageInput] = Field(default_factory=list)


class TGIRequest(BaseModel):
    model_config = _STRICT

    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: Optional[bool] = None  # only read by `POST /`
    multimodal_params: Optional[MultimodalParams] = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return {} if value is None else value


def parse_tgi_request(body: bytes, args: ServerArgs) -> TGIRequest:
    """Parse a TGI body and run the checks of fields that are not sampling parameters."""
    req = parse_json(TGIRequest, body)
    if not req.inputs:
        raise validation_error("`inputs` must not be empty", "inputs")
    p = req.parameters
    for name, neutral in UNSUPPORTED_NEUTRAL.items():
        if getattr(p, name) not in neutral:
            raise validation_error(f"`parameters.{name}` is not supported by this server", f"parameters.{name}")
    if p.truncate is not None and p.truncate < 1:
        raise validation_error(f"`parameters.truncate` must be a positive integer, got {p.truncate}", "parameters.truncate")
    if image_sources(req) and not args.enable_multimodal:
        raise validation_error(
            "`multimodal_params.images`: this server was started without --enable_multimodal",
            "multimodal_params.images",
        )
    return req


def check_streamable(p: TGIParameters) -> None:
    """A stream's events have no place for the prompt's details: refused, in TGI's words."""
    if p.decoder_input_details:
        raise validation_error("decoder_input_details == true is not supported when streaming tokens",
                               "parameters.decoder_input_details")


def image_sources(req: TGIRequest) -> list[ImageSource]:
    """The request's images, in prompt order (each `<image>` tag of `inputs` takes the next one)."""
    if req.multimodal_params is None:
        return []
    return [ImageSource(image.type, image.data) for image in req.multimodal_params.images]


def truncate_prompt(prompt_ids: list[int], truncate: Optional[int]) -> list[int]:
    """TGI `truncate`: keep only the last `truncate` prompt tokens."""
    if truncate is None or len(prompt_ids) <= truncate:
        return prompt_ids
    return prompt_ids[-truncate:]


def samples(p: TGIParameters) -> bool:
    """Whether a TGI request samples (else it decodes greedily).

    TGI's rule: sampling when `do_sample` is true or any logits warper is set away from its
    neutral value, i.e. `temperature != 1`, `top_k > 0` or `top_p < 1`. One addition:
    `temperature == 0` always means greedy (TGI refuses 0; clients used to OpenAI send it to ask
    for greedy decoding, and it has no other sensible reading).
    """
    if p.temperature == 0.0:
        return False
    return bool(
        p.do_sample
        or (p.temperature is not None and p.temperature != 1.0)
        or (p.top_k is not None and p.top_k > 0)
        or (p.top_p is not None and p.top_p < 1.0)
    )


def tgi_sampling_params(p: TGIParameters, prompt_len: int, args: ServerArgs) -> SamplingParams:
    """The `SamplingParams` of a parsed request whose prompt has `prompt_len` tokens.

    Every value the client gave is range-checked, even the ones greedy decoding then ignores.
    A sampled request without a seed gets a drawn one, reported back in `details.seed`.
    """
    check_prompt_length(prompt_len, "inputs")
    sampling = SamplingParams(
        max_new_tokens=resolve_max_new_tokens(p.max_new_tokens, prompt_len, args, "parameters.max_new_tokens"),
        temperature=1.0 if p.temperature is None else p.temperature,
        top_p=1.0 if p.top_p is None else p.top_p,
        top_k=-1 if not p.top_k else p.top_k,  # None and 0 both mean "no top-k cut"
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        presence_penalty=0.0 if p.presence_penalty is None else p.presence_penalty,
        frequency_penalty=0.0 if p.frequency_penalty is None else p.frequency_penalty,
        seed=p.seed,
        stop=normalize_stop(p.stop, "parameters.stop"),
        ignore_eos=bool(p.ignore_eos),
        grammar=tgi_grammar(p.grammar),
        prompt_logprobs=0 if p.decoder_input_details else None,  # TGI's prefill has no alternatives
    )
    if not samples(p):
        # Greedy only replaces a temperature of None, 1 or 0, so no out-of-range value the
        # client gave escapes the range checks below.
        sampling.temperature = 0.0
    return finalize_sampling(sampling)
