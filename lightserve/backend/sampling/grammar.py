"""Grammar-constrained sampling on a rank: one llguidance matcher per constrained request.

Each step, before sampling, the allowed-token masks of every constrained row are computed
together (`LLExecutor`, in parallel, in Rust, without the GIL: no Python loop over rows does the
work) into one bit mask and applied to the logits rows (one C pass on the CPU, `token_mask.c`;
tensor ops elsewhere), so the sampler draws only tokens the grammar allows; after sampling,
every matcher consumes its row's token.

A request's matcher follows it through its life: built when it is admitted (a paused request
that is recomputed replays the tokens it already generated), dropped with its `ReqState` when it
finishes, is aborted or is paused. Every rank of a tensor-parallel group runs the same matchers
on the same tokens, so they stay identical.

The masks of a step are computed on a thread of this module while the engine runs the step's
forward pass (`start`, then `constrain` waits for them); rows whose masks were not started
there (a caller driving `forward` and `sample` by hand) get theirs computed on the spot.

The tokenizer view llguidance needs (about 0.5 s of CPU to build) is built on the same thread,
a few seconds after the server's engine starts (`ModelEngine.prepare_grammars`): not during
start-up, which it would slow by a third on two cores, and usually before the first constrained
request, which otherwise waits for it once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import llguidance
import tokenizers
import torch

from lightserve.backend import cpu_kernels
from lightserve.backend.cpu_kernels import build
from lightserve.io_struct import Grammar
from lightserve.utils.grammar import compile_grammar, parser_limits

Matcher = llguidance.LLMatcher

# Bit b of a mask word: token 32*w + b of word w (the torch path's unpacking).
_BITS = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int32), torch.arange(32, dtype=torch.int32))


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, use_c: bool = True) -> None:
    """logits[rows[i], t] = -inf wherever bit t of bitmask[i] (int32 [len(rows), words], on the
    CPU) is 0. One C pass on the CPU when the kernels are built; tensor ops elsewhere."""
    n = len(rows)
    if (use_c and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1
            and cpu_kernels.available()):
        index = torch.tensor(rows, dtype=torch.int64)
        build.require().apply_token_bitmask(logits.data_ptr(), logits.stride(0), index.data_ptr(), n,
                                            bitmask.data_ptr(), bitmask.shape[1], logits.shape[1])
        return
    blocked = ((bitmask[:n].unsqueeze(2) & _BITS) == 0).view(n, -1)[:, : logits.shape[1]]
    blocked = blocked.to(logits.device, non_blocking=True)
    if n == logits.shape[0] and rows == list(range(n)):
        logits.masked_fill_(blocked, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(blocked, float("-inf")))


def _build_tokenizer(tokenizer_dir: str, vocab_size: int, eos_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer: from `tokenizer.json` when the directory has one
    (what transformers saves, added tokens included: 0.1 s to read), else through transformers."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if path.exists():
        backend = tokenizers.Tokenizer.from_file(str(path))
        backend.no_padding()
        backend.no_truncation()
        return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
    from llguidance.hf import from_tokenizer  # imports transformers: only without tokenizer.json

    from lightserve.utils.tokenizer import load_tokenizer

    return from_tokenizer(load_tokenizer(tokenizer_dir), n_vocab=vocab_size, eos_token=list(eos_ids))


@dataclass
class MaskJob:
    """Masks being computed: request id -> row of `bitmask`."""

    row_of: dict[int, int]
    bitmask: torch.Tensor
    future: Future

    def wait(self) -> torch.Tensor:
        self.future.result()
        return self.bitmask


class GrammarMasks:
    """The matchers' shared parts on one rank: the tokenizer view, the executor, the mask buffer."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._tokenizer: Future[llguidance.LLTokenizer] = self._pool.submit(
            _build_tokenizer, tokenizer_dir, vocab_size, sorted(eos_ids))
        self._executor = llguidance.LLExecutor()
        self._words = (vocab_size + 31) // 32

    def matcher(self, grammar: Grammar, replay: Sequence[int] = ()) -> Matcher:
        """A matcher for `grammar` that has consumed `replay` (the tokens a recomputed request had
        already generated); raises ValueError naming the problem."""
        # log_level 0: a rejected token is reported through `advance`, not printed to stderr.
        matcher = llguidance.LLMatcher(self._tokenizer.result(), compile_grammar(grammar), log_level=0,
                                       limits=parser_limits())
        if matcher.is_error():
            raise ValueError(f"grammar: {matcher.get_error()}")
        if replay and not matcher.consume_tokens(list(replay)):
            raise ValueError(f"grammar: the tokens generated before a pause no longer match it: {matcher.get_error()}")
        return matcher

    def start(self, req_ids: list[int], matchers: list[Matcher]) -> MaskJob:
        """Compute the masks of `matchers` on this object's thread, while the caller goes on (the
        engine runs the forward pass meanwhile). The matchers must not move until `MaskJob.wait`."""
        bitmask = torch.empty(len(matchers), self._words, dtype=torch.int32)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        future = self._pool.submit(self._executor.unsafe_compute_mask_ptr, pairs, bitmask.data_ptr(),
                                   self._words * 4, len(pairs))
        return MaskJob({req_id: i for i, req_id in enumerate(req_ids)}, bitmask, future)

    def constrain(self, logits: torch.Tensor, rows: list[int], req_ids: list[int], matchers: list[Matcher],
                  job: Optional[MaskJob] = None) -> None:
        """Set to -inf, in place, every logit of `rows` (the rows of `req_ids`) that its matcher
        does not allow next; the masks come from `job` when it holds every one of them."""
        if job is None or any(r not in job.row_of for r in req_ids):
            job = self.start(req_ids, matchers)
        bitmask = job.wait()
        order = [job.row_of[r] for r in req_ids]
        if order != list(range(len(order))):
            bitmask = bitmask[torch.tensor(order)]
        apply_token_bitmask(logits, rows, bitmask)

    def advance(self, matchers: list[Matcher], tokens: list[int]) -> list[Optional[str]]:
        """Each matcher consumes its token; per matcher None, or why it could not (then the
        request must end: its output no longer matches the grammar)."""
        accepted = self._executor.consume_token_par(list(zip(matchers, tokens)))
        return [None if ok else (m.get_error() or "the token does not match the grammar")
                for ok, m in zip(accepted, matchers)]
