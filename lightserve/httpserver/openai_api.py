"""OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

A request becomes one generation per prompt and choice (`n`), submitted together and run
concurrently; their outputs are merged into one answer or one event stream. Streams follow
OpenAI: `data: {chunk}` events (the first chunk of a chat choice carries the role), an optional
usage chunk (`stream_options.include_usage`), then `data: [DONE]`. A failure after the stream
started ends it with `data: {"error": {...}}` and `[DONE]`.

`usage.prompt_tokens` counts each prompt once, however many choices it has (as OpenAI bills it);
`completion_tokens` counts the tokens of every choice, the end-of-sequence token included.
Errors use OpenAI's shape (rendered by the app for paths under `/v1/`, see `openai_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Optional, TypeVar, Union

from jinja2.exceptions import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lightserve.httpserver.admission import admission_of
from lightserve.httpserver.disconnect import cancel_and_wait, run_unless_disconnected
from lightserve.httpserver.errors import GENERATION, ApiError, generation_error, unavailable, validation_error
from lightserve.httpserver.images import ImageSource, PreparedImages
from lightserve.httpserver.manager import HttpServerManager, ServerUnavailable, failure_of
from lightserve.httpserver.openai_errors import model_not_found, openai_error_body
from lightserve.httpserver.openai_format import ChatFormat, ChoiceInfo, CompletionFormat, ScoredPrompt, usage
from lightserve.httpserver.openai_params import (
    ChatCompletionRequest, CompletionRequest, chat_conversation, chat_max_tokens, chat_top_logprobs, check_common,
    check_images, completion_max_tokens, completion_prompts, openai_sampling, with_system_text,
)
from lightserve.httpserver.params import check_prompt_length, parse_json, read_body
from lightserve.httpserver.sse import EventStreamResponse, sse_event
from lightserve.httpserver.structured import openai_grammar
from lightserve.httpserver.tools import plan_tools, template_reads_tools, tools_system_prompt
from lightserve.io_struct import SamplingParams, TextOut
from lightserve.server_args import ServerArgs
from lightserve.utils.embedded_model import EMBEDDED_MODEL_NAME

logger = logging.getLogger(__name__)

_Format = Union[ChatFormat, CompletionFormat]
_Body = TypeVar("_Body", CompletionRequest, ChatCompletionRequest)
_DONE = b"data: [DONE]\n\n"


def served_model_name(args: ServerArgs) -> str:
    """The model id of `/v1/models`: the model directory's name."""
    return Path(args.model_dir).name if args.model_dir else EMBEDDED_MODEL_NAME


@dataclass
class _Choice:
    """One generation of a request: a prompt and the sampling of one of its `n` choices."""

    info: ChoiceInfo
    prompt_ids: list[int]
    sampling: SamplingParams
    images: Optional[PreparedImages] = None  # each choice takes its own references to them
    prompt: int = 0  # the index of its prompt in the request (completions take several)


@dataclass
class _Prepared:
    """A validated request, ready to submit."""

    fmt: _Format
    choices: list[_Choice]
    prompt_tokens: int  # every prompt counted once
    stream: bool
    include_usage: bool
    logprobs: bool


