"""Vectorised next-token sampling for a running batch.

`SamplingBatch` holds one row of sampling settings per request (built once at admission, then
filtered and merged with the batch); `sample(logits, batch, steps)` picks one token per row with
tensor ops over the whole batch, never a Python loop per request.

Per row, in order (vLLM's order): penalties on the raw logits (repetition over prompt + generated
tokens, HF-style; presence and frequency over generated tokens, OpenAI-style); then greedy rows take
the maximum, and sampling rows divide by the temperature, keep the top-k tokens and then the top-p
nucleus of what is left, and draw from the kept tokens. Top-k and top-p are threshold cuts, like
transformers' warpers: every token tied with the last kept value is kept too.

Reproducibility. A row's draw uses one uniform number that is a pure function of (request seed,
number of tokens the request has generated so far): the SplitMix64 stream of the seed, read at that
step with int64 tensor ops. It is turned into a token by inverting the row's cumulative
distribution in vocabulary order. Every quantity the choice depends on is computed per row by
elementwise ops, row maxima and sequential (cumsum/scatter_add) sums, never by a parallel
reduction whose rounding depends on how many rows share the tensor, so the same logits, settings
and seed give the same token whatever else is in the batch and in which order.

Broken rows. A row whose logits hold NaN or +inf, or none that is finite (a broken model, fp16
overflow, a penalty at its bound on huge logits), is made finite before anything else (`_finite`),
so every row has a maximum and a positive total and the chosen id is always inside the vocabulary;
one check over the row maxima finds such rows, so a healthy batch pays only for reading B flags
back (on CUDA a host sync, a little before the engine's own read of the chosen ids).

Speed (B=64, V=49152 on this CPU). Not Gumbel-max with one random number per (row, vocab index):
hashing and two logarithms over [B, V] cost about twice the exp + cumsum of the inverse CDF, which
needs one random number per row. Not a full-vocabulary sort for top-p (100-300 ms): a row with a
top-k cut finds its nucleus among its top-k candidates, any other row from a histogram of its
probabilities (see `_nucleus_floor`). Greedy rows cost one max pass; penalties cost nothing unless
some row of the batch uses one; [B, V] temporaries live in a per-batch `Workspace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lightserve.backend.sampling.penalties import PenaltyState
from lightserve.backend.sampling.rng import seed_keys, uniforms
from lightserve.backend.sampling.workspace import Workspace, buffer
from lightserve.io_struct import SamplingParams

# ---------------------------------------------------------------------------------------------
# Per-batch settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Host-side summary of a batch, computed when the batch changes, so that each step chooses
    its code paths without reading tensors back."""

    sample_rows: torch.Tensor  # int64 indices of the rows that sample (temperature > 0)
    max_top_k: int  # over sampling rows; 0: no row cuts by top-k
    any_top_p: bool  # over sampling rows
    logprob_rows: torch.Tensor  # rows asking for top alternatives
    max_logprobs: int


