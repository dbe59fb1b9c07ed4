"""A weight matrix ready for `x @ W.T`, prepacked for oneDNN when that is faster.

On CPUs with AMX / AVX512-BF16, oneDNN runs bf16 matmuls from a weight it has reordered
once into its blocked layout much faster than `F.linear` on the plain tensor (which may
reorder on every call). The plain tensor is dropped after packing unless the caller keeps it
(a tied embedding), so memory does not double.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Batch size oneDNN tunes the packed layout for (decode batches are tens of rows); any batch works.
_PACK_HINT_ROWS = 64


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        # oneDNN packs bf16 only on CPUs with native bf16 conversions (AVX512-BW/VL/DQ or
        # AVX-NE-CONVERT); an AVX2-only CPU (e.g. AMD Zen 3) raises, so it keeps F.linear.
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Linear:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, prepack: bool = True):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight: Optional[torch.Tensor] = weight
        self._packed: Optional[torch.Tensor] = None
        if prepack and _can_pack(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT_ROWS)
            self.weight = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
