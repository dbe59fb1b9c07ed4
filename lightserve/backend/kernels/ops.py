"""The non-attention layer ops as Triton kernels, with the torch functions' semantics.

`TritonOps` gathers them so the layer template can swap its torch ops for these in one place:

==========================================  ===============================================
torch (models/template.py, models/rotary.py) TritonOps
==========================================  ===============================================
``rms_norm(x, w, eps)``                      ``rms_norm(x, w, eps)`` (new tensor)
``apply_rotary(q, cos, sin)``, same for k    ``rotary(q, k, cos, sin)`` (in place, returns q, k)
``F.silu(gate) * up`` of ``gate_up``         ``silu_and_mul(gate_up)`` (new tensor)
``write_kv(kv, slots, k, v)``               ``write_kv(kv, slots, k, v)`` (int8 pools too)
==========================================  ===============================================
"""

from __future__ import annotations

import torch

from lightserve.backend.kernels import kv_copy
from lightserve.backend.kernels.rmsnorm import rms_norm
from lightserve.backend.kernels.rotary import apply_rotary_
from lightserve.backend.kernels.silu_mul import silu_and_mul
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.models.torch_ops import TorchOps


class TritonOps(TorchOps):
    """Namespace of the layer ops (static methods, no state); `add_rms_norm` is TorchOps'
    residual add followed by this class's `rms_norm`."""

    rms_norm = staticmethod(rms_norm)
    rotary = staticmethod(apply_rotary_)
    silu_and_mul = staticmethod(silu_and_mul)

    @staticmethod
    def write_kv(kv: LayerKV, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv_copy.write_kv(kv.k, kv.v, slots, k, v, kv.k_scale, kv.v_scale)
