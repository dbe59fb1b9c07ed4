"""Where Triton kernels can run, and the dtype rules every kernel wrapper follows.

Triton kernels launch on a CUDA GPU, or on the CPU under the Triton interpreter. The
interpreter is chosen when ``@triton.jit`` decorates a function, i.e. when the kernel modules
are imported, so ``TRITON_INTERPRET=1`` must be in the environment before that (tests run the
kernels in a subprocess that sets it). This module is imported first by every kernel module,
and the flag it reads is the one the decorators saw.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - triton is a declared dependency
    raise ImportError("the triton attention back end needs the `triton` package (pip install triton)") from exc

#: True when kernels run in the Triton interpreter (numpy on the CPU) instead of compiled.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonUnavailableError(RuntimeError):
    """Raised when Triton kernels are asked for where they cannot launch."""


def check_device(device: torch.device | str | None = None) -> None:
    """Fail with a clear message unless kernels can launch on `device` (any device if None)."""
    device = torch.device(device) if device is not None else None
    if INTERPRET:
        if device is not None and device.type != "cpu":
            raise TritonUnavailableError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got {device}")
        return
    if not torch.cuda.is_available():
        raise TritonUnavailableError(
            "the triton attention back end needs a CUDA GPU; on a CPU-only machine use "
            "--attention_backend torch (or cpu_native), or set TRITON_INTERPRET=1 before triton is "
            "imported to run the kernels in the (slow, test-only) Triton interpreter"
        )
    if device is not None and device.type != "cuda":
        raise TritonUnavailableError(
            f"compiled triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 before "
            "triton is imported to run them on the CPU in the interpreter"
        )


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand dtype of ``tl.dot`` for K/V/P of `dtype`.

    Half-precision operands keep tensor cores busy on the GPU; accumulation is fp32 either way.
    The interpreter computes bf16 arithmetic wrongly, so there bf16 operands are upcast to fp32
    right after loading (every other op in the kernels already runs in fp32).
    """
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16:
        return tl.float32 if INTERPRET else tl.bfloat16
    if dtype == torch.float32:
        return tl.float32
    raise TypeError(f"triton kernels support float32, float16 and bfloat16, got {dtype}")


def next_pow2(n: int) -> int:
    """``tl.arange`` sizes must be powers of two; blocks are padded up and masked."""
    return triton.next_power_of_2(max(1, int(n)))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU; 1 in the interpreter (it runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
