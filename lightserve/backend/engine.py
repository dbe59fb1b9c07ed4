"""The model engine of one backend rank: batches of requests over the TokenAttention KV pool.

The router (through `worker.py`) and the offline `LLM` drive the same operations:
`prefill` a set of new requests into a new batch, `decode` one step of a batch, `filter`,
`merge`, `pause` and `remove` batches. Requests that finish (EOS, stop token, max_new_tokens)
leave their batch in the step that finishes them and their KV slots are freed at once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from lightserve.backend.attention import make_attention, resolve_backend_name
from lightserve.backend.device import kv_pool_size, resolve_device, resolve_dtype
from lightserve.backend.forward_state import ForwardState
from lightserve.backend.image_inputs import gather_image_embeds
from lightserve.backend.infer_batch import InferBatch, ReqState
from lightserve.backend.mem_manager import MemoryManager
from lightserve.backend.models import model_class
from lightserve.backend.models.config import ModelConfig
from lightserve.backend.parallel import SINGLE, TensorParallel
from lightserve.backend.req_manager import ReqManager
from lightserve.backend.sampling import SampleResult, SamplingBatch, sample
from lightserve.io_struct import FinishReason, GenerateReq, TokenOut
from lightserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


def default_seed(req_id: int) -> int:
    """A seed for requests that gave none, equal on every rank (ranks must sample alike)."""
    return (req_id * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & (2**63 - 1)


def _top_logprob_lists(result: SampleResult, n: int) -> list[list[tuple[int, float]]]:
    """Per row, the (token id, logprob) alternatives the request asked for."""
    if result.top_ids is None:
        return [[] for _ in range(n)]
    ids, lps, counts = result.top_ids.tolist(), result.top_logprobs.tolist(), result.top_counts.tolist()
    return [list(zip(ids[i][: counts[i]], lps[i][: counts[i]])) for i in range(n)]


class ModelEngine:
    def __init__(self, args: ServerArgs, model_dir: str, tp: TensorParallel = SINGLE, shm_prefix: Optional[str] = None):
        self.args = args
        self.tp = tp
        # Where the cache manager's image embeddings live (multimodal servers only).
        self.shm_prefix = shm_prefix
        self.device = resolve_device(args.device, tp.rank)
        self.dtype = resolve_dtype(args.data_type, self.device)
        self.cfg = ModelConfig.from_model_dir(model_dir)
        cls = model_class(self.cfg.architecture)
        cls.validate_tp(self.cfg, tp)
        split = tp.head_split(self.cfg.num_heads, self.cfg.num_kv_heads)
        kv_heads = split.num_kv  # this rank's KV pool holds only its own KV heads
        self.attention_backend = resolve_backend_name(args.attention_backend, self.device, self.dtype)
        attention = make_attention(self.attention_backend, split.num_q, kv_heads, self.cfg.head_dim)
        self.model = cls(model_dir, self.cfg, tp, self.dtype, self.device, attention)
        size = args.max_total_token_num or kv_pool_size(
            self.device, args.mem_fraction, MemoryManager.bytes_per_token(self.dtype, kv_heads, self.cfg.head_dim, self.cfg.num_layers),
            most_useful=args.running_max_req_size * args.max_req_total_len,
        )
        self.mem = MemoryManager(size, self.dtype, kv_heads, self.cfg.head_dim, self.cfg.num_layers, self.device)
        self.kv_cache = list(zip(self.mem.k_buffer, self.mem.v_buffer))
        self.req_manager = ReqManager(args.running_max_req_size, args.max_req_total_len, self.device)
        self.eos_ids = torch.tensor(sorted(self._eos_ids(model_dir)), dtype=torch.long, device=self.device)
        self.batches: dict[int, InferBatch] = {}
        logger.info(
            "rank %d: %s on %s/%s, attention=%s, KV pool %d tokens",
            tp.rank, self.cfg.architecture, self.device, self.dtype, self.attention_backend, size,
        )

    def _eos_ids(self, model_dir: str) -> set[int]:
        ids = set(self.cfg.eos_token_ids)
        gen_cfg = Path(model_dir) / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return ids

    # ---- batch operations ------------------------------------------------------------------
    def prefill(self, batch_id: int, reqs: list[GenerateReq]) -> list[TokenOut]:
        """Start a new batch: compute the prompts' KV and sample each request's next token.

        A request paused earlier comes back with the tokens it had generated in `output_ids`;
        they are recomputed with the prompt, not sampled again.
        """
        logits = self.forward_prefill(batch_id, reqs)
        return self._sample_and_finish(self.batches[batch_id], logits)

    def decode(self, batch_id: int) -> list[TokenOut]:
        """One step for every request of the batch: feed the last sampled token, sample the next."""
        logits = self.forward_decode(batch_id)
        return self._sample_and_finish(self.batches[batch_id], logits)

    def forward_prefill(self, batch_id: int, reqs: list[GenerateReq]) -> torch.Tensor:
        """Register a new batch and return the fp32 logits of each request's last position."""
        inputs = [r.prompt_ids + r.output_ids for r in reqs]
        lens = [len(x) for x in inputs]
        rows = self.req_manager.alloc(len(reqs))
        rows = torch.as_tensor(rows, dtype=torch.int32, device=self.device)
        slots = None
        try:
            slots = self.mem.alloc(sum(lens))
            return self._prefill_into(batch_id, reqs, inputs, lens, rows, slots)
        except BaseException:
            # The batch is registered only on success: nobody else could free what it holds.
            if slots is not None:
                self.mem.free(slots)
            self.req_manager.free(rows)
            raise

    def _prefill_into(self, batch_id: int, reqs: list[GenerateReq], inputs: list[list[int]], lens: list[int],
                      rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        dev = self.device
        lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
        ends = lens_t.cumsum(0)
        starts = ends - lens_t
        total = int(ends[-1])
        # Position of every packed token inside its request, and the table row it belongs to.
        positions = torch.arange(total, device=dev) - starts.repeat_interleave(lens_t)
        self.req_manager.req_to_token[rows.long().repeat_interleave(lens_t), positions] = slots.to(torch.int32)
        state = ForwardState(
            is_prefill=True, positions=positions, out_slots=slots, b_req_idx=rows,
            b_seq_len=lens_t.to(torch.int32), max_seq_len=max(lens), req_to_token=self.req_manager.req_to_token,
            b_start=starts.tolist(), b_new_len=lens,
        )
        if any(r.images for r in reqs):
            if self.shm_prefix is None:
                raise ValueError("a request with images reached an engine without the image cache (--enable_multimodal)")
            state.image_embeds, state.image_rows = gather_image_embeds(
                reqs, state.b_start, self.shm_prefix, self.cfg.hidden_size, self.dtype, dev)
        input_ids = torch.tensor([t for x in inputs for t in x], dtype=torch.long, device=dev)
        logits = self.model.forward(input_ids, state, self.kv_cache, ends - 1)
        seeds = [r.sampling.seed if r.sampling.seed is not None else default_seed(r.req_id) for r in reqs]
        batch = InferBatch(
            batch_id=batch_id,
            reqs=[
                ReqState(r.req_id, int(row), r.prompt_ids, r.sampling, seed, list(r.output_ids),
                         frozenset(r.sampling.stop_token_ids), list(r.images))
                for r, row, seed in zip(reqs, rows.tolist(), seeds)
            ],
            b_req_idx=rows,
            b_seq_len=lens_t.to(torch.int32),
            last_ids=torch.zeros(len(reqs), dtype=torch.long, device=dev),
            steps=torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.long, device=dev),
            max_new=torch.tensor([r.sampling.max_new_tokens for r in reqs], dtype=torch.long, device=dev),
            check_eos=torch.tensor([not r.sampling.ignore_eos for r in reqs], dtype=torch.bool, device=dev),
            sampling=SamplingBatch.build([r.sampling for r in reqs], seeds, [r.prompt_ids for r in reqs],
                                         self.cfg.vocab_size, dev, output_ids=[r.output_ids for r in reqs]),
        )
        self.batches[batch_id] = batch
        return logits

    def forward_decode(self, batch_id: int) -> torch.Tensor:
        """Write the last sampled tokens into KV and return the next-token logits [B, vocab]."""
        batch = self.batches[batch_id]
        slots = self.mem.alloc(len(batch))
        positions = batch.b_seq_len.long()
        self.req_manager.req_to_token[batch.b_req_idx.long(), positions] = slots.to(torch.int32)
        batch.b_seq_len += 1
        state = ForwardState(
            is_prefill=False, positions=positions, out_slots=slots, b_req_idx=batch.b_req_idx,
            b_seq_len=batch.b_seq_len, max_seq_len=int(batch.b_seq_len.max()),
            req_to_token=self.req_manager.req_to_token,
        )
        rows = torch.arange(len(batch), device=self.device)
        return self.model.forward(batch.last_ids, state, self.kv_cache, rows)

    def filter(self, batch_id: int, keep_req_ids: list[int]) -> None:
        """Keep only `keep_req_ids` (e.g. drop aborted requests); freed KV is reusable at once."""
        batch = self.batches[batch_id]
        keep = set(keep_req_ids)
        self._keep_rows(batch, [i for i, r in enumerate(batch.reqs) if r.req_id in keep])

    def merge(self, batch_id: int, other_id: int) -> None:
        """Append batch `other_id` to batch `batch_id` (new requests join the running batch)."""
        other = self.batches.pop(other_id)
        self.batches[batch_id] = InferBatch.concat(self.batches[batch_id], other)

    def pause(self, batch_id: int, req_ids: list[int]) -> list[GenerateReq]:
        """Free the KV of `req_ids` and hand them back for recomputation later."""
        batch = self.batches[batch_id]
        chosen = set(req_ids)
        paused = [
            GenerateReq(req_id=r.req_id, prompt_ids=r.prompt_ids, sampling=r.sampling, images=r.images,
                        output_ids=list(r.output_ids))
            for r in batch.reqs if r.req_id in chosen
        ]
        self._keep_rows(batch, [i for i, r in enumerate(batch.reqs) if r.req_id not in chosen])
        return paused

    def remove(self, batch_id: int) -> None:
        batch = self.batches.get(batch_id)
        if batch is not None:
            self._keep_rows(batch, [])

    def stats(self) -> dict[str, int]:
        return {
            "kv_total": self.mem.size,
            "kv_free": self.mem.can_use_mem_size,
            "running_reqs": sum(len(b) for b in self.batches.values()),
        }

    # ---- internals ---------------------------------------------------------------------------
    def _sample_and_finish(self, batch: InferBatch, logits: torch.Tensor) -> list[TokenOut]:
        result = sample(logits, batch.sampling, batch.steps)
        batch.steps += 1
        batch.last_ids = result.next_ids
        hit_eos = torch.isin(result.next_ids, self.eos_ids) & batch.check_eos
        hit_len = batch.steps >= batch.max_new
        ids, logprobs = result.next_ids.tolist(), result.logprobs.tolist()
        eos_flags, len_flags = hit_eos.tolist(), hit_len.tolist()
        tops = _top_logprob_lists(result, len(batch))
        outs, keep = [], []
        for i, req in enumerate(batch.reqs):
            token = ids[i]
            req.output_ids.append(token)
            if eos_flags[i] or token in req.stop_token_ids:
                reason: Optional[FinishReason] = FinishReason.EOS
            elif len_flags[i]:
                reason = FinishReason.LENGTH
            else:
                reason = None
                keep.append(i)
            outs.append(TokenOut(req.req_id, token, logprobs[i], reason, tops[i], len(req.prompt_ids), req.seed))
        if len(keep) < len(batch):
            self._keep_rows(batch, keep)
        return outs

    def _keep_rows(self, batch: InferBatch, keep: list[int]) -> None:
        """Release the KV slots and table rows of every request not in `keep`."""
        dropped = sorted(set(range(len(batch))) - set(keep))
        if not dropped:
            return
        idx = torch.tensor(dropped, dtype=torch.long, device=self.device)
        rows = batch.b_req_idx.index_select(0, idx).long()
        lens = batch.b_seq_len.index_select(0, idx).long()
        table = self.req_manager.req_to_token.index_select(0, rows)[:, : int(lens.max())]
        held = torch.arange(table.shape[1], device=self.device)[None, :] < lens[:, None]
        self.mem.free(table[held].long())
        self.req_manager.free(rows)
        if keep:
            self.batches[batch.batch_id] = batch.select(keep)
        else:
            self.batches.pop(batch.batch_id, None)
