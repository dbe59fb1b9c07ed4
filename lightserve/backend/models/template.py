"""The decoder-layer template and causal-LM shell shared by every model family.

A layer runs: norm -> qkv -> rotary -> write KV -> attention -> o_proj -> residual add + norm
-> MLP. Each step is a method (a hook); a family overrides only the hooks that differ (e.g.
Qwen2 only needs the q/k/v biases, which the weights already carry).

Tensor parallel: q/k/v and gate/up are split by output (column), o_proj and down by input
(row: they sum their output over ranks themselves, see `linear.py`), embedding and lm_head by
vocab. The layer code is the same at any tp size, float or W8A8 (`LinearFactory`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.models.config import ModelConfig
from lightserve.backend.models.linear import LinearFactory
from lightserve.backend.models.rotary import RotaryTable
from lightserve.backend.models.torch_ops import TorchOps
from lightserve.backend.models.weights import CheckpointReader
from lightserve.backend.parallel import TensorParallel


class LayerWeights:
    """One decoder layer's weights for one rank, with q/k/v and gate/up fused into one matrix each."""

    def __init__(self, reader: CheckpointReader, prefix: str, cfg: ModelConfig, linears: LinearFactory):
        tp = linears.tp
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        split = tp.head_split(cfg.num_heads, cfg.num_kv_heads)
        q_heads, kv_heads, d = (split.q_start, split.q_end), (split.kv_start, split.kv_end), cfg.head_dim
        q = reader.get_heads(attn + "q_proj.weight", q_heads, d)
        k = reader.get_heads(attn + "k_proj.weight", kv_heads, d)
        v = reader.get_heads(attn + "v_proj.weight", kv_heads, d)
        qkv_bias: Optional[torch.Tensor] = None
        if attn + "q_proj.bias" in reader:
            qb = reader.get_heads(attn + "q_proj.bias", q_heads, d)
            kb = reader.get_heads(attn + "k_proj.bias", kv_heads, d)
            vb = reader.get_heads(attn + "v_proj.bias", kv_heads, d)
            qkv_bias = torch.cat([qb, kb, vb])
        input_norm = reader.get(prefix + "input_layernorm.weight")
        post_attention_norm = reader.get(prefix + "post_attention_layernorm.weight")
        self.qkv = linears.column(torch.cat([q, k, v]), qkv_bias, norm=input_norm)
        self.o_proj = linears.row(reader.get_heads(attn + "o_proj.weight", q_heads, d, dim=1))
        gate = reader.get_split(mlp + "gate_proj.weight", tp, dim=0)
        up = reader.get_split(mlp + "up_proj.weight", tp, dim=0)
        self.gate_up = linears.column(torch.cat([gate, up]), norm=post_attention_norm)
        self.down = linears.row(reader.get_split(mlp + "down_proj.weight", tp, dim=1))
        self.input_norm = linears.norm(input_norm)
        self.post_attention_norm = linears.norm(post_attention_norm)


