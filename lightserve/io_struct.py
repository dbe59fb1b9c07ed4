"""Typed messages that cross process boundaries.

Every message between the httpserver, visual server, router, backend workers and the
detokenizer is one of these `msgspec.Struct`s, never a bare tuple. They hold plain data only
(ints, floats, strings, lists), travel as msgpack (`utils/serde.py`) and are decoded against
the kinds a socket carries, so nothing received can construct any other object.

The kinds that share a socket carry a tag (`tag=True`: a `"type"` entry naming the class),
which is what a socket's decoder picks the kind by. `Message` makes every struct strict:
a field the receiver does not know is an error, not silently dropped.
"""

from __future__ import annotations

import enum
import time
from typing import Optional, Union

import msgspec


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos_token"  # an end-of-sequence token was sampled
    STOP = "stop_sequence"  # a stop string matched in the text
    ABORT = "abort"  # client gone, error or shutdown


# The sampler divides positive logits by the repetition penalty in float32: a tiny penalty
# (1e-40, or 5e-324 which float32 rounds to 0) overflows them to inf and poisons the whole batch.
# Below 0.01 a penalty means nothing useful anyway.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every message: unknown fields are rejected; fields at their default are left
    out of the encoding (most tokens carry no alternatives, seed or error)."""


class Grammar(Message):
    """A constraint on what a request may generate (structured output).

    `kind` is one of `GRAMMAR_KINDS`: "json_schema" (the text of a JSON schema), "regex" (the
    whole output matches it), "choice" (a JSON list of strings: the output is one of them) or
    "lark" (a context-free grammar in llguidance's Lark syntax, which also reads GBNF).
    """

    kind: str
    text: str


GRAMMAR_KINDS = ("json_schema", "regex", "choice", "lark")


class SamplingParams(Message):
    """How to pick the next tokens of one request.

    `temperature == 0` means greedy decoding (the other sampling knobs are then ignored).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k cut
    repetition_penalty: float = 1.0  # HF-style: over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI-style: over generated tokens
    frequency_penalty: float = 0.0  # OpenAI-style: over generated tokens
    seed: Optional[int] = None  # None: a random seed is drawn (and reported back)
    stop: list[str] = msgspec.field(default_factory=list)  # stop strings, matched on text
    stop_token_ids: list[int] = msgspec.field(default_factory=list)  # extra token ids that end a request
    ignore_eos: bool = False
    logprobs: int = 0  # number of top alternatives to return per token (0: only the chosen one)
    grammar: Optional[Grammar] = None  # structured output: only tokens the grammar allows are drawn
    # Score the prompt: the log-probability of every prompt token after the first under the model,
    # with this many top alternatives per position; None: not scored. Such a request takes no
    # prefix-cache hit (the cached positions would have no logits), so its whole prompt is computed.
    prompt_logprobs: Optional[int] = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError with a message naming the offending field."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"`{name}` {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            fail("max_new_tokens", "must be a positive integer")
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            fail("temperature", "must be in [0, 100]")
        if not (0.0 < self.top_p <= 1.0):
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail("top_k", "must be -1 (disabled) or a non-negative integer")
        if not (MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            fail("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}]")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            fail("presence_penalty", "must be in [-2, 2]")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            fail("seed", "must be an integer in [0, 2^63)")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            fail("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            fail("prompt_logprobs", "must be null or an integer in [0, 20]")
        if self.grammar is not None and self.grammar.kind not in GRAMMAR_KINDS:
            fail("grammar", f"kind must be one of {', '.join(GRAMMAR_KINDS)}")


class ImageItem(Message):
    """One image of a multimodal request, as the cache manager knows it."""

    md5: str
    record_id: int = -1  # cache_manager record holding bytes and embeddings
    token_start: int = 0  # first placeholder position in the prompt
    token_num: int = 0  # number of placeholder tokens (= embedding rows)


class GenerateReq(Message, tag=True):
    """A tokenized request on its way to the router."""

    req_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[ImageItem] = msgspec.field(default_factory=list)
    arrival_time: float = msgspec.field(default_factory=time.time)
    # Tokens generated before the request was paused; recomputed with the prompt on resume.
    output_ids: list[int] = msgspec.field(default_factory=list)

    @property
    def scores_prompt(self) -> bool:
        """Whether this admission computes the prompt's scores (`SamplingParams.prompt_logprobs`):
        on the first one only, as a resumed request sent them before its pause."""
        return self.sampling.prompt_logprobs is not None and not self.output_ids


class AbortReq(Message, tag=True):
    req_id: int


class FlushCache(Message, tag=True):
    """Drop every prefix-cache entry no running request uses (httpserver -> router -> ranks)."""


class PromptLogprobs(Message):
    """A scored prompt (`SamplingParams.prompt_logprobs`), computed by the ranks over the
    prompt's chunks and sent with the request's first token.

    Entry i is about prompt token i+1: the first token has no context, so it has no entry (and a
    one-token prompt has none). Log-probabilities are the log-softmax of the raw model logits in
    float32, before any penalty, temperature or grammar."""

    logprobs: list[float]  # log P(prompt[i+1] | prompt[:i+1])
    # Per entry, the `prompt_logprobs` most likely tokens there as (token id, logprob), best
    # first; empty (no entries at all) when no alternatives were asked for.
    top_logprobs: list[list[tuple[int, float]]] = msgspec.field(default_factory=list)


class TokenOut(Message):
    """One generated token of one request (ranks -> router -> detokenizer)."""

    req_id: int
    token_id: int
    logprob: float
    finish_reason: Optional[FinishReason] = None
    # Top alternatives as (token_id, logprob) when the request asked for them.
    top_logprobs: list[tuple[int, float]] = msgspec.field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    seed: Optional[int] = None
    error: Optional[str] = None  # the request failed or was refused inside the router/backend
    prompt_logprobs: Optional[PromptLogprobs] = None  # a scored prompt, with the request's first token


class BatchTokenOut(Message, tag=True):
    outs: list[TokenOut]


class TextOut(Message):
    """Detokenized output of one request (detokenizer -> httpserver)."""

    req_id: int
    text: str  # the new text since the previous TextOut (may be "")
    token_id: int
    logprob: float
    token_text: str = ""  # this token decoded on its own (TGI `details.tokens[].text`)
    special: bool = False  # the token is a special token (e.g. EOS)
    finish_reason: Optional[FinishReason] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0
    top_logprobs: list[tuple[int, float]] = msgspec.field(default_factory=list)
    seed: Optional[int] = None
    error: Optional[str] = None  # set when the request failed inside the server
    # A scored prompt (first output only), and every prompt token decoded on its own (as
    # `token_text`), the first one included.
    prompt_logprobs: Optional[PromptLogprobs] = None
    prompt_token_texts: list[str] = msgspec.field(default_factory=list)


class BatchTextOut(Message, tag=True):
    outs: list[TextOut]


class RouterStats(Message, tag=True):
    """The router's view of load (router -> httpserver, for /metrics and tests)."""

    kv_total: int
    kv_used: int  # slots held by running requests
    running_reqs: int
    waiting_reqs: int
    kv_cached: int = 0  # slots the prefix cache holds (locked by running requests or evictable)
    # Seconds each request admitted since the last report waited in the queue.
    queue_times: list[float] = msgspec.field(default_factory=list)


# ---- router <-> backend ranks: one call per rank per step -------------------------------------


class Chunk(Message, array_like=True):
    """`num_tokens` more tokens of one request computed this step: the next piece of its prompt
    (recomputed output included after a pause). The chunk that reaches the end of those tokens
    samples the request's next token; the request decodes from then on."""

    req_id: int
    num_tokens: int


class StepPlan(Message, tag=True):
    """Everything a rank does in one step, in this order:

    0. `flush`: the prefix cache drops every entry no request holds;
    1. `release`: requests finished outside the rank (stop string), aborted or paused since the
       last step: their computed KV goes to the prefix cache (or is freed) and their table rows
       are freed;
    2. `new_reqs`: requests joining the rank's persistent batch; `new_reqs[i]` starts with its
       first `cached[i]` tokens taken from the prefix cache (the router found them there; an
       empty `cached`: no hits);
    3. `evict`: the prefix cache frees that many unused tokens (least recently used) so that the
       step's tokens fit;
    4. the forward pass over `decode` (every request that has sampled a token computes that one
       token) and `chunks` (prompt pieces, in this order), then sampling.
    """

    new_reqs: list[GenerateReq] = msgspec.field(default_factory=list)
    cached: list[int] = msgspec.field(default_factory=list)
    chunks: list[Chunk] = msgspec.field(default_factory=list)
    decode: bool = False
    release: list[int] = msgspec.field(default_factory=list)
    evict: int = 0
    flush: bool = False

    @classmethod
    def admit_whole(cls, reqs: list[GenerateReq]) -> "StepPlan":
        """Admit `reqs` and compute their whole prompts in this step (no decode rows, no cache hits)."""
        return cls(new_reqs=reqs, chunks=[Chunk(r.req_id, len(r.prompt_ids) + len(r.output_ids)) for r in reqs])

    @property
    def is_empty(self) -> bool:
        return not (self.new_reqs or self.chunks or self.decode or self.release or self.flush)


class Shutdown(Message, tag=True):
    """The router is going away: ranks stop (and rank 0 tells the ranks of other nodes)."""


RankCall = Union[StepPlan, Shutdown]


class StepResult(Message, tag=True):
    """A rank's answer to one StepPlan (rank 0's is the one the router reads)."""

    outs: list[TokenOut]  # one per request that sampled, plus one error per request refused at admission
    kv_total: int
    kv_free: int
    kv_cached: int  # slots the prefix cache holds
    kv_evictable: int  # of those, slots no running request uses
    running_reqs: int  # requests in the rank's persistent batch after the step
