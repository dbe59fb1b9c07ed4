"""The JSON of OpenAI responses and stream chunks, built from `TextOut`s.

Pure functions (no I/O), one formatter per route. The handlers in `openai_api` drive them:
`full_choice` for a whole answer, `opening` and `delta` for the chunks of a stream.

Conventions shared by both routes:
- A token's text in logprobs is the token decoded on its own (`TextOut.token_text`); a token
  that is only part of a UTF-8 character shows as U+FFFD there, while the answer text is exact.
- The end-of-sequence token is part of the logprobs (and of `usage.completion_tokens`) but adds
  no text. Tokens that complete a stop string are reported, though the text is cut before it.
- `finish_reason` is "stop" for an end-of-sequence token or a stop string, "length" otherwise,
  and "tool_calls" for a chat answer that called tools.

Completions with `echo` and `logprobs` put the prompt's tokens before the answer's in the
logprobs (vLLM's layout): the first has no context, so its logprob and alternatives are null;
each other's alternatives are the N most likely tokens plus the token itself. Streamed, the
prompt and its logprobs come in the first chunk, with the answer's first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from lightserve.httpserver.tools import ContentStream, ToolPlan
from lightserve.io_struct import FinishReason, TextOut

_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}


def finish_reason(out: TextOut) -> Optional[str]:
    return None if out.finish_reason is None else _FINISH[out.finish_reason]


def finite_logprob(value: float) -> float:
    """JSON has no -inf: a token the model gave zero probability reports -9999 (as vLLM does)."""
    return value if math.isfinite(value) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens whose KV the
    prefix cache already held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class ScoredPrompt:
    """A prompt the engine scored (`TextOut.prompt_logprobs`), with its alternatives decoded."""

    texts: list[str]  # every prompt token decoded on its own
    logprobs: list[float]  # of texts[1:], each given the tokens before it
    alternatives: list[list[tuple[str, float]]]  # per entry of `logprobs`, (text, logprob); [] if none asked

    def completion_logprobs(self) -> dict[str, Any]:
        """The legacy layout of the prompt's tokens; offsets count the token texts from 0."""
        offsets, pos = [], 0
        for text in self.texts:
            offsets.append(pos)
            pos += len(text)
        tops = self.alternatives or [[] for _ in self.logprobs]
        return {
            "tokens": list(self.texts),
            "token_logprobs": [None, *map(finite_logprob, self.logprobs)],
            "top_logprobs": [None, *({**{t: finite_logprob(lp) for t, lp in alts}, text: finite_logprob(own)}
                                     for alts, text, own in zip(tops, self.texts[1:], self.logprobs))],
            "text_offset": offsets,
        }


@dataclass
class ChoiceInfo:
    """What the formatters need to know about one choice besides its outputs."""

    index: int
    logprobs: bool  # whether the client asked for logprobs
    echo: str = ""  # completions: the prompt text to put before the answer
    tools: Optional[ToolPlan] = None  # chat with tools: the answer may hold calls
    # Completions with `echo` and `max_tokens: 0`: the answer is the prompt alone (the engine's
    # one token is left out).
    prompt_only: bool = False
    # Completions with `echo` and `logprobs`: the scored prompt, set when its first output came.
    scored: Optional[ScoredPrompt] = None
    # A stream of a choice with tools: its text so far and how much of it went out as content.
    content: ContentStream = field(init=False)

    def __post_init__(self) -> None:
        self.content = ContentStream(hold_all=self.tools is not None and self.tools.holds_text)


