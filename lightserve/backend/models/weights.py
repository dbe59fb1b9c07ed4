"""Reading safetensors checkpoints, whole or as this rank's tensor-parallel slice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from lightserve.backend.parallel import TensorParallel


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint made of one or more .safetensors files."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
        self._handles = [safe_open(str(model_dir / f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} missing from the checkpoint")
        return self._where[name].get_tensor(name)

    def get_optional(self, name: str) -> Optional[torch.Tensor]:
        return self.get(name) if name in self._where else None

    def get_shard(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """Rows/columns [start, end) along `dim`, read without loading the whole tensor."""
        if name not in self._where:
            raise KeyError(f"tensor {name!r} missing from the checkpoint")
        sl = self._where[name].get_slice(name)
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, end)
        return sl[tuple(index)]

    def get_heads(self, name: str, heads: tuple[int, int], head_dim: int, dim: int = 0) -> torch.Tensor:
        """Heads [start, end) of a tensor laid out head by head along `dim`."""
        return self.get_shard(name, dim, heads[0] * head_dim, heads[1] * head_dim)

    def get_split(self, name: str, tp: TensorParallel, dim: int) -> torch.Tensor:
        """This rank's equal share of a tensor along `dim`."""
        size = self._where[name].get_slice(name).get_shape()[dim] if name in self._where else None
        if size is None:
            raise KeyError(f"tensor {name!r} missing from the checkpoint")
        start, end = tp.shard(size, f"{name}: dimension {dim}")
        return self.get_shard(name, dim, start, end)
