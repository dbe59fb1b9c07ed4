"""Choosing the device, the dtype and the KV pool size of a backend rank."""

from __future__ import annotations

import logging

import psutil
import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", rank % torch.cuda.device_count())
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls then run several times faster than fp32 here."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown data type {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def kv_pool_size(device: torch.device, mem_fraction: float, bytes_per_token: int, most_useful: int) -> int:
    """KV slots that fit in `mem_fraction` of the memory still free (after the weights loaded),
    but no more than `most_useful` (every running request at its longest): more is never used."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = psutil.virtual_memory().available
    size = min(int(free * mem_fraction) // bytes_per_token, most_useful)
    if size < 1:
        raise RuntimeError(f"no memory left for the KV cache ({free} bytes free, fraction {mem_fraction})")
    logger.info("KV pool sized to %d tokens (%.0f MiB, %.0f%% of %.0f MiB free)",
                size, size * bytes_per_token / 2**20, 100 * mem_fraction, free / 2**20)
    return size
