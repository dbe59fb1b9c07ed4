"""Counter-based random numbers for sampling: one uniform per (request seed, step).

A row's draw uses one uniform number that is a pure function of (request seed, number of tokens
the request has generated so far): the SplitMix64 stream of the seed, read at that step with int64
tensor ops, so a request's randomness does not depend on the batch it runs in.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _as_int64(c: int) -> int:
    """The signed int64 with the same bits as the unsigned 64-bit constant `c`."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN_GAMMA = _as_int64(0x9E3779B97F4A7C15)  # SplitMix64's state increment
_MIX_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_MUL2 = _as_int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic, so mask the sign copies)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on an int64 tensor: a bijective hash of 64-bit words.

    int64 multiplication in torch wraps modulo 2^64, which gives the same bits as the unsigned
    original; the tests check this against Python integers.
    """
    z = (z ^ _shift_right(z, 30)) * _MIX_MUL1
    z = (z ^ _shift_right(z, 27)) * _MIX_MUL2
    return z ^ _shift_right(z, 31)


def seed_keys(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-request stream keys (int64) from seeds in [0, 2^63)."""
    return mix64(torch.tensor(list(seeds), dtype=torch.int64, device=device))


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1): output number `steps + 1` of SplitMix64 seeded with `keys`.

    23 random bits, so that `k + 0.5` is exact in float32 and the value never reaches 0 or 1.
    """
    bits = _shift_right(mix64(keys + (steps + 1) * _GOLDEN_GAMMA), 41)
    return (bits.to(torch.float32) + 0.5) * 2.0**-23