@dataclass
class SamplingBatch:
    """Sampling settings of a running batch, one row per request (tensors on the model's device)."""

    temperature: torch.Tensor  # float32 [B]; 0: greedy
    top_k: torch.Tensor  # int64 [B]; 0: no cut (-1, 0 and k >= V are stored as 0)
    top_p: torch.Tensor  # float32 [B]
    keys: torch.Tensor  # int64 [B]: random stream key of the request's seed
    logprobs: torch.Tensor  # int64 [B]: top alternatives to report
    penalties: Optional[PenaltyState]
    vocab_size: int
    plan: _Plan = field(init=False)
    workspace: Workspace = field(init=False, default_factory=Workspace)

    def __post_init__(self) -> None:
        sampling = self.temperature > 0
        self.plan = _Plan(
            sample_rows=sampling.nonzero().squeeze(1),
            max_top_k=int(torch.where(sampling, self.top_k, 0).max()) if len(self) else 0,
            any_top_p=bool((sampling & (self.top_p < 1)).any()),
            logprob_rows=(self.logprobs > 0).nonzero().squeeze(1),
            max_logprobs=int(self.logprobs.max()) if len(self) else 0,
        )

    def __len__(self) -> int:
        return self.temperature.numel()

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        prompt_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        output_ids: Optional[Sequence[Sequence[int]]] = None,
    ) -> "SamplingBatch":
        """Rows for new requests. `seeds` are the effective seeds (drawn by the caller when
        `params.seed` is None); `output_ids` are tokens already generated, for a paused request
        that is recomputed (its `steps` then continue from len(output_ids))."""
        outputs = output_ids if output_ids is not None else [[] for _ in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            keys=seed_keys(seeds, device),
            logprobs=torch.tensor([p.logprobs for p in params], dtype=torch.int64, device=device),
            penalties=PenaltyState.build(params, prompt_ids, outputs, vocab_size, device),
            vocab_size=vocab_size,
        )

    def filter(self, keep: torch.Tensor) -> "SamplingBatch":
        """Rows `keep` (int64 indices into this batch, in the order given)."""
        keep = keep.to(self.temperature.device)
        return SamplingBatch(
            self.temperature[keep],
            self.top_k[keep],
            self.top_p[keep],
            self.keys[keep],
            self.logprobs[keep],
            self.penalties.filter(keep) if self.penalties is not None else None,
            self.vocab_size,
        )

    @staticmethod
    def merge(a: "SamplingBatch", b: "SamplingBatch") -> "SamplingBatch":
        """Rows of `a` followed by rows of `b`."""
        if a.vocab_size != b.vocab_size:
            raise ValueError(f"cannot merge batches over vocabularies of {a.vocab_size} and {b.vocab_size} tokens")
        return SamplingBatch(
            torch.cat([a.temperature, b.temperature]),
            torch.cat([a.top_k, b.top_k]),
            torch.cat([a.top_p, b.top_p]),
            torch.cat([a.keys, b.keys]),
            torch.cat([a.logprobs, b.logprobs]),
            PenaltyState.merge(a.penalties, b.penalties, len(a), len(b), a.vocab_size, a.temperature.device),
            a.vocab_size,
        )


# ---------------------------------------------------------------------------------------------
# Filtering and drawing
# ---------------------------------------------------------------------------------------------

_EXP_FLOOR = -87.0  # exp(-87) ~ 1.6e-38 is still a normal float32

# Nucleus histogram: buckets of 1/32 nat of log-probability below the row maximum (narrow, so
# that the one bucket sorted holds few tokens: at most ~300 on SmolLM2 logits at temperature 1.5,
# top_p 0.95); the last bucket gathers everything 32 nats or more below it (probability ratio
# < 1e-14, never inside a nucleus since float32 top_p < 1 is at most 1 - 6e-8).
_BUCKETS_PER_NAT = 32
_NUM_BUCKETS = 32 * _BUCKETS_PER_NAT