class ChatFormat:
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def full_choice(self, c: ChoiceInfo, outs: list[TextOut], top_texts: list[list[str]]) -> dict[str, Any]:
        logprobs = {"content": [_chat_entry(o, t) for o, t in zip(outs, top_texts)]} if c.logprobs else None
        text = "".join(o.text for o in outs)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = finish_reason(outs[-1])
        if c.tools is not None:
            content, calls = c.tools.parse(text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [call.openai() for call in calls]}
                reason = "tool_calls"
        return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def opening(self, c: ChoiceInfo) -> Optional[dict[str, Any]]:
        """The first chunk of each choice announces the role, as OpenAI's does."""
        return {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, c: ChoiceInfo, out: TextOut, top_texts: list[str], offset: int) -> Optional[dict[str, Any]]:
        """The chunk for one output, or None when it has nothing to tell (text held back).

        With tools, content streams as it comes except what may be a call (all of it when the
        call is forced); the calls go out in the last chunk, whole, each with its `index`."""
        delta: dict[str, Any] = {}
        reason = finish_reason(out)
        if c.tools is None:
            piece = out.text
        else:
            piece = c.content.feed(out.text)
            if reason is not None:  # the rest of the content: no call comes before what was sent
                content, calls = c.tools.parse(c.content.text)
                piece += (content or "")[c.content.sent:]
                if calls:
                    delta["tool_calls"] = [call.openai(index=k) for k, call in enumerate(calls)]
                    reason = "tool_calls"
        if piece:
            delta = {"content": piece, **delta}
        if not delta and not c.logprobs and reason is None:
            return None
        return {
            "index": c.index,
            "delta": delta,
            "logprobs": {"content": [_chat_entry(out, top_texts)]} if c.logprobs else None,
            "finish_reason": reason,
        }


class CompletionFormat:
    object_full = "text_completion"
    object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def full_choice(self, c: ChoiceInfo, outs: list[TextOut], top_texts: list[list[str]]) -> dict[str, Any]:
        answer = [] if c.prompt_only else outs
        offsets, pos = [], len(c.echo)
        for o in answer:
            offsets.append(pos)
            pos += len(o.text)
        return {
            "index": c.index,
            "text": c.echo + "".join(o.text for o in answer),
            "logprobs": self._logprobs(answer, top_texts, offsets, c.scored) if c.logprobs else None,
            "finish_reason": "length" if c.prompt_only else finish_reason(outs[-1]),
        }

    def opening(self, c: ChoiceInfo) -> Optional[dict[str, Any]]:
        """With `echo`, the prompt comes first, in a chunk of its own; with `logprobs` too, it
        waits for the first output, which brings the prompt's logprobs."""
        if not c.echo or c.logprobs:
            return None
        return {"index": c.index, "text": c.echo, "logprobs": None, "finish_reason": None}

    def delta(self, c: ChoiceInfo, out: TextOut, top_texts: list[str], offset: int) -> Optional[dict[str, Any]]:
        # The first output of a scored prompt brings the prompt (text and logprobs) along.
        scored = c.scored if out.prompt_logprobs is not None else None
        if c.prompt_only:
            text, reason, logprobs = "", "length", ([], [], [])
        else:
            text, reason, logprobs = out.text, finish_reason(out), ([out], [top_texts], [offset])
        if scored is not None:
            text = c.echo + text
        if not text and not (c.logprobs and logprobs[0]) and reason is None:
            return None
        return {
            "index": c.index,
            "text": text,
            "logprobs": self._logprobs(*logprobs, scored) if c.logprobs else None,
            "finish_reason": reason,
        }

    @staticmethod
    def _logprobs(outs: list[TextOut], top_texts: list[list[str]], offsets: list[int],
                  scored: Optional[ScoredPrompt]) -> dict[str, Any]:
        """The answer's tokens in the legacy layout, after the scored prompt's, if any."""
        answer = _completion_logprobs(outs, top_texts, offsets)
        if scored is None:
            return answer
        prompt = scored.completion_logprobs()
        return {key: prompt[key] + answer[key] for key in prompt}


def _chat_entry(out: TextOut, top_texts: list[str]) -> dict[str, Any]:
    return {
        **_token_logprob(out.token_text, out.logprob),
        "top_logprobs": [_token_logprob(text, lp) for text, (_, lp) in zip(top_texts, out.top_logprobs)],
    }


def _token_logprob(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": finite_logprob(logprob), "bytes": list(text.encode())}


def _completion_logprobs(outs: list[TextOut], top_texts: list[list[str]], offsets: list[int]) -> dict[str, Any]:
    """The legacy completions layout: parallel lists, alternatives as {token text: logprob}."""
    return {
        "tokens": [o.token_text for o in outs],
        "token_logprobs": [finite_logprob(o.logprob) for o in outs],
        "top_logprobs": [
            {text: finite_logprob(lp) for text, (_, lp) in zip(texts, o.top_logprobs)} for o, texts in zip(outs, top_texts)
        ],
        "text_offset": offsets,
    }