class DecoderLayer:
    """The layer template. Subclasses override hooks; `forward` is the fixed order."""

    def __init__(self, layer_id: int, weights: LayerWeights, cfg: ModelConfig, tp: TensorParallel, attention):
        self.layer_id = layer_id
        self.w = weights
        self.cfg = cfg
        self.tp = tp
        self.attention = attention
        self.ops = getattr(attention, "ops", TorchOps)  # torch or triton versions of the small ops
        split = tp.head_split(cfg.num_heads, cfg.num_kv_heads)
        self.heads = split.num_q
        self.kv_heads = split.num_kv
        self.head_dim = cfg.head_dim
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim

    def forward(self, hidden: torch.Tensor, state: ForwardState, kv: LayerKV) -> torch.Tensor:
        x = self.attention_norm(hidden)
        q, k, v = self.qkv(x)
        q, k = self.rotary(q, k, state)
        self.write_kv(k, v, kv, state)
        o = self.attend(q, k, v, kv, state)
        hidden, x = self.ffn_norm(hidden, self.o_proj(o))
        return hidden + self.ffn(x)

    # ---- hooks ---------------------------------------------------------------------------
    def attention_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(hidden, self.w.input_norm, self.cfg.rms_norm_eps)

    def ffn_norm(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the attention output to the residual stream (in place) and normalise the sum for
        the MLP: one fused op where the back end has one."""
        return self.ops.add_rms_norm(hidden, attn_out, self.w.post_attention_norm, self.cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.w.qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        n = x.shape[0]
        return q.view(n, self.heads, self.head_dim), k.view(n, self.kv_heads, self.head_dim), v.view(n, self.kv_heads, self.head_dim)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, state: ForwardState) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rotary(q, k, state.cos, state.sin)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv: LayerKV, state: ForwardState) -> None:
        self.ops.write_kv(kv, state.out_slots, k, v)

    def attend(self, q, k, v, kv: LayerKV, state: ForwardState) -> torch.Tensor:
        o = self.attention.forward(q, k, v, kv, state)
        return o.reshape(o.shape[0], self.q_size)

    def o_proj(self, o: torch.Tensor) -> torch.Tensor:
        return self.w.o_proj(o)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.down(self.ops.silu_and_mul(self.w.gate_up(x)))


class CausalLM:
    """Embedding -> decoder layers -> final norm -> lm_head, for one tensor-parallel rank."""

    layer_cls = DecoderLayer
    weights_cls = LayerWeights
    # Name prefix of the language model's tensors in the checkpoint (LLaVA nests it).
    prefix = "model."
    lm_head_name = "lm_head.weight"

    def __init__(self, model_dir: str, cfg: ModelConfig, tp: TensorParallel, dtype: torch.dtype,
                 device: torch.device, attention, quantization: str = "none", quantize_lm_head: bool = False):
        self.cfg = cfg
        self.linears = LinearFactory(tp, dtype, device, quantization, quantize_lm_head, cfg.hidden_size)
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self.attention = attention
        self.ops = getattr(attention, "ops", TorchOps)
        self.validate_tp(cfg, tp)
        reader = CheckpointReader(model_dir)
        self.load_weights(reader)
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, device)

    @staticmethod
    def validate_tp(cfg: ModelConfig, tp: TensorParallel) -> None:
        """Heads may split unevenly (whole KV groups per rank); MLP and vocab must divide."""
        tp.head_split(cfg.num_heads, cfg.num_kv_heads)
        for what, n in (("intermediate size", cfg.intermediate_size), ("vocab size", cfg.vocab_size)):
            if n % tp.world_size:
                raise ValueError(f"{what} ({n}) is not divisible by --tp {tp.world_size}")

    def load_weights(self, reader: CheckpointReader) -> None:
        p, cfg = self.prefix, self.cfg
        self.vocab_start, self.vocab_end = self.tp.shard(cfg.vocab_size, "vocab size")
        embed_name = p + "embed_tokens.weight"
        embed = reader.get_split(embed_name, self.tp, dim=0)
        self.embed = self.linears.embedding(embed)
        head_name = self.lm_head_name if (self.lm_head_name in reader and not cfg.tie_word_embeddings) else embed_name
        head = embed if head_name == embed_name else reader.get_split(head_name, self.tp, dim=0)
        final_norm = reader.get(p + "norm.weight")
        self.lm_head = self.linears.lm_head(head, final_norm)
        self.final_norm = self.linears.norm(final_norm)
        self.layers = [
            self.layer_cls(i, self.weights_cls(reader, f"{p}layers.{i}.", cfg, self.linears),
                           cfg, self.tp, self.attention)
            for i in range(cfg.num_layers)
        ]

    # ---- hooks ---------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(input_ids, self.embed)
        # Vocab-parallel lookup: each rank fills the rows it owns, zeros elsewhere, then sum.
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        out = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))
        return self.tp.all_reduce(out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.ops.rms_norm(hidden, self.final_norm, self.cfg.rms_norm_eps)
        logits = self.lm_head(x).float()
        return self.tp.all_gather_last_dim(logits)

    # ---- the pass ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: ForwardState, kv_cache: list[LayerKV], logits_rows: torch.Tensor) -> torch.Tensor:
        """Run all layers; return fp32 logits [len(logits_rows), vocab] for the chosen rows only
        (the lm_head is the largest matmul, so a prefill chunk computes at most its last row)."""
        return self.compute_logits(self.hidden_states(input_ids, state, kv_cache).index_select(0, logits_rows))

    def hidden_states(self, input_ids: torch.Tensor, state: ForwardState, kv_cache: list[LayerKV]) -> torch.Tensor:
        """Run all layers; the last layer's output of every row, for `compute_logits` of the rows
        the caller needs (the engine's sampling rows, and every row of a prompt it scores)."""
        self.rotary.ensure(state.max_seq_len)
        state.cos, state.sin = self.rotary.lookup(state.positions)
        self.attention.begin_step(state)
        hidden = self.embed_tokens(input_ids, state)
        for layer, kv in zip(self.layers, kv_cache):
            hidden = layer.forward(hidden, state, kv)
        return hidden
