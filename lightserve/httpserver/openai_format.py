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
class ChoiceInfo:
    """What the formatters need to know about one choice besides its outputs."""

    index: int
    logprobs: bool  # whether the client asked for logprobs
    echo: str = ""  # completions: the prompt text to put before the answer
    tools: Optional[ToolPlan] = None  # chat with tools: the answer may hold calls
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
        offsets, pos = [], len(c.echo)
        for o in outs:
            offsets.append(pos)
            pos += len(o.text)
        return {
            "index": c.index,
            "text": c.echo + "".join(o.text for o in outs),
            "logprobs": _completion_logprobs(outs, top_texts, offsets) if c.logprobs else None,
            "finish_reason": finish_reason(outs[-1]),
        }

    def opening(self, c: ChoiceInfo) -> Optional[dict[str, Any]]:
        """With `echo`, the prompt comes first, in a chunk of its own."""
        if not c.echo:
            return None
        return {"index": c.index, "text": c.echo, "logprobs": None, "finish_reason": None}

    def delta(self, c: ChoiceInfo, out: TextOut, top_texts: list[str], offset: int) -> Optional[dict[str, Any]]:
        if not out.text and not c.logprobs and out.finish_reason is None:
            return None
        return {
            "index": c.index,
            "text": out.text,
            "logprobs": _completion_logprobs([out], [top_texts], [offset]) if c.logprobs else None,
            "finish_reason": finish_reason(out),
        }


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
