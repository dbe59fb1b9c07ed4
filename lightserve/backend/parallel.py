"""Tensor-parallel group of one backend rank: the collectives the layers need.

At tp=1 every collective is a no-op, so single-process code runs the exact same path.
torch.distributed uses `gloo` on CPU and `nccl` on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.enabled:
            dist.all_reduce(x)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks, in place (a row's absmax when each rank holds a slice of it)."""
        if self.enabled:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place."""
        if self.enabled:
            dist.broadcast(x, src=0)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice along the last dimension (vocab-split logits)."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's share of `total` units; raises if it does not divide."""
        if total % self.world_size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.world_size}")
        per = total // self.world_size
        return self.rank * per, (self.rank + 1) * per


    def head_split(self, num_heads: int, num_kv_heads: int) -> "HeadSplit":
        """This rank's attention heads: whole KV heads with their query-head groups.

        KV heads are spread as evenly as possible (e.g. 3 KV heads at tp=2 -> 2 and 1), so
        models whose head counts tp does not divide (SmolLM2: 9 heads, 3 KV heads) still split.
        """
        if self.world_size > num_kv_heads:
            raise ValueError(f"--tp {self.world_size} exceeds the number of key/value heads ({num_kv_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"attention heads ({num_heads}) are not a multiple of key/value heads ({num_kv_heads})")
        base, extra = divmod(num_kv_heads, self.world_size)
        kv_start = self.rank * base + min(self.rank, extra)
        kv_end = kv_start + base + (1 if self.rank < extra else 0)
        group = num_heads // num_kv_heads
        return HeadSplit(kv_start * group, kv_end * group, kv_start, kv_end)


@dataclass(frozen=True)
class HeadSplit:
    """[start, end) of the query heads and of the KV heads one rank owns."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int

    @property
    def num_q(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv(self) -> int:
        return self.kv_end - self.kv_start


SINGLE = TensorParallel()
