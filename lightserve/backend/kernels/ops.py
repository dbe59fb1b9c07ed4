"""The non-attention layer ops as Triton kernels, with the torch functions' semantics.

`TritonOps` gathers them so the layer template can swap its torch ops for these in one place:

==========================================  ===============================================
torch (models/template.py, models/rotary.py) TritonOps
==========================================  ===============================================
``rms_norm(x, w, eps)``                      ``rms_norm(x, w, eps)`` (new tensor)
``apply_rotary(q, cos, sin)``, same for k    ``rotary(q, k, cos, sin)`` (in place, returns q, k)
``F.silu(gate) * up`` of ``gate_up``         ``silu_and_mul(gate_up)`` (new tensor)
``k_cache.index_copy_(0, slots, k)``, and v  ``write_kv(k_cache, v_cache, slots, k, v)``
==========================================  ===============================================
"""

from __future__ import annotations

from lightserve.backend.kernels.kv_copy import write_kv
from lightserve.backend.kernels.rmsnorm import rms_norm
from lightserve.backend.kernels.rotary import apply_rotary_
from lightserve.backend.kernels.silu_mul import silu_and_mul
from lightserve.backend.models.torch_ops import TorchOps


class TritonOps(TorchOps):
    """Namespace of the layer ops (static methods, no state); `add_rms_norm` is TorchOps'
    residual add followed by this class's `rms_norm`."""

    rms_norm = staticmethod(rms_norm)
    rotary = staticmethod(apply_rotary_)
    silu_and_mul = staticmethod(silu_and_mul)
    write_kv = staticmethod(write_kv)
