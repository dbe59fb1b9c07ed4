"""Scratch tensors of the sampler, kept from one decode step to the next."""

from __future__ import annotations

from typing import Optional

import torch


class Workspace:
    """[rows, V] scratch tensors kept from one step to the next.

    On the CPU a fresh tensor of this size (12 MB at B=64, V=49152) is handed back to the OS when
    freed and page-faulted in again on the next step, which costs more than the arithmetic on it
    (measured: 26 vs 11 ms per temperature-sampling step). A running batch keeps its shapes from
    step to step, so it keeps its buffers; a new batch (filter, merge) starts a new workspace.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor, rows: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Buffer `name` of shape [rows, like.shape[1]] (dtype of `like` unless given), contents
        undefined. Names must not be in use twice at once."""
        shape = (rows, like.shape[1])
        dtype = dtype if dtype is not None else like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf


def buffer(
    ws: Optional[Workspace], name: str, like: torch.Tensor, rows: int, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """A workspace buffer, or a fresh tensor without a workspace."""
    if ws is None:
        return torch.empty((rows, like.shape[1]), dtype=dtype if dtype is not None else like.dtype, device=like.device)
    return ws.take(name, like, rows, dtype)