class OpenAIApi:
    """The OpenAI route handlers over one `HttpServerManager`."""

    def __init__(self, manager: HttpServerManager, args: ServerArgs) -> None:
        self.manager = manager
        self.args = args
        self.model_name = served_model_name(args)
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]

    # ---- handlers --------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, await self._prepare_completion(request))

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, await self._prepare_chat(request))

    # ---- preparing -------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lightserve",
                "max_model_len": self.args.max_req_total_len}

    def _check_model(self, model: str) -> None:
        if model not in (self.model_name, self.args.model_dir):
            raise model_not_found(model, self.model_name)

    async def _body(self, request: Request, model: type[_Body]) -> _Body:
        if not self.manager.healthy:
            raise unavailable(self.manager.failure or "")
        body = parse_json(model, await read_body(request, self.manager.max_body_bytes))
        self._check_model(body.model)
        check_common(body)
        return body

    async def _prepare_completion(self, request: Request) -> _Prepared:
        body = await self._body(request, CompletionRequest)
        prompts = completion_prompts(body, len(self.manager.tokenizer))
        admission_of(request).grow_to(len(prompts) * body.choices_per_prompt)
        logprobs = body.logprobs is not None
        max_tokens, prompt_only = completion_max_tokens(body)
        # `echo` with `logprobs` scores the prompt, with as many alternatives per token.
        prompt_logprobs = body.logprobs if body.echo else None
        grammar = openai_grammar(body)
        choices, prompt_tokens = [], 0
        for p, prompt in enumerate(prompts):
            ids = await self.manager.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            check_prompt_length(len(ids), "prompt")
            echo = ""
            if body.echo:
                echo = prompt if isinstance(prompt, str) else await self.manager.with_tokenizer(lambda tok: tok.decode(ids))
            samplings = openai_sampling(body, len(ids), self.args, max_tokens=max_tokens, max_tokens_field="max_tokens",
                                        prompt_field="prompt", logprobs=body.logprobs or 0, grammar=grammar,
                                        prompt_logprobs=prompt_logprobs)
            for j, sampling in enumerate(samplings):
                # OpenAI's numbering: the choices of prompt p are p*n .. p*n + n-1.
                info = ChoiceInfo(index=p * len(samplings) + j, logprobs=logprobs, echo=echo, prompt_only=prompt_only)
                choices.append(_Choice(info, ids, sampling, prompt=p))
            prompt_tokens += len(ids)
        return _Prepared(CompletionFormat(), choices, prompt_tokens, bool(body.stream), body.include_usage, logprobs)

    async def _prepare_chat(self, request: Request) -> _Prepared:
        body = await self._body(request, ChatCompletionRequest)
        admission_of(request).grow_to(body.choices_per_prompt)
        tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        grammar = openai_grammar(body)
        if grammar is not None and tools.grammar is not None:
            raise validation_error("a `tool_choice` that forces a call cannot be combined with another constraint",
                                   "tool_choice")
        grammar = grammar or tools.grammar
        intake = self.manager.images
        native_tools = template_reads_tools(self.manager.tokenizer.chat_template)
        conversation = chat_conversation(body.messages, intake.image_tag if intake is not None else None, native_tools)
        check_images(conversation.images, self.args)
        top = chat_top_logprobs(body)
        max_tokens, max_tokens_field = chat_max_tokens(body)
        template_tools = None
        if tools.in_prompt:
            if native_tools:
                template_tools = [t.model_dump(exclude_none=True) for t in tools.tools]
            else:
                conversation.messages = with_system_text(conversation.messages, tools_system_prompt(tools.tools))
        text = await self._render_chat(conversation.messages, template_tools)
        # The template wrote the special tokens (bos, turn markers) itself.
        ids = await self.manager.tokenize(text, add_special_tokens=False)
        images = None
        if conversation.images:
            images = await intake.prepare(ids, [ImageSource.from_url(ref.url) for ref in conversation.images])
            ids = images.prompt_ids
        check_prompt_length(len(ids), "messages")
        samplings = openai_sampling(body, len(ids), self.args, max_tokens=max_tokens, max_tokens_field=max_tokens_field,
                                    prompt_field="messages", logprobs=top, grammar=grammar)
        logprobs = bool(body.logprobs)
        choices = [_Choice(ChoiceInfo(index=i, logprobs=logprobs, tools=tools if tools.in_prompt else None), ids, s, images)
                   for i, s in enumerate(samplings)]
        return _Prepared(ChatFormat(), choices, len(ids), bool(body.stream), body.include_usage, logprobs)

    async def _render_chat(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None) -> str:
        def render(tok) -> str:
            return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)

        try:
            return await self.manager.with_tokenizer(render)
        except (TemplateError, ValueError) as exc:  # no template, or the template refused the messages
            raise validation_error(f"`messages`: the chat template could not render them: {exc}", "messages") from None

    # ---- answering -------------------------------------------------------------------------

    async def _answer(self, request: Request, prep: _Prepared) -> Response:
        if prep.stream:
            return EventStreamResponse(self._events(prep))
        try:
            outs = await run_unless_disconnected(request.receive, self._collect(prep.choices))
        except ServerUnavailable as exc:
            raise unavailable(str(exc)) from None
        flat = [o for choice_outs in outs for o in choice_outs]
        tops = iter(await self._top_texts(flat) if prep.logprobs else [[] for _ in flat])
        for c, choice_outs in zip(prep.choices, outs):
            await self._take_scores(c.info, choice_outs[0])
        choices = [prep.fmt.full_choice(c.info, choice_outs, [next(tops) for _ in choice_outs])
                   for c, choice_outs in zip(prep.choices, outs)]
        completion_tokens = sum(_completion_tokens(c, o) for c, o in zip(prep.choices, outs))
        cached = _cached_tokens(prep.choices, [o[-1].cached_tokens if o else 0 for o in outs])
        return JSONResponse({
            **_header(prep.fmt, prep.fmt.object_full, self.model_name),
            "choices": choices,
            "usage": usage(prep.prompt_tokens, completion_tokens, cached),
        })

    async def _collect(self, choices: list[_Choice]) -> list[list[TextOut]]:
        """Every output of every choice; the first failure fails the whole request."""
        results: list[list[TextOut]] = [[] for _ in choices]
        async with contextlib.aclosing(self._merged(choices)) as merged:
            async for i, out in merged:
                failure = failure_of(out)
                if failure is not None:
                    raise generation_error(failure)
                results[i].append(out)
        return results

    async def _events(self, prep: _Prepared) -> AsyncGenerator[bytes, None]:
        header = _header(prep.fmt, prep.fmt.object_chunk, self.model_name)

        def chunk(choices: list[dict[str, Any]], usage_body: Any = None) -> bytes:
            body = {**header, "choices": choices}
            if prep.include_usage:  # OpenAI: then every chunk has `usage`, null but in the last one
                body["usage"] = usage_body
            return sse_event(body)

        offsets = [len(c.info.echo) for c in prep.choices]
        completion_tokens = [0] * len(prep.choices)
        cached_tokens = [0] * len(prep.choices)
        try:
            for c in prep.choices:
                opening = prep.fmt.opening(c.info)
                if opening is not None:
                    yield chunk([opening])
            async with contextlib.aclosing(self._merged(prep.choices)) as merged:
                async for i, out in merged:
                    failure = failure_of(out)
                    if failure is not None:
                        yield sse_event(openai_error_body(generation_error(failure)))
                        break
                    if not prep.choices[i].info.prompt_only:
                        completion_tokens[i] = out.completion_tokens or completion_tokens[i] + 1
                    cached_tokens[i] = out.cached_tokens
                    await self._take_scores(prep.choices[i].info, out)
                    tops = (await self._top_texts([out]))[0] if prep.logprobs else []
                    piece = prep.fmt.delta(prep.choices[i].info, out, tops, offsets[i])
                    offsets[i] += len(out.text)
                    if piece is not None:
                        yield chunk([piece])
                else:  # every choice ended normally
                    if prep.include_usage:
                        yield chunk([], usage(prep.prompt_tokens, sum(completion_tokens),
                                              _cached_tokens(prep.choices, cached_tokens)))
        except ServerUnavailable as exc:
            yield sse_event(openai_error_body(unavailable(str(exc))))
        except ApiError as exc:  # the image cache had no room (429) after the headers went out
            yield sse_event(openai_error_body(exc))
        except Exception:  # headers are sent: the stream can only end with an error event
            logger.exception("OpenAI stream failed")
            yield sse_event(openai_error_body(ApiError(500, "internal server error", GENERATION)))
        yield _DONE

    async def _merged(self, choices: list[_Choice]) -> AsyncIterator[tuple[int, TextOut]]:
        """(choice index, output) of all choices as they come, until each has ended.

        Each choice is a request of its own, read by a task of its own. Closing this generator
        early (a failure, a client gone) cancels the tasks, whose `async with` then aborts the
        requests still running.
        """
        queue: asyncio.Queue[tuple[int, Union[TextOut, BaseException]]] = asyncio.Queue()

        async def pump(i: int, choice: _Choice) -> None:
            try:
                async with self.manager.generate(choice.prompt_ids, choice.sampling, choice.images) as outs:
                    async for out in outs:
                        queue.put_nowait((i, out))
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
        try:
            running = len(choices)
            while running:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None or item.error is not None:
                    running -= 1
                yield i, item
        finally:
            await cancel_and_wait(*tasks)

    async def _top_texts(self, outs: list[TextOut]) -> list[list[str]]:
        """Each output's alternative tokens decoded on their own (one trip to the tokenizer thread)."""
        return await self._decode_each([[token_id for token_id, _ in out.top_logprobs] for out in outs])

    async def _decode_each(self, ids: list[list[int]]) -> list[list[str]]:
        if not any(ids):
            return [[] for _ in ids]
        return await self.manager.with_tokenizer(lambda tok: [[tok.decode([t]) for t in row] for row in ids])

    async def _take_scores(self, info: ChoiceInfo, out: TextOut) -> None:
        """The first output of a scored prompt carries the scores: keep them, alternatives decoded."""
        scores = out.prompt_logprobs
        if scores is None:
            return
        texts = await self._decode_each([[token_id for token_id, _ in row] for row in scores.top_logprobs])
        info.scored = ScoredPrompt(out.prompt_token_texts, scores.logprobs,
                                   [list(zip(row_texts, (lp for _, lp in row)))
                                    for row_texts, row in zip(texts, scores.top_logprobs)])


def _header(fmt: _Format, obj: str, model: str) -> dict[str, Any]:
    return {"id": fmt.id_prefix + secrets.token_hex(12), "object": obj, "created": int(time.time()), "model": model}


def _completion_tokens(choice: _Choice, outs: list[TextOut]) -> int:
    if choice.info.prompt_only:  # its one token is not part of the answer
        return 0
    # The server's count is authoritative; the number of outputs is the fallback.
    return outs[-1].completion_tokens or len(outs)


def _cached_tokens(choices: list[_Choice], per_choice: list[int]) -> int:
    """`usage.prompt_tokens_details.cached_tokens`: like `prompt_tokens`, each prompt once; a
    prompt's `n` choices are requests of their own, and the fewest cached tokens among them count."""
    fewest: dict[int, int] = {}
    for choice, cached in zip(choices, per_choice):
        fewest[choice.prompt] = min(cached, fewest.get(choice.prompt, cached))
    return sum(fewest.values())
