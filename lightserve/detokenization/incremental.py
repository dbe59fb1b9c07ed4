"""Per-request incremental detokenization with stop strings.

The detokenization process keeps one `IncrementalDetokenizer` per running request and feeds it
each sampled token. It returns the text that may be shown to the client now:

- Work per token is O(1) in the output length. Only a short window of recent tokens is decoded:
  the *prefix* (tokens whose text was already emitted, kept as left context) and the *pending*
  tokens after it. The text of the window minus the text of the prefix is the new text. Decoding
  from the same start twice cancels out whatever a decoder does at the start of a sequence (for
  example a SentencePiece decoder dropping the leading space of the first token).
- Text that ends in an incomplete UTF-8 character (the tokenizer decodes the dangling bytes to
  U+FFFD) is held back until a later token completes it.
- Text that could still turn into a stop string (a tail equal to a proper prefix of one) is held
  back, so a stop string split over several tokens never leaks to the client.

Stop semantics: stop strings are checked whenever new text is decoded (text still ending in an
incomplete character is not decoded yet). The first time one or more stop strings occur in the
text, the output is the text *before the earliest-starting occurrence*; the stop string and all
that follows are dropped. A stop string that starts earlier but is still incomplete at that
moment does not count: the request stops at the first complete match. Without a match, the
concatenated output equals `tokenizer.decode(output_ids, skip_special_tokens=...)`: exactly for
byte-level BPE tokenizers (bar the bounded exception at `_MAX_PENDING_TOKENS`); a SentencePiece
decoder keeps the first token's leading space, as the text reads after the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from transformers import PreTrainedTokenizerBase

# What tokenizers decode an incomplete (or invalid) UTF-8 byte sequence to.
REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens decoded as left context of the first output token, so it reads as it does after
# the prompt (e.g. with its leading space under SentencePiece decoders). A few tokens suffice:
# decoders only look at the start of a sequence.
_PROMPT_CONTEXT_TOKENS = 5

# Longest run of tokens held back while the text keeps ending in U+FFFD. A real character is at
# most 4 bytes, so valid text never comes close; only invalid byte soup gets here, and the cap
# keeps the decoded window (the cost per token) bounded for it. Past the cap the U+FFFD is
# emitted as is, which can differ from decoding all ids at once only if a later token completes
# that very character.
_MAX_PENDING_TOKENS = 32


@dataclass(frozen=True)
class DetokStep:
    """The outcome of one token.

    `text` is the new text to send now (possibly ""). `stopped` means a stop string matched:
    `text` then ends right before it, `stop` is the matched string, and the request is over.
    """

    text: str
    stopped: bool = False
    stop: Optional[str] = None


class _WindowDecoder:
    """Turns token ids into new, complete text by decoding a short window of recent tokens.

    The window is the *prefix* (the tokens emitted last, kept as left context) followed by the
    *pending* tokens (text not emitted yet). Older tokens are dropped, so memory and work stay
    bounded however long the output grows.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        # A prompt ending mid-character would let the first output bytes complete a character
        # that belongs to the prompt; without context the output decodes on its own instead.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._window: list[int] = context
        self._prefix_len = len(context)  # window[:prefix_len] is the prefix
        self._prefix_text = self._decode(context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while the text ends mid-character)."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        pending = len(self._window) - self._prefix_len
        if text.endswith(REPLACEMENT_CHAR) and pending < _MAX_PENDING_TOKENS:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Text of the pending tokens as the tokenizer decodes it, complete or not."""
        if self._prefix_len == len(self._window):
            return ""
        return self._advance(self._decode(self._window))

    def _advance(self, window_text: str) -> str:
        """Emit the window's new text; the pending tokens become the next window's prefix."""
        new_text = window_text[len(self._prefix_text) :]
        del self._window[: self._prefix_len]
        self._prefix_len = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new_text


class _StopMatcher:
    """Finds stop strings in a stream of text pieces and holds back possible starts of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        # An empty stop string would match before any text; it cannot mean anything useful.
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""  # tail of the text that is a proper prefix of some stop string

    def feed(self, text: str) -> tuple[str, Optional[str]]:
        """Return (text safe to emit, matched stop string or None).

        Only `held + text` needs searching: any stop string ending in `text` either lies inside
        it or started in the held tail (that start was a prefix of it, hence held).
        """
        buf = self._held + text
        best_pos, best_stop = -1, None
        for stop in self._stops:
            pos = buf.find(stop)
            if pos >= 0 and (best_stop is None or pos < best_pos):
                best_pos, best_stop = pos, stop
        if best_stop is not None:
            self._held = ""
            return buf[:best_pos], best_stop
        keep = self._partial_match_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release the held tail (the text ended; it can no longer become a stop string)."""
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class IncrementalDetokenizer:
    """Streams the text of one request's output tokens, with stop strings.

    Call `step()` for each generated token and send `DetokStep.text` to the client. When the
    request ends for another reason than a stop string (eos, length, abort), call `finish()`
    and send its text too. Tokens that arrive after a stop matched are ignored (the router may
    have sampled one more before it heard of the stop).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self._window = _WindowDecoder(tokenizer, prompt_ids, skip_special_tokens)
        self._matcher = _StopMatcher(stop)
        self._output_ids: list[int] = []
        self._chunks: list[str] = []  # emitted texts; joined only when asked for
        self._stop: Optional[str] = None
        self._finished = False

    def step(self, token_id: int) -> DetokStep:
        """Feed one generated token; return the text that may be emitted now."""
        if self._stop is not None:
            return DetokStep("", stopped=True, stop=self._stop)
        if self._finished:
            raise RuntimeError("step() after finish(): the request is over")
        self._output_ids.append(int(token_id))
        return self._emit(self._window.push(token_id))

    def finish(self) -> str:
        """End of generation: flush all held-back text (incomplete UTF-8 decoded as is).

        A stop string can still match in the flushed text (only one containing U+FFFD can); the
        text is then cut before it and `stopped` turns true. Returns "" after a stop.
        """
        if self._finished:
            return ""
        result = self._emit(self._window.flush())
        self._finished = True
        if result.stopped:
            return result.text
        tail = self._matcher.flush()
        self._chunks.append(tail)
        return result.text + tail

    def _emit(self, new_text: str) -> DetokStep:
        if not new_text:
            return DetokStep("")
        text, stop = self._matcher.feed(new_text)
        if stop is not None:
            self._stop = stop
            self._finished = True
        self._chunks.append(text)
        return DetokStep(text, stopped=stop is not None, stop=stop)

    @property
    def output_text(self) -> str:
        """All text emitted so far (held-back text excluded)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def output_ids(self) -> list[int]:
        """The generated token ids fed so far (a copy; tokens after a stop are not included)."""
        return list(self._output_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_ids)

    @property
    def stopped(self) -> bool:
        """True once a stop string matched."""
        return self._stop is not None

    @property
    def matched_stop(self) -> Optional[str]:
        return self._stop

    @property
    def finished(self) -> bool:
        """True after a stop string matched or `finish()` was called."""
        return self._finished
