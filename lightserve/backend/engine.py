"""The model engine of one backend rank: one persistent batch over the TokenAttention KV pool.

The router (through `worker.py`) and the offline `LLM` drive it the same way: one `StepPlan`
per step (`step`). Each request carries `computed`, the number of its tokens in the KV pool; a
step computes a chunk of some prompts and one token of every decoding request, in one forward
pass. Requests that finish (EOS, stop token, max_new_tokens) leave in the step that finishes
them and their KV goes to the prefix cache (or is freed) at once.

The prefix cache (`prefix_cache.cache`): a request the router found cached starts with
`computed > 0`, its first tokens' slots taken from the cache; each computed prompt chunk and each
request that leaves hands its KV to the cache, which evicts unused entries when the router says.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Optional

import torch

from lightserve.backend.attention import make_attention, resolve_backend_name
from lightserve.backend.device import kv_pool_size, resolve_device, resolve_dtype
from lightserve.backend.forward_state import ForwardState
from lightserve.backend.image_inputs import ChunkImages, gather_image_embeds
from lightserve.backend.infer_batch import InferBatch, ReqState
from lightserve.backend.mem_manager import MemoryManager, kv_cache_dtype
from lightserve.backend.models import model_class
from lightserve.backend.models.config import ModelConfig
from lightserve.backend.parallel import SINGLE, TensorParallel
from lightserve.backend.prompt_scores import score_prompts
from lightserve.backend.req_manager import ReqManager
from lightserve.backend.sampling import SampleResult, sample
from lightserve.backend.sampling.grammar import GrammarMasks, MaskJob
from lightserve.io_struct import FinishReason, GenerateReq, PromptLogprobs, StepPlan, StepResult, TokenOut
from lightserve.prefix_cache.cache import Hold, PrefixCache, cache_key
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
        kv_dtype = kv_cache_dtype(args.kv_cache_dtype) or self.dtype
        self.cfg = ModelConfig.from_model_dir(model_dir)
        cls = model_class(self.cfg.architecture)
        cls.validate_tp(self.cfg, tp)
        split = tp.head_split(self.cfg.num_heads, self.cfg.num_kv_heads)
        kv_heads = split.num_kv  # this rank's KV pool holds only its own KV heads
        self.attention_backend = resolve_backend_name(args.attention_backend, self.device, self.dtype)
        attention = make_attention(self.attention_backend, split.num_q, kv_heads, self.cfg.head_dim)
        self.model = cls(model_dir, self.cfg, tp, self.dtype, self.device, attention, args.quantization,
                         args.quantize_lm_head)
        size = args.max_total_token_num or kv_pool_size(
            self.device, args.mem_fraction, MemoryManager.bytes_per_token(kv_dtype, kv_heads, self.cfg.head_dim, self.cfg.num_layers),
            most_useful=args.running_max_req_size * args.max_req_total_len,
        )
        self.mem = MemoryManager(size, self.dtype, kv_heads, self.cfg.head_dim, self.cfg.num_layers, self.device,
                                 kv_dtype)
        self.kv_cache = self.mem.layers
        self.req_manager = ReqManager(args.running_max_req_size, args.max_req_total_len, self.device)
        self.eos_ids = torch.tensor(sorted(self._eos_ids(model_dir)), dtype=torch.long, device=self.device)
        # Values: int32 slot tensors, copies (never views) of token-table rows.
        self.prefix_cache: PrefixCache[torch.Tensor] = PrefixCache(not args.disable_prefix_cache, torch.cat)
        # Structured output: llguidance's view of the tokenizer, built when first needed
        # (`grammars`; the server's worker has it built soon after start-up, `prepare_grammars`).
        self._tokenizer_dir = args.tokenizer_dir or model_dir
        self._grammars: Optional[GrammarMasks] = None
        self._grammars_lock = threading.Lock()
        self._masks: Optional[MaskJob] = None  # this step's, started before its forward pass
        # Locks of requests refused at admission, held to the end of the step as the router holds them.
        self._refused_holds: list[Hold] = []
        # The persistent batch: requests still computing their prompt (in admission order), and
        # the decoding ones. `forward` leaves the rows that sample in `_pending` for `sample`.
        self.prefilling: dict[int, ReqState] = {}
        self.decoding: Optional[InferBatch] = None
        self._pending: Optional[InferBatch] = None
        self._pending_joins = False
        logger.info(
            "rank %d: %s on %s/%s, quantization=%s, attention=%s, KV pool %d tokens of %s",
            tp.rank, self.cfg.architecture, self.device, self.dtype, args.quantization, self.attention_backend, size,
            str(kv_dtype).removeprefix("torch."),
        )

    def _eos_ids(self, model_dir: str) -> set[int]:
        ids = set(self.cfg.eos_token_ids)
        gen_cfg = Path(model_dir) / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return ids

    @property
    def grammars(self) -> GrammarMasks:
        with self._grammars_lock:  # the step and `prepare_grammars`' timer may ask at once
            if self._grammars is None:
                self._grammars = GrammarMasks(self._tokenizer_dir, self.cfg.vocab_size, self.eos_ids.tolist())
            return self._grammars

    def prepare_grammars(self, after_s: float) -> None:
        """Start building the grammar tokenizer view `after_s` seconds from now, on a thread, so
        that the first constrained request finds it ready (a request that comes sooner builds it)."""
        timer = threading.Timer(after_s, lambda: self.grammars)
        timer.daemon = True
        timer.start()

    # ---- the step -------------------------------------------------------------------------
    def step(self, plan: StepPlan) -> StepResult:
        """Run one StepPlan (see its docstring); the reply carries the sampled tokens and the KV figures.

        A step that raises part-way leaves no state to trust: every request is dropped and all
        KV is freed before the error propagates (the router fails those requests).
        """
        try:
            if plan.flush:
                self._free_slots(self.prefix_cache.flush())
            self.release(plan.release)
            refused = self.admit(plan.new_reqs, plan.cached)
            self._masks = self._start_masks(plan)  # grammar masks, computed while the model runs
            outs = refused + self.sample(self.forward(plan))
            for hold in self._refused_holds:
                self.prefix_cache.unlock(hold)
            self._refused_holds.clear()
        except BaseException:
            if self._masks is not None:
                self._masks.future.exception()  # let its thread finish with the matchers first
            self.release_all()
            raise
        finally:
            self._masks = None
        cache = self.prefix_cache
        return StepResult(outs, self.mem.size, self.mem.can_use_mem_size, cache.total_tokens,
                          cache.evictable_tokens, self.num_running)

    def _start_masks(self, plan: StepPlan) -> Optional[MaskJob]:
        """Start the masks of the constrained requests that sample in this step: the decode rows,
        and the prompts this step completes."""
        sampling = list(self._decoding_reqs()) if plan.decode else []
        for c in plan.chunks:
            req = self.prefilling.get(c.req_id)
            if req is not None and req.computed + c.num_tokens == len(req.input_ids):
                sampling.append(req)
        constrained = [r for r in sampling if r.grammar is not None]
        if not constrained:
            return None
        return self.grammars.start([r.req_id for r in constrained], [r.grammar for r in constrained])

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + (len(self.decoding) if self.decoding is not None else 0)

    def release(self, req_ids: list[int]) -> None:
        """Retire `req_ids`, in this order (the prefix cache must see them as the router does):
        their KV goes to the prefix cache or is freed, their table rows are freed. Ids this rank
        no longer holds are ignored: a request may finish here in the step in which it was
        aborted elsewhere."""
        if not req_ids:  # most steps: no per-request work, no read of the batch's lengths
            return
        rows = {r.req_id: i for i, r in enumerate(self._decoding_reqs())}
        seq_lens = self.decoding.b_seq_len.tolist() if rows else []
        leaving: list[tuple[ReqState, int]] = []
        for req_id in req_ids:
            if (req := self.prefilling.pop(req_id, None)) is not None:
                leaving.append((req, req.computed))
            elif (i := rows.pop(req_id, None)) is not None:
                leaving.append((self.decoding.reqs[i], seq_lens[i]))
        self._retire(leaving)
        if self.decoding is not None and len(rows) < len(self.decoding):
            keep = sorted(rows.values())
            self.decoding = self.decoding.select(keep) if keep else None

    def release_all(self) -> None:
        self.prefilling.clear()
        self.decoding = self._pending = None
        self._refused_holds.clear()
        self.prefix_cache.reset()
        self.mem.free_all()
        self.req_manager.free_all()

    def admit(self, reqs: list[GenerateReq], cached: Optional[list[int]] = None) -> list[TokenOut]:
        """Add new requests to the persistent batch; `reqs[i]` starts with its first `cached[i]`
        tokens from the prefix cache (none: no hits). A request this rank cannot serve is refused
        alone, with an error output, before any forward pass: every rank refuses it alike, and the
        rest of the step goes on."""
        cached = cached or [0] * len(reqs)
        if len(cached) != len(reqs):
            raise ValueError(f"{len(reqs)} new requests but {len(cached)} cache hit lengths")
        refused = []
        for r, n_cached in zip(reqs, cached):
            prompt_key = cache_key(r.prompt_ids, r.images)
            hold, slots = self.prefix_cache.lock(prompt_key + r.output_ids, n_cached)
            if hold.length != n_cached:
                self.prefix_cache.unlock(hold)
                raise RuntimeError(f"request {r.req_id}: the router expected {n_cached} cached tokens, "
                                   f"this rank's prefix cache has {hold.length}")
            why = self._why_unservable(r)
            grammar = None
            if why is None and r.sampling.grammar is not None:
                try:
                    grammar = self.grammars.matcher(r.sampling.grammar, r.output_ids)
                except ValueError as e:
                    why = str(e)
            if why is not None:
                self._refused_holds.append(hold)
                refused.append(TokenOut(r.req_id, -1, 0.0, FinishReason.ABORT, prompt_tokens=len(r.prompt_ids),
                                        error=f"the backend cannot serve this request: {why}"))
                continue
            scores = PromptLogprobs([]) if r.scores_prompt else None
            if scores is not None and n_cached:
                self.prefix_cache.unlock(hold)
                raise RuntimeError(f"request {r.req_id} scores its prompt but the router gave it {n_cached} cached tokens")
            (row,) = self.req_manager.alloc(1)
            if slots is not None:
                self.req_manager.req_to_token[row, :n_cached] = slots
            seed = r.sampling.seed if r.sampling.seed is not None else default_seed(r.req_id)
            self.prefilling[r.req_id] = ReqState(
                r.req_id, row, r.prompt_ids, r.sampling, seed, list(r.output_ids),
                frozenset(r.sampling.stop_token_ids), list(r.images), input_ids=r.prompt_ids + r.output_ids,
                computed=n_cached, prompt_key=prompt_key, hold=hold,
                cached_tokens=min(n_cached, len(r.prompt_ids)), grammar=grammar, prompt_scores=scores)
        return refused

    def _why_unservable(self, r: GenerateReq) -> Optional[str]:
        try:
            r.sampling.validate()
        except ValueError as e:
            return str(e)
        if not r.prompt_ids:
            return "the prompt is empty"
        if len(r.prompt_ids) + r.sampling.max_new_tokens > self.req_manager.max_req_total_len:
            return f"prompt + max_new_tokens exceeds the token table width ({self.req_manager.max_req_total_len})"
        ids = r.prompt_ids + r.output_ids
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            return f"a token id is outside the vocabulary [0, {self.cfg.vocab_size})"
        if r.images and self.shm_prefix is None:
            return "a request with images reached an engine without the image cache (--enable_multimodal)"
        if r.req_id in self.prefilling or any(q.req_id == r.req_id for q in self._decoding_reqs()):
            return f"request id {r.req_id} is already running"
        return None

    def _decoding_reqs(self) -> list[ReqState]:
        return self.decoding.reqs if self.decoding is not None else []

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Write the step's tokens into KV, run the model, and return the fp32 logits [N, vocab]
        of the N rows that sample: every decode row, then each chunk that completes its prompt.
        The chunks of prompts being scored are scored on the way (`prompt_scores.score_prompts`).

        Requests whose prompt completes join the decoding batch before sampling (`sample`).
        """
        dev = self.device
        decoding = self.decoding if plan.decode else None
        nd = len(decoding) if decoding is not None else 0
        chunks = [(self.prefilling[c.req_id], c.num_tokens) for c in plan.chunks if c.req_id in self.prefilling]
        for req, n in chunks:
            if not 0 < n <= len(req.input_ids) - req.computed:
                raise ValueError(f"request {req.req_id}: a chunk of {n} tokens does not fit its "
                                 f"{len(req.input_ids) - req.computed} uncomputed tokens")
        new_lens = [n for _, n in chunks]
        prefix_lens = [req.computed for req, _ in chunks]
        total = nd + sum(new_lens)
        if total == 0:
            self._pending = None
            return torch.empty(0, self.cfg.vocab_size, device=dev)
        self._free_slots(self.prefix_cache.evict(plan.evict))
        slots = self.mem.alloc(total)
        table = self.req_manager.req_to_token
        chunk_rows = torch.tensor([req.row for req, _ in chunks], dtype=torch.int32, device=dev)
        new_t = torch.tensor(new_lens, dtype=torch.long, device=dev)
        ends = new_t.cumsum(0)
        starts = ends - new_t
        # Position of every chunk token inside its request.
        chunk_pos = (torch.arange(total - nd, device=dev) - starts.repeat_interleave(new_t)
                     + torch.tensor(prefix_lens, dtype=torch.long, device=dev).repeat_interleave(new_t))
        table[chunk_rows.long().repeat_interleave(new_t), chunk_pos] = slots[nd:].to(torch.int32)
        chunk_seq = torch.tensor([p + n for p, n in zip(prefix_lens, new_lens)], dtype=torch.int32, device=dev)
        chunk_ids = torch.tensor([t for req, n in chunks for t in req.input_ids[req.computed : req.computed + n]],
                                 dtype=torch.long, device=dev)
        if decoding is not None:
            decode_pos = decoding.b_seq_len.long()
            table[decoding.b_req_idx.long(), decode_pos] = slots[:nd].to(torch.int32)
            decoding.b_seq_len += 1
            positions = torch.cat([decode_pos, chunk_pos])
            b_req_idx = torch.cat([decoding.b_req_idx, chunk_rows])
            b_seq_len = torch.cat([decoding.b_seq_len, chunk_seq])
            input_ids = torch.cat([decoding.last_ids, chunk_ids])
        else:
            positions, b_req_idx, b_seq_len, input_ids = chunk_pos, chunk_rows, chunk_seq, chunk_ids
        state = ForwardState(
            positions=positions, out_slots=slots, b_req_idx=b_req_idx, b_seq_len=b_seq_len, req_to_token=table,
            num_decode=nd, max_seq_len=int(b_seq_len.max()), b_start=starts.tolist(), b_new_len=new_lens,
            b_prefix_len=prefix_lens,
        )
        self._add_images(state, chunks)
        completing = [j for j, (req, n) in enumerate(chunks) if req.computed + n == len(req.input_ids)]
        logits_rows = torch.cat([torch.arange(nd, device=dev),
                                 torch.tensor([nd + int(ends[j]) - 1 for j in completing], dtype=torch.long, device=dev)])
        hidden = self.model.hidden_states(input_ids, state, self.kv_cache)
        score_prompts(self.model, hidden, chunks, state)
        logits = self.model.compute_logits(hidden.index_select(0, logits_rows))
        for req, n in chunks:
            req.computed += n
        self._commit([req for req, _ in chunks])
        joined = [self.prefilling.pop(chunks[j][0].req_id) for j in completing]
        new = InferBatch.build(joined, self.cfg.vocab_size, dev) if joined else None
        # The rows that sample: the decode rows and the requests that join, in logits order.
        self._pending = InferBatch.concat(decoding, new)
        # Without decode rows the decoding batch sat this step out: the new rows join it after sampling.
        self._pending_joins = decoding is None
        return logits

    @property
    def sampling_req_ids(self) -> list[int]:
        """The requests of the logits rows the last `forward` returned, in row order."""
        return [r.req_id for r in self._pending.reqs] if self._pending is not None else []

    def _add_images(self, state: ForwardState, chunks: list[tuple[ReqState, int]]) -> None:
        with_images = [ChunkImages(req.req_id, req.images, req.computed, n, state.num_decode + start)
                       for (req, n), start in zip(chunks, state.b_start) if req.images]
        if with_images:
            state.image_embeds, state.image_rows = gather_image_embeds(
                with_images, self.shm_prefix, self.cfg.hidden_size, self.dtype, self.device)

    def sample(self, logits: torch.Tensor) -> list[TokenOut]:
        """Sample the rows `forward` returned logits for; requests that finish leave at once."""
        batch, self._pending = self._pending, None
        if batch is None:
            return []
        outs, keep = self._sample_and_finish(batch, logits)
        batch = self._keep_rows(batch, keep)
        self.decoding = InferBatch.concat(self.decoding, batch) if self._pending_joins else batch
        return outs

    # ---- internals ---------------------------------------------------------------------------
    def _sample_and_finish(self, batch: InferBatch, logits: torch.Tensor) -> tuple[list[TokenOut], list[int]]:
        """One token per row; returns the outputs and the rows that go on.

        Rows under a grammar draw only tokens it allows; a request whose grammar admits nothing
        more after its token ends there, as if it had drawn the end-of-sequence token.
        """
        constrained = [i for i, req in enumerate(batch.reqs) if req.grammar is not None]
        matchers = [batch.reqs[i].grammar for i in constrained]
        if constrained:
            self.grammars.constrain(logits, constrained, [batch.reqs[i].req_id for i in constrained], matchers,
                                    self._masks)
        result = sample(logits, batch.sampling, batch.steps)
        batch.steps += 1
        batch.last_ids = result.next_ids
        hit_eos = torch.isin(result.next_ids, self.eos_ids) & batch.check_eos
        hit_len = batch.steps >= batch.max_new
        ids, logprobs = result.next_ids.tolist(), result.logprobs.tolist()
        eos_flags, len_flags = hit_eos.tolist(), hit_len.tolist()
        tops = _top_logprob_lists(result, len(batch))
        grammar_end: dict[int, Optional[str]] = {}  # row -> None (complete) or why it broke
        if constrained:
            errors = self.grammars.advance(matchers, [ids[i] for i in constrained])
            grammar_end = {i: err for i, err, m in zip(constrained, errors, matchers) if err or m.is_stopped()}
        outs, keep = [], []
        for i, req in enumerate(batch.reqs):
            token = ids[i]
            req.output_ids.append(token)
            error = grammar_end.get(i)
            if error is not None:
                reason: Optional[FinishReason] = FinishReason.ABORT
            elif eos_flags[i] or token in req.stop_token_ids or i in grammar_end:
                reason = FinishReason.EOS
            elif len_flags[i]:
                reason = FinishReason.LENGTH
            else:
                reason = None
                keep.append(i)
            outs.append(TokenOut(req.req_id, token, logprobs[i], reason, tops[i], len(req.prompt_ids),
                                 req.cached_tokens, req.seed, error=error and f"structured output failed: {error}",
                                 prompt_logprobs=req.prompt_scores))
            req.prompt_scores = None  # sent with the first token only
        return outs, keep

    def _keep_rows(self, batch: InferBatch, keep: list[int]) -> Optional[InferBatch]:
        """Retire every request not in `keep` (in row order); the rest of the batch (None if empty)."""
        dropped = sorted(set(range(len(batch))) - set(keep))
        if not dropped:
            return batch
        seq_lens = batch.b_seq_len.tolist()
        self._retire([(batch.reqs[i], seq_lens[i]) for i in dropped])
        return batch.select(keep) if keep else None

    # ---- KV ownership ------------------------------------------------------------------------
    def _commit(self, reqs: list[ReqState]) -> None:
        """Hand the computed tokens of `reqs` to the prefix cache (after a prompt chunk). Positions
        the cache already had are pointed at its slots, and the request's own copies are freed."""
        if not self.prefix_cache.enabled:
            return
        table, duplicates = self.req_manager.req_to_token, []
        for req in reqs:
            done = self.prefix_cache.commit(req.key(req.computed), table[req.row, : req.computed].clone(), req.hold)
            req.hold = done.hold
            if done.duplicates is not None:
                table[req.row, done.start : done.end] = done.tree_slots
                duplicates.append(done.duplicates)
        self._free_slots(duplicates)

    def _retire(self, leaving: list[tuple[ReqState, int]]) -> None:
        """Requests leave with their first `n` tokens computed: the prefix cache takes their KV
        (or, disabled, it is freed), and their table rows are freed."""
        table, to_free = self.req_manager.req_to_token, []
        for req, n in leaving:
            key = req.key(n) if self.prefix_cache.enabled else []
            freed = self.prefix_cache.release(key, table[req.row, :n].clone(), req.hold)
            if freed is not None:
                to_free.append(freed)
        self._free_slots(to_free)
        if leaving:
            self.req_manager.free([req.row for req, _ in leaving])

    def _free_slots(self, pieces: list[torch.Tensor]) -> None:
        if pieces:
            self.mem.free(torch.cat(pieces).long())
