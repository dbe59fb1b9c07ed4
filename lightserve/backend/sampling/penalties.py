"""Repetition (HF-style), presence and frequency (OpenAI-style) penalties, one row per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lightserve.backend.sampling.workspace import Workspace, buffer
from lightserve.io_struct import SamplingParams


def _scatter_rows(
    n_rows: int, ids: Sequence[Sequence[int]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of ragged per-row id lists, for one index_put_."""
    rows = torch.repeat_interleave(torch.arange(n_rows), torch.tensor([len(r) for r in ids], dtype=torch.int64))
    cols = torch.tensor([t for r in ids for t in r], dtype=torch.int64)
    return rows.to(device), cols.to(device)


@dataclass
class PenaltyState:
    """History of a batch for the penalties; exists only while some row uses a penalty.

    Rows whose penalties are neutral (repetition 1, presence and frequency 0) change nothing,
    whatever their history; merged in from a batch without a state they start with none (zeros),
    since their settings never change and their history is never needed.
    """

    counts: torch.Tensor  # int32 [B, V]: times each token was generated
    seen: torch.Tensor  # bool [B, V]: token is in the prompt or was generated (repetition penalty)
    # float32 [B, V]: frequency * count + presence * (count > 0), kept up to date in `update`, so
    # applying presence/frequency costs one subtraction; None when no row uses them.
    bias: Optional[torch.Tensor]
    repetition: torch.Tensor  # float32 [B]
    presence: torch.Tensor  # float32 [B]
    frequency: torch.Tensor  # float32 [B]
    any_repetition: bool = field(init=False)

    def __post_init__(self) -> None:
        self.any_repetition = bool((self.repetition != 1.0).any())

    @staticmethod
    def uses_penalty(p: SamplingParams) -> bool:
        """Whether a request needs a penalty state at all."""
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> Optional["PenaltyState"]:
        """State for new requests, or None when none of them uses a penalty.

        `output_ids` are tokens already generated (a paused request coming back), else empty lists.
        """
        if not any(cls.uses_penalty(p) for p in params):
            return None
        b = len(params)
        counts = torch.zeros(b, vocab_size, dtype=torch.int32, device=device)
        one = torch.ones((), dtype=torch.int32, device=device)
        counts.index_put_(_scatter_rows(b, output_ids, device), one, accumulate=True)
        seen = counts > 0
        seen[_scatter_rows(b, prompt_ids, device)] = True

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)

        presence, frequency = column("presence_penalty"), column("frequency_penalty")
        bias = None
        if bool((presence != 0).any() or (frequency != 0).any()):
            bias = counts * frequency[:, None] + (counts > 0) * presence[:, None]
        return cls(counts, seen, bias, column("repetition_penalty"), presence, frequency)

    @classmethod
    def neutral(cls, n: int, vocab_size: int, with_bias: bool, device: torch.device | str) -> "PenaltyState":
        """Rows that use no penalty, to merge with rows that do."""
        zeros = torch.zeros(n, dtype=torch.float32, device=device)
        bias = torch.zeros(n, vocab_size, dtype=torch.float32, device=device) if with_bias else None
        return cls(
            torch.zeros(n, vocab_size, dtype=torch.int32, device=device),
            torch.zeros(n, vocab_size, dtype=torch.bool, device=device),
            bias,
            torch.ones(n, dtype=torch.float32, device=device),
            zeros,
            zeros.clone(),
        )

    def apply(self, logits: torch.Tensor, ws: Optional[Workspace] = None) -> torch.Tensor:
        """Penalised copy of `logits` [B, V] (a workspace buffer when `ws` is given); neutral rows
        come out bit-identical."""
        rows = logits.shape[0]
        out = buffer(ws, "penalised", logits, rows)
        if self.any_repetition:
            # transformers' RepetitionPenaltyLogitsProcessor, written into buffers:
            # where(seen, where(x < 0, x * p, x / p), x).
            rep = self.repetition[:, None]
            shrunk = torch.mul(logits, rep, out=buffer(ws, "penalty_scratch", logits, rows))
            torch.div(logits, rep, out=out)
            negative = torch.lt(logits, 0, out=buffer(ws, "penalty_mask", logits, rows, torch.bool))
            torch.where(negative, shrunk, out, out=out)
            torch.where(self.seen, out, logits, out=out)
            if self.bias is not None:
                out.sub_(self.bias)
        else:  # a state exists only while some row uses a penalty, so this one has a bias
            torch.sub(logits, self.bias, out=out)
        return out

    def update(self, next_ids: torch.Tensor) -> None:
        """Record one generated token per row."""
        rows = torch.arange(next_ids.numel(), device=next_ids.device)
        new_counts = self.counts[rows, next_ids] + 1
        self.counts[rows, next_ids] = new_counts
        self.seen[rows, next_ids] = True
        if self.bias is not None:
            self.bias[rows, next_ids] = new_counts * self.frequency + self.presence

    def filter(self, keep: torch.Tensor) -> Optional["PenaltyState"]:
        """Rows `keep` (int64 indices, in that order); None when none of them uses a penalty."""
        rep, pres, freq = self.repetition[keep], self.presence[keep], self.frequency[keep]
        if not bool(((rep != 1) | (pres != 0) | (freq != 0)).any()):
            return None
        bias = None
        if self.bias is not None and bool(((pres != 0) | (freq != 0)).any()):
            bias = self.bias[keep]
        return PenaltyState(self.counts[keep], self.seen[keep], bias, rep, pres, freq)

    @staticmethod
    def merge(
        a: Optional["PenaltyState"],
        b: Optional["PenaltyState"],
        rows_a: int,
        rows_b: int,
        vocab_size: int,
        device: torch.device | str,
    ) -> Optional["PenaltyState"]:
        """Rows of `a` then rows of `b`; a missing side is filled with neutral rows."""
        if a is None and b is None:
            return None
        with_bias = any(s is not None and s.bias is not None for s in (a, b))
        a = a if a is not None else PenaltyState.neutral(rows_a, vocab_size, with_bias, device)
        b = b if b is not None else PenaltyState.neutral(rows_b, vocab_size, with_bias, device)

        def bias_of(s: PenaltyState) -> torch.Tensor:
            return s.bias if s.bias is not None else torch.zeros_like(s.counts, dtype=torch.float32)

        return PenaltyState(
            torch.cat([a.counts, b.counts]),
            torch.cat([a.seen, b.seen]),
            torch.cat([bias_of(a), bias_of(b)]) if with_bias else None,
            torch.cat([a.repetition, b.repetition]),
            torch.cat([a.presence, b.presence]),
            torch.cat([a.frequency, b.frequency]),
        )
