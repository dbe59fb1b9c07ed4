"""Prompt logprobs (`SamplingParams.prompt_logprobs`): the scores of a scored request's prompt
tokens, computed from the hidden states of the chunks that compute them."""

from __future__ import annotations

import torch

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.infer_batch import ReqState
from lightserve.backend.models.template import CausalLM

# Prompt rows whose logits are computed at once: their fp32 logits and log-softmax take
# 2 x rows x vocab x 4 bytes (100 MB at SmolLM2's 49152 tokens), however long the chunk (a whole
# prompt without chunked prefill).
SCORE_ROWS = 256


def score_prompts(model: CausalLM, hidden: torch.Tensor, chunks: list[tuple[ReqState, int]], state: ForwardState) -> None:
    """Append to each scored request's `prompt_scores` its chunk's positions: the logprob of
    the next prompt token there, and the top alternatives it asked for.

    Only positions followed by a prompt token are scored: the prompt's last position predicts
    the first generated token, which sampling reports. Every rank computes the same scores
    (the logits are gathered across tensor-parallel ranks in `compute_logits`, so all ranks
    must run it alike); the router reads rank 0's.
    """
    rows: list[int] = []
    targets: list[int] = []
    scored: list[tuple[ReqState, int]] = []
    for (req, n), start in zip(chunks, state.b_start):
        count = min(n, len(req.prompt_ids) - 1 - req.computed)
        if req.prompt_scores is None or count <= 0:
            continue
        first = state.num_decode + start
        rows.extend(range(first, first + count))
        targets.extend(req.prompt_ids[req.computed + 1 : req.computed + 1 + count])
        scored.append((req, count))
    if not scored:
        return
    dev = hidden.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
    targets_t = torch.tensor(targets, dtype=torch.long, device=dev)
    k = max(req.sampling.prompt_logprobs for req, _ in scored)
    chosen, top_values, top_ids = [], [], []
    for a in range(0, len(rows), SCORE_ROWS):
        logits = model.compute_logits(hidden.index_select(0, rows_t[a : a + SCORE_ROWS]))
        log_probs = torch.log_softmax(logits, 1)
        chosen.append(log_probs.gather(1, targets_t[a : a + SCORE_ROWS, None]).squeeze(1))
        if k:
            values, ids = torch.topk(log_probs, k, dim=1)
            top_values.append(values)
            top_ids.append(ids)
    logprobs = torch.cat(chosen).tolist()
    values_l = torch.cat(top_values).tolist() if k else []
    ids_l = torch.cat(top_ids).tolist() if k else []
    at = 0
    for req, count in scored:
        req.prompt_scores.logprobs.extend(logprobs[at : at + count])
        if n_top := req.sampling.prompt_logprobs:
            req.prompt_scores.top_logprobs.extend(
                list(zip(ids_l[i][:n_top], values_l[i][:n_top])) for i in range(at, at + count))
        at += count
