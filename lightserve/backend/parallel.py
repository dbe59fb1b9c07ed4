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


SINGLE = TensorParallel()
