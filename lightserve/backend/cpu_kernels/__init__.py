"""CPU kernels in plain C, compiled on first use (`build`) and called through ctypes:
decode attention over the token table (`attention`) and the small layer ops (`layer_ops`)."""

from lightserve.backend.cpu_kernels.attention import (
    context_attention, context_attention_fits, context_attention_supported, token_decode_attention,
)
from lightserve.backend.cpu_kernels.build import available, unavailable_reason
from lightserve.backend.cpu_kernels.layer_ops import CpuOps

__all__ = [
    "CpuOps", "available", "context_attention", "context_attention_fits", "context_attention_supported", "token_decode_attention",
    "unavailable_reason",
]
