"""TGI-compatible routes: `POST /generate`, `POST /generate_stream` and `POST /`.

Response shapes follow text-generation-inference, so its clients (huggingface_hub's
`InferenceClient.text_generation`, `text_generation.Client`) work unchanged:

- `/generate` answers `{"generated_text", "details"?}`; `/` without `stream` answers the same
  object wrapped in a list, as TGI does for the Inference API.
- `details.tokens[].text` is each token decoded on its own, as in TGI.
- Streams send one event per token, and there a token's `text` is the text released with it:
  text held back (a possible stop string, an incomplete UTF-8 character) comes with a later
  token, so the texts of all events add up to `generated_text`. Clients hide the text of
  `special` tokens; a special token (EOS) that releases held-back text is therefore reported as
  not special, or that text would be lost. The last event carries `generated_text` and
  `details` (always, not only when `details` was asked for: it costs nothing and tells the
  client why the stream ended).
- `details.seed` is the seed a sampled request used (drawn by the server when not given), null
  for greedy requests.
- `decoder_input_details: true` returns `details` (even without `details: true`, as TGI needs
  details for it) with `prefill`: every prompt token, its text decoded on its own and its
  logprob under the model (null for the first token, which has no context). Streams refuse it
  (422), as TGI does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lightserve.httpserver.admission import admission_of
from lightserve.httpserver.disconnect import run_unless_disconnected
from lightserve.httpserver.errors import GENERATION, ApiError, generation_error, unavailable
from lightserve.httpserver.manager import HttpServerManager, RequestStream, ServerUnavailable, failure_of
from lightserve.httpserver.params import read_body
from lightserve.httpserver.sse import EventStreamResponse, sse_event
from lightserve.httpserver.images import PreparedImages
from lightserve.httpserver.tgi_params import (
    TGIRequest, check_streamable, image_sources, parse_tgi_request, tgi_sampling_params, truncate_prompt,
)
from lightserve.io_struct import SamplingParams, TextOut
from lightserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """A validated request, ready to submit."""

    body: TGIRequest
    prompt_ids: list[int]
    sampling: SamplingParams
    images: Optional[PreparedImages]

    def full_text(self, generated: str) -> str:
        return self.body.inputs + generated if self.body.parameters.return_full_text else generated

    @property
    def seed(self) -> Optional[int]:
        return None if self.sampling.is_greedy else self.sampling.seed


class TGIApi:
    """The TGI route handlers over one `HttpServerManager`."""

    def __init__(self, manager: HttpServerManager, args: ServerArgs) -> None:
        self.manager = manager
        self.args = args

    def routes(self) -> list[Route]:
        return [
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
            Route("/", self.compat_generate, methods=["POST"]),
        ]

    # ---- handlers --------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        prep = await self._prepare(request)
        return JSONResponse(await self._complete(request, prep))

    async def generate_stream(self, request: Request) -> Response:
        prep = await self._prepare(request)
        check_streamable(prep.body.parameters)
        return EventStreamResponse(self._events(prep))

    async def compat_generate(self, request: Request) -> Response:
        """TGI's `POST /`: `/generate_stream` if the body says `"stream": true`, else `/generate`
        with the answer wrapped in a list."""
        prep = await self._prepare(request)
        if prep.body.stream:
            check_streamable(prep.body.parameters)
            return EventStreamResponse(self._events(prep))
        return JSONResponse([await self._complete(request, prep)])

    # ---- shared steps ----------------------------------------------------------------------

    async def _prepare(self, request: Request) -> _Prepared:
        if not self.manager.healthy:
            raise unavailable(self.manager.failure or "")
        body = parse_tgi_request(await read_body(request, self.manager.max_body_bytes), self.args)
        admission_of(request).grow_to(1)
        # Truncation counts text tokens: it happens before image tags expand into placeholders.
        prompt_ids = truncate_prompt(await self.manager.tokenize(body.inputs), body.parameters.truncate)
        images = None
        sources = image_sources(body)
        if sources:
            images = await self.manager.images.prepare(prompt_ids, sources)
            prompt_ids = images.prompt_ids
        sampling = tgi_sampling_params(body.parameters, len(prompt_ids), self.args)
        return _Prepared(body, prompt_ids, sampling, images)

    async def _complete(self, request: Request, prep: _Prepared) -> dict[str, Any]:
        try:
            async with self.manager.generate(prep.prompt_ids, prep.sampling, prep.images) as outs:
                collected = await run_unless_disconnected(request.receive, _collect(outs))
        except ServerUnavailable as exc:
            raise unavailable(str(exc)) from None
        last = collected[-1]
        failure = failure_of(last)
        if failure is not None:
            raise generation_error(failure)
        response: dict[str, Any] = {"generated_text": prep.full_text("".join(o.text for o in collected))}
        params = prep.body.parameters
        if params.details or params.decoder_input_details:
            response["details"] = {
                "finish_reason": last.finish_reason.value,
                "generated_tokens": _generated_tokens(last, len(collected)),
                "seed": prep.seed,
                "prompt_tokens": len(prep.prompt_ids),
                "prefill": _prefill(prep.prompt_ids, collected[0]) if params.decoder_input_details else [],
                "tokens": [_token(o, o.token_text, o.special) for o in collected],
            }
        return response

    async def _events(self, prep: _Prepared) -> AsyncGenerator[bytes, None]:
        texts: list[str] = []
        try:
            async with self.manager.generate(prep.prompt_ids, prep.sampling, prep.images) as outs:
                async for out in outs:
                    failure = failure_of(out)
                    if failure is not None:
                        yield sse_event(generation_error(failure).tgi_body())
                        return
                    texts.append(out.text)
                    event: dict[str, Any] = {
                        "index": len(texts),
                        "token": _token(out, out.text, out.special and not out.text),
                        "generated_text": None,
                        "details": None,
                    }
                    if out.finish_reason is not None:
                        event["generated_text"] = prep.full_text("".join(texts))
                        event["details"] = {
                            "finish_reason": out.finish_reason.value,
                            "generated_tokens": _generated_tokens(out, len(texts)),
                            "seed": prep.seed,
                            "input_length": len(prep.prompt_ids),
                        }
                    yield sse_event(event)
        except ServerUnavailable as exc:
            yield sse_event(unavailable(str(exc)).tgi_body())
        except ApiError as exc:  # the image cache had no room (429) after the headers went out
            yield sse_event(exc.tgi_body())
        except Exception:  # headers are sent: the stream can only end with an error event
            logger.exception("TGI stream failed")
            yield sse_event(ApiError(500, "internal server error", GENERATION).tgi_body())



def _token(out: TextOut, text: str, special: bool) -> dict[str, Any]:
    return {"id": out.token_id, "text": text, "logprob": _logprob(out.logprob), "special": special}


def _logprob(value: float) -> Optional[float]:
    # JSON has no -inf; a token the model gave zero probability reports null.
    return value if math.isfinite(value) else None


def _prefill(prompt_ids: list[int], first: TextOut) -> list[dict[str, Any]]:
    """TGI's `details.prefill`: each prompt token with its logprob given the tokens before it;
    the first token's is null (TGI's way: nothing comes before it)."""
    scores = first.prompt_logprobs
    if scores is None:  # every scored request's first output carries them
        raise generation_error("the prompt's logprobs did not come back from the backend")
    logprobs = [None, *map(_logprob, scores.logprobs)]
    return [{"id": token, "text": text, "logprob": lp}
            for token, text, lp in zip(prompt_ids, first.prompt_token_texts, logprobs)]


async def _collect(outs: RequestStream) -> list[TextOut]:
    return [out async for out in outs]


def _generated_tokens(last: TextOut, seen: int) -> int:
    # The server's count is authoritative; the number of outputs seen is the fallback.
    return last.completion_tokens or seen