def _nucleus_floor(
    shifted: torch.Tensor, weights: torch.Tensor, top_p: torch.Tensor, ws: Optional[Workspace] = None
) -> torch.Tensor:
    """Per row, the smallest value τ such that the tokens with shifted >= τ form the top-p
    nucleus of `weights` (unnormalised probabilities, 0 for tokens already cut); -inf where
    top_p >= 1.

    The nucleus is the shortest prefix of the tokens sorted by decreasing probability whose mass
    reaches top_p (transformers' TopPLogitsWarper keeps the same set, ties aside). Instead of sorting the
    vocabulary (100+ ms at B=64, V=49152 on this CPU), bucket the tokens by log-probability, sum
    the mass per bucket (scatter_add), find the bucket where the running mass crosses top_p, and
    sort only that bucket's tokens.
    """
    n = shifted.shape[0]
    # -32 * shifted: the distance below the row maximum in buckets (a power-of-two scaling: exact).
    distance = torch.mul(shifted, -_BUCKETS_PER_NAT, out=buffer(ws, "scratch", shifted, n))
    distance.clamp_(max=_NUM_BUCKETS - 1)
    bucket = buffer(ws, "bucket", shifted, n, torch.int64)
    bucket.copy_(distance)  # truncation = floor for these non-negative values
    # Tokens already cut (weight 0) add no mass. In the crossing bucket they sort after every kept
    # token (they lie below the top-k value), so at worst the floor lands on one of them when the
    # whole bucket is kept, which keeps them cut anyway.
    mass = weights.new_zeros(n, _NUM_BUCKETS).scatter_add_(1, bucket, weights)
    running = mass.cumsum(1)
    # A zero target for rows without top-p makes them cross at bucket 0 (few tokens to sort).
    target = torch.where(top_p < 1, top_p * running[:, -1], 0.0)[:, None]
    crossing = (running < target).sum(1, keepdim=True)  # <= _NUM_BUCKETS - 1 since top_p <= 1
    before = torch.where(crossing > 0, running.gather(1, (crossing - 1).clamp_(min=0)), 0.0)

    # The crossing bucket's tokens, few per row: compact them (rows ascending, then tokens
    # ascending) and order each row by decreasing value; among equal values the order stays by
    # token id, so the running sums below never depend on how a sort breaks ties.
    in_crossing = torch.eq(bucket, crossing, out=buffer(ws, "mask", shifted, n, torch.bool))
    row, token = in_crossing.nonzero(as_tuple=True)
    order = torch.sort(shifted[row, token], descending=True, stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    row, token = row[order], token[order]
    count = torch.bincount(row, minlength=n)  # >= 1: the crossing bucket holds mass
    column = torch.arange(row.numel(), device=row.device) - (count.cumsum(0) - count)[row]
    width = int(count.max())
    values = shifted.new_full((n, width), float("-inf")).index_put_((row, column), shifted[row, token])
    token_mass = weights.new_zeros(n, width).index_put_((row, column), weights[row, token])
    # The mass of bucket `crossing` re-summed in decreasing order; if rounding leaves it short of
    # the target, the whole bucket is kept.
    prefix = torch.cat([before, token_mass], 1).cumsum(1)[:, 1:]
    last = torch.minimum((prefix < target).sum(1, keepdim=True), count[:, None] - 1)
    floor = values.gather(1, last).squeeze(1)
    return torch.where(top_p < 1, floor, float("-inf"))


def _nucleus_floor_in_top_k(
    values: torch.Tensor, weights: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p floor of rows that also cut by top-k, from their top-k candidates alone.

    `values` [n, w] are the largest values of each row in decreasing order and `weights` [n, w]
    their weights after the top-k cut, with w > every top_k. Returns (floor [n], usable [n]):
    a row is usable when no value tied with its k-th one is left outside the candidates
    (then the candidates hold its whole top-k set and their running sum is its total).
    """
    k = top_k.clamp(min=1)[:, None]
    usable = (values.gather(1, k) < values.gather(1, k - 1)).squeeze(1)
    prefix = weights.cumsum(1)
    target = top_p[:, None] * prefix[:, -1:]
    last = torch.minimum((prefix < target).sum(1, keepdim=True), k - 1)
    return values.gather(1, last).squeeze(1), usable


def sampling_weights(
    shifted: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    max_top_k: Optional[int] = None,
    any_top_p: Optional[bool] = None,
    ws: Optional[Workspace] = None,
) -> torch.Tensor:
    """Unnormalised probabilities [n, V] that `sample` draws from, after top-k then top-p.

    `shifted`: (logits - row max) / temperature, so every row is <= 0 with a 0 at its maximum
    (the same order and softmax as logits / temperature, without a second max pass).
    `top_k` int64 [n] (0: no cut); `top_p` float32 [n]. `max_top_k` / `any_top_p` let the caller
    skip a stage without reading the tensors back. The result is a workspace buffer when `ws`
    is given.

    A row's top-p floor comes from its top-k candidates when it has a top-k cut, else from the
    histogram of `_nucleus_floor`; which way depends on the row alone, never on the batch.
    """
    n, vocab = shifted.shape
    if max_top_k is None:
        max_top_k = int(top_k.max())
    if any_top_p is None:
        any_top_p = bool((top_p < 1).any())
    # exp of an input below -87 (a float32 result under the smallest normal number) takes a slow
    # path on this CPU, 10-30x slower; clamped, such tokens keep a weight of ~1e-38, which no draw
    # can land on (the draw point is at least 2^-24 of the total).
    weights = torch.clamp(shifted, min=_EXP_FLOOR, out=buffer(ws, "weights", shifted, n)).exp_()
    floor = shifted.new_full((n,), float("-inf"))  # top-p floor per row
    pending = top_p < 1 if any_top_p else None  # rows whose floor is still to be found
    if max_top_k > 0:
        # One candidate past the largest k, to see whether a tie runs past a row's k-th value.
        values, ids = torch.topk(shifted, min(max_top_k + 1, vocab), dim=1)
        kth = values.gather(1, (top_k - 1).clamp(min=0)[:, None]).masked_fill_(top_k[:, None] <= 0, float("-inf"))
        weights.masked_fill_(torch.lt(shifted, kth, out=buffer(ws, "mask", shifted, n, torch.bool)), 0.0)
        if pending is not None:
            in_top_k, usable = _nucleus_floor_in_top_k(values, weights.gather(1, ids), top_k, top_p)
            done = pending & (top_k > 0) & usable
            floor = torch.where(done, in_top_k, floor)
            pending &= ~done
    if pending is not None:
        rows = pending.nonzero().squeeze(1)
        if rows.numel() == n:
            floor = _nucleus_floor(shifted, weights, top_p, ws)
        elif rows.numel():  # a few rows: plain allocations, the workspace holds [n, V] shapes
            floor[rows] = _nucleus_floor(shifted[rows], weights[rows], top_p[rows])
        weights.masked_fill_(torch.lt(shifted, floor[:, None], out=buffer(ws, "mask", shifted, n, torch.bool)), 0.0)
    return weights


def _finite(t: torch.Tensor) -> torch.Tensor:
    """`t` with NaN and -inf as the lowest finite value and +inf as the highest.

    Only for rows a model (or an extreme penalty) broke: +inf tokens share the whole mass, NaN
    tokens get none, and a row with no finite logit at all becomes uniform, so every row still
    has a maximum and a positive total and the chosen id stays inside the vocabulary.
    """
    info = torch.finfo(t.dtype)
    return torch.nan_to_num(t, nan=info.min, posinf=info.max, neginf=info.min)


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [n]: invert each row's cumulative distribution at `u` (float32 [n] in (0, 1)).

    Overwrites `weights` with its running sum, which runs in vocabulary order, sequentially, so
    it does not depend on the batch.
    """
    cdf = weights.cumsum_(1)
    total = cdf[:, -1:]
    # Stay strictly below the total: a token is chosen only where the cdf steps up (weight > 0).
    point = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(1)


@dataclass
class SampleResult:
    next_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor  # float32 [B]: log_softmax of the raw logits at next_ids
    # Top alternatives by raw log-probability, [B, max requested], padded with id -1 and -inf
    # beyond each row's own count `top_counts` (int64 [B]); None when no row asked for any.
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None
    top_counts: Optional[torch.Tensor] = None


def sample(logits: torch.Tensor, batch: SamplingBatch, steps: torch.Tensor) -> SampleResult:
    """One token per row of `logits` (float32 [B, V], raw model output; left unchanged).

    `steps` (int64 [B]): tokens each request has generated so far — the position in its random
    stream. Records the chosen tokens in the batch's penalty state.
    """
    plan, ws = batch.plan, batch.workspace
    x = batch.penalties.apply(logits, ws) if batch.penalties is not None else logits
    # One max pass serves both kinds of rows: greedy rows take its index, sampling rows shift by it.
    row_max, next_ids = torch.max(x, 1)
    # The max propagates NaN and +inf and is -inf only for a row without a finite logit, so one
    # check over [B] finds every row that would break the draw (a NaN cdf makes it return id V).
    if not bool(torch.isfinite(row_max).all()):
        logits, x = _finite(logits), _finite(x)
        row_max, next_ids = torch.max(x, 1)
    rows = plan.sample_rows
    if n := rows.numel():
        temperature = batch.temperature[rows, None]
        if n == x.shape[0]:
            shifted = torch.sub(x, row_max[:, None], out=ws.take("shifted", x, n)).div_(temperature)
        else:
            shifted = torch.index_select(x, 0, rows, out=ws.take("shifted", x, n))
            shifted.sub_(row_max[rows, None]).div_(temperature)
        weights = sampling_weights(shifted, batch.top_k[rows], batch.top_p[rows], plan.max_top_k, plan.any_top_p, ws)
        next_ids[rows] = draw(weights, uniforms(batch.keys[rows], steps.to(logits.device)[rows]))
    if batch.penalties is not None:
        batch.penalties.update(next_ids)

    # One fused pass; on this CPU cheaper than logsumexp (which runs max, exp, sum separately).
    log_probs = torch.log_softmax(logits, 1, out=ws.take("log_probs", logits, logits.shape[0]))
    result = SampleResult(next_ids, log_probs.gather(1, next_ids[:, None]).squeeze(1))
    if k := plan.max_logprobs:
        rows = plan.logprob_rows
        values, ids = torch.topk(log_probs[rows] if rows.numel() < len(batch) else log_probs, k, dim=1)
        beyond = torch.arange(k, device=logits.device) >= batch.logprobs[rows, None]
        result.top_ids = torch.full((len(batch), k), -1, dtype=torch.int64, device=logits.device)
        result.top_logprobs = torch.full((len(batch), k), float("-inf"), device=logits.device)
        result.top_ids[rows] = ids.masked_fill_(beyond, -1)
        result.top_logprobs[rows] = values.masked_fill_(beyond, float("-inf"))
        result.top_counts = batch.logprobs
    return result
