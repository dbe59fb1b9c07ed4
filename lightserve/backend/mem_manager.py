"""TokenAttention KV pool: one K and one V slot per token, shared by every request.

The pool is a flat array of token slots per layer. A request's tokens live in whatever slots it
was given (the request's row of `ReqManager.req_to_token` records which), so no memory is reserved
for tokens a request may never produce and nothing is wasted to padding: slots in use are exactly
the slots handed out and not yet freed.

Allocation prefers one contiguous window of free slots, because attention can then read a request's
K/V as a strided view instead of gathering it through the token table. When no window is big enough
it takes the first free slots, so an allocation never fails while enough slots are free.

Every operation is a handful of vectorised tensor ops over `mem_state` (never a Python loop per
token), and `mem_state` lives on the buffers' device so that allocation does not copy state to the
host. `alloc` needs no host sync at all; `free` needs one, to validate its input before it changes
anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lightserve.backend.quant import quantize_symmetric

# KV element types a pool may store (--kv_cache_dtype). int8 keeps one fp32 scale per token and
# head beside the values (`LayerKV`); the pool then holds about twice the tokens of a bf16 one in
# the same bytes. auto: the model's dtype.
KV_DTYPES = {"auto": None, "int8": torch.int8}


def kv_cache_dtype(name: str) -> Optional[torch.dtype]:
    """The pool's element type for --kv_cache_dtype `name` (None: the model's)."""
    if name not in KV_DTYPES:
        raise ValueError(f"unknown --kv_cache_dtype {name!r}; choose one of {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


@dataclass(frozen=True)
class LayerKV:
    """One layer's K/V pool: `k`/`v` [S, Hkv, D] in the model's dtype, or int8 with `k_scale`/
    `v_scale` [S, Hkv] fp32 beside them (value = int8 * scale, symmetric, per token and head;
    `quantize_kv` is the reference arithmetic every write path follows)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: Optional[torch.Tensor] = None
    v_scale: Optional[torch.Tensor] = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` [N] as [N, Hkv, D] of `dtype` (dequantized from an int8 pool)."""
        k, v = self.k.index_select(0, slots), self.v.index_select(0, slots)
        if not self.quantized:
            return k, v
        return (dequantize_kv(k, self.k_scale.index_select(0, slots), dtype),
                dequantize_kv(v, self.v_scale.index_select(0, slots), dtype))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> (int8 [T, H, D], fp32 scale [T, H]): symmetric per token and head, with
    the arithmetic of `quant.quantize_symmetric` that every KV write path reproduces."""
    return quantize_symmetric(x)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, H, D] and fp32 scale [N, H] -> values of `dtype` (product rounded once, in fp32)."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


class KVCacheFull(RuntimeError):
    """More KV slots were asked for than are free; the pool is left unchanged."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"KV cache full: asked for {requested} slots, {free} free")
        self.requested = requested
        self.free = free


class MemoryManager:
    """The per-layer K/V buffers and the free/used state of their token slots."""

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: torch.device | str = "cpu",
        kv_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """`dtype` is the model's; `kv_dtype` torch.int8 stores K/V quantized (None: `dtype`)."""
        if size <= 0:
            raise ValueError(f"KV pool size must be positive, got {size}")
        self.size = size
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.device = torch.device(device)

        # Zeroed rather than left uninitialised: attention paths that pad a batch read slots no
        # request wrote, and NaN garbage there would survive a zero attention weight (0 * NaN).
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        quantized = self.kv_dtype == torch.int8
        self.layers = [
            LayerKV(zeros(size, head_num, head_dim, dtype=self.kv_dtype), zeros(size, head_num, head_dim, dtype=self.kv_dtype),
                    *((zeros(size, head_num, dtype=torch.float32), zeros(size, head_num, dtype=torch.float32))
                      if quantized else ()))
            for _ in range(layer_num)
        ]
        self.mem_state = torch.ones(size, dtype=torch.bool, device=self.device)
        # Kept as a Python int (updated on every alloc/free) so that the router and /metrics read
        # the exact count without a device sync.
        self.can_use_mem_size = size
        # Scratch reused by every search: `_free_prefix[i]` = number of free slots in [0, i).
        # int32 halves the memory traffic of the scan; the pool never holds 2**31 slots.
        self._free_prefix = torch.zeros(size + 1, dtype=torch.int32, device=self.device)
        # 0..size, sliced for window offsets and for the ranks of the first n free slots.
        self._arange = torch.arange(size + 1, dtype=torch.int32, device=self.device)

    @staticmethod
    def bytes_per_token(kv_dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int) -> int:
        """Bytes one token slot takes over all layers (K and V, and their scales in an int8
        pool), for sizing the pool."""
        element_size = torch.empty((), dtype=kv_dtype).element_size()
        scale_bytes = 4 if kv_dtype == torch.int8 else 0
        return 2 * layer_num * head_num * (head_dim * element_size + scale_bytes)

    def _first_window(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device scalars (start, found) of the first window of `n` free slots, in O(size).

        The free count of the window starting at s is prefix[s + n] - prefix[s]; the first
        window whose count reaches n is the first index of the maximum (ties resolve to the
        first index), and it is all free iff that maximum equals n.
        """
        torch.cumsum(self.mem_state, dim=0, dtype=torch.int32, out=self._free_prefix[1:])
        window_free = self._free_prefix[n:] - self._free_prefix[: self.size - n + 1]
        best, start = torch.max(window_free, dim=0)
        return start, best == n

    def _first_free(self, n: int) -> torch.Tensor:
        """The first `n` free slots (needs `_free_prefix` fresh and n <= free slots).

        The k-th free slot is the first index whose inclusive free prefix reaches k, so a binary
        search per rank finds all n at once: O(n log size) on top of the scan.
        """
        return torch.searchsorted(self._free_prefix[1:], self._arange[1 : n + 1])

    def _check_request(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self.can_use_mem_size:
            raise KVCacheFull(n, self.can_use_mem_size)

    def alloc(self, n: int) -> torch.Tensor:
        """Take `n` free slots: the first contiguous window if one exists, else the first n free.

        Returns int64 slot indices [n] on the pool's device. Raises KVCacheFull (pool unchanged)
        when fewer than n slots are free.
        """
        self._check_request(n)
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        start, found = self._first_window(n)
        # Both candidates are computed and chosen on the device, so alloc never waits for it.
        contiguous = self._arange[:n] + start
        idx = torch.where(found, contiguous, self._first_free(n)).to(torch.int64)
        self.mem_state[idx] = False
        self.can_use_mem_size -= n
        return idx

    def alloc_contiguous(self, n: int) -> tuple[torch.Tensor, int, int] | None:
        """Take the first window of `n` contiguous free slots.

        Returns (int64 indices [n], start, end) with indices == range(start, end), or None
        (pool unchanged) when no such window exists. Costs one host sync.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self.can_use_mem_size:
            return None
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device), 0, 0
        start_t, found_t = self._first_window(n)
        start, found = torch.stack([start_t, found_t.to(start_t.dtype)]).tolist()
        if not found:
            return None
        end = start + n
        self.mem_state[start:end] = False
        self.can_use_mem_size -= n
        return torch.arange(start, end, dtype=torch.int64, device=self.device), start, end

    def free(self, idx: torch.Tensor | Sequence[int]) -> None:
        """Return slots to the pool.

        Raises ValueError, with the pool unchanged, if any index is out of range, repeated, or
        already free (a double free would otherwise let two requests share a slot).
        """
        idx = as_index_tensor(idx, self.device)
        k = idx.numel()
        if k == 0:
            return
        ordered = torch.sort(idx).values
        # Clamped only for the lookup: out-of-range entries are reported by `out_of_range`
        # and must not reach an indexing op (a device-side assert on CUDA).
        already_free = self.mem_state[ordered.clamp(0, self.size - 1)]
        checks = torch.stack(
            [
                (ordered[0] < 0) | (ordered[-1] >= self.size),
                (ordered[1:] == ordered[:-1]).any(),
                already_free.any(),
            ]
        )
        out_of_range, duplicated, double_free = checks.tolist()
        if out_of_range:
            bad = ordered[(ordered < 0) | (ordered >= self.size)]
            raise ValueError(f"KV slot indices out of range [0, {self.size}): {_head(bad)}")
        if duplicated:
            bad = ordered[1:][ordered[1:] == ordered[:-1]]
            raise ValueError(f"KV slot indices repeated in one free: {_head(bad)}")
        if double_free:
            raise ValueError(f"KV slots already free: {_head(ordered[already_free])}")
        self.mem_state[idx] = True
        self.can_use_mem_size += k

    def free_all(self) -> None:
        """Mark every slot free (buffers are not cleared: slots are written before read)."""
        self.mem_state.fill_(True)
        self.can_use_mem_size = self.size


def as_index_tensor(idx: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """A flat int64 index tensor on `device` from a tensor of any integer type or a list of ints.

    Bool and float input is refused: a bool tensor would silently act as a mask and a float one
    would be truncated, both caller bugs that must not free the wrong slots.
    """
    if not isinstance(idx, torch.Tensor):
        idx = list(idx)
        idx = torch.as_tensor(idx) if idx else torch.empty(0, dtype=torch.int64)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got {idx.dtype}")
    return idx.reshape(-1).to(device=device, dtype=torch.int64)


def _head(values: torch.Tensor, limit: int = 8) -> str:
    """The first few offending indices, so an error message stays short for big frees."""
    shown = values[:limit].tolist()
    more = values.numel() - len(shown)
    return f"{shown}" + (f" (+{more} more)" if more > 0 else "")
