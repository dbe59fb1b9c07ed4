"""The linear layers of a rank: float (prepacked for oneDNN) or W8A8, built by one factory.

Float: on CPUs with AMX / AVX512-BF16, oneDNN runs bf16 matmuls from a weight it has reordered
once into its blocked layout much faster than `F.linear` on the plain tensor (which may reorder
on every call). The plain tensor is dropped after packing, so memory does not double.

W8A8 (`--quantization w8a8`): weights int8 with one scale per output channel, quantized at load;
activations int8 with one scale per token, quantized on every call; the product is exact int32
(`torch._int_mm`: oneDNN's VNNI kernel on CPU, cuBLAS on CUDA) and is dequantized once. Every
scale follows `backend/quant.py`. On this project's Zen 4 the int8 product runs at ~1.8x the bf16
one (docs/performance.md).

Tensor parallel: a row-parallel layer (o_proj, down: the input is split over ranks) sums its
output over ranks itself. A W8A8 one quantizes its slices with the whole row's absmax (one
all-reduce of a max) and sums the int32 products before dequantizing, so tp=2 computes exactly
what tp=1 does.

W8A8 also rotates the residual stream, which halves its cost in perplexity (`LinearFactory`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lightserve.backend import quant
from lightserve.backend.parallel import TensorParallel

# Batch size oneDNN tunes the packed layout for (decode batches are tens of rows); any batch works.
_PACK_HINT_ROWS = 64
# cuBLAS' int8 GEMM behind torch._int_mm takes more than 16 rows.
_CUDA_INT_MM_MIN_ROWS = 17


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
    """y = x @ W.T + b in the model dtype; with `reduce_over` the partial sums of every rank."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, prepack: bool = True,
                 reduce_over: Optional[TensorParallel] = None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.reduce_over = reduce_over if reduce_over is not None and reduce_over.enabled else None
        self.weight: Optional[torch.Tensor] = weight
        self._packed: Optional[torch.Tensor] = None
        if prepack and _can_pack(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT_ROWS)
            self.weight = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A row-parallel layer adds its bias once, after the sum.
        bias = self.bias if self.reduce_over is None else None
        if self._packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, bias)
        if self.reduce_over is not None:
            self.reduce_over.all_reduce(y)
            if self.bias is not None:
                y += self.bias
        return y


def _cpu_int8_kernels():
    """The C quantize/dequantize passes, or None (torch's ops then, same results)."""
    from lightserve.backend.cpu_kernels import build, int8_ops

    return int8_ops if build.available() else None


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 b [K, N] -> int32 [M, N], exact."""
    rows = a.shape[0]
    if a.is_cuda and rows < _CUDA_INT_MM_MIN_ROWS:
        padded = a.new_zeros((_CUDA_INT_MM_MIN_ROWS, a.shape[1]))
        padded[:rows] = a
        return torch._int_mm(padded, b)[:rows]
    return torch._int_mm(a, b)


class Int8Linear:
    """W8A8 y = x @ W.T + b: int8 weight [K, N] with fp32 scales [N], activations quantized per row."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device,
                 reduce_over: Optional[TensorParallel] = None):
        """`weight` [N, K] as the checkpoint holds it (quantized from its own precision);
        `reduce_over`: this rank holds a slice of every row (row parallel)."""
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.reduce_over = reduce_over if reduce_over is not None and reduce_over.enabled else None
        weight = weight.to(device)
        absmax = quant.row_absmax(weight)
        if self.reduce_over is not None:
            self.reduce_over.all_reduce_max(absmax)
        q, self.w_scale = quant.quantize_symmetric(weight, absmax)
        self.qweight = q.t().contiguous()  # [K, N]: the layout torch._int_mm reads fastest here
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype).contiguous()
        self._c = _cpu_int8_kernels() if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._c
        absmax = None
        if self.reduce_over is not None:  # the whole row's absmax, as tp=1 sees the row
            absmax = self.reduce_over.all_reduce_max(c.row_absmax(x) if c else quant.row_absmax(x))
        return c.quantize_rows(x, absmax) if c else quant.quantize_symmetric(x, absmax)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.stride(-1) != 1:
            x = x.contiguous()
        xq, x_scale = self._quantize(x)
        acc = int_mm(xq, self.qweight)
        if self.reduce_over is not None:
            self.reduce_over.all_reduce(acc)  # int32: the sum over ranks is exact
        if self._c:
            y = self._c.dequantize_rows(acc, x_scale, self.w_scale, self.bias, self.dtype)
        else:
            y = quant.dequantize_acc(acc, x_scale, self.w_scale, self.bias, self.dtype)
        return y.view(*lead, self.out_features)


QUANTIZATIONS = ("none", "w8a8")
# Seed of the residual stream's rotation: every rank and every start builds the same one.
_ROTATION_SEED = 0x51_0A7E


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    squares = torch.full((q,), -1.0, dtype=torch.float64)
    squares[[x * x % q for x in range(1, q)]] = 1.0
    squares[0] = 0.0
    idx = torch.arange(q)
    h = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    h[0, 1:] = 1.0
    h[1:, 0] = -1.0
    h[1:, 1:] = squares[(idx[None, :] - idx[:, None]) % q]  # the Jacobsthal matrix
    return h + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> Optional[torch.Tensor]:
    """A {-1, 1} [n, n] matrix with H H^T = n I from Sylvester doublings and Kronecker products
    of Paley matrices (every hidden size of the supported families), or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0:
        h = hadamard(n // 2)
        if h is not None:
            return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    for d in range(4, n + 1, 4):
        if n % d == 0 and (d - 1) % 4 == 3 and _is_prime(d - 1):
            h = hadamard(n // d)
            if h is not None:
                return torch.kron(_paley(d - 1), h)
    return None


def residual_rotation(hidden: int, tp: TensorParallel) -> torch.Tensor:
    """A fixed orthogonal [hidden, hidden] fp32 matrix, the same on every rank: a randomized
    Hadamard matrix diag(random signs) H / sqrt(hidden) (QuaRot's choice: every entry has the same
    magnitude, so an outlier channel is spread evenly over all channels), or, for a size with no
    Hadamard construction here, a random orthogonal one.

    The choice matters: perplexity under W8A8 varies by a few percent from one random orthogonal
    matrix to another (SmolLM2-135M, emulated, 1024 tokens of the benchmark text: +0.5 % to +1.9 %
    over 8 draws, and +3.7 % for the one this seed used to draw)."""
    gen = torch.Generator().manual_seed(_ROTATION_SEED)
    h = hadamard(hidden)
    if h is not None:
        signs = torch.randint(0, 2, (hidden,), generator=gen).double() * 2 - 1
        q = (signs[:, None] * h / hidden ** 0.5).float()
    else:
        q, r = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))
        q = (q * torch.sign(torch.diagonal(r))).float()  # the unique QR with a positive diagonal
    if tp.enabled:  # LAPACK on another node's CPU could round differently: rank 0's is everyone's
        tp.broadcast(q)
    return q


class LinearFactory:
    """Builds a rank's linear layers from checkpoint tensors (this rank's slices), float or W8A8.

    W8A8 also rotates the residual stream by a fixed orthogonal matrix Q (a randomized Hadamard
    matrix, as QuaRot uses, without its online transforms; `residual_rotation`): the embedding is E @ Q, the layers that read the stream (q/k/v,
    gate/up, lm_head) take W diag(norm) @ Q with their RMSNorm's weight folded in (the norms then
    scale by 1: RMSNorm commutes with an orthogonal map), and the layers that write it (o_proj,
    down) take Q^T @ W. The float model computes the same function; but the few channels where a
    Llama residual stream carries values 10-40x the rest are spread over all channels, so the
    per-token int8 scale of q/k/v's and gate/up's input no longer rides on them: SmolLM2's
    perplexity cost of W8A8 on the benchmark text went from +2.9 % to +0.5 % over bf16
    (`benchmarks/quality.py`, docs/performance.md).
    """

    def __init__(self, tp: TensorParallel, dtype: torch.dtype, device: torch.device, quantization: str = "none",
                 quantize_lm_head: bool = False, hidden_size: Optional[int] = None):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown --quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if quantize_lm_head and quantization == "none":
            raise ValueError("--quantize_lm_head needs --quantization w8a8")
        self.tp, self.dtype, self.device = tp, dtype, device
        self.quantized = quantization == "w8a8"
        self.quantize_lm_head = quantize_lm_head
        self.rotation: Optional[torch.Tensor] = None
        if self.quantized and hidden_size is not None:
            self.rotation = residual_rotation(hidden_size, tp)

    def _make(self, weight: torch.Tensor, bias: Optional[torch.Tensor], quantized: bool,
              row_parallel: bool) -> Linear | Int8Linear:
        reduce_over = self.tp if row_parallel else None
        if quantized:
            return Int8Linear(weight, bias, self.dtype, self.device, reduce_over)
        to_model = dict(device=self.device, dtype=self.dtype)
        return Linear(weight.to(**to_model).contiguous(), None if bias is None else bias.to(**to_model).contiguous(),
                      reduce_over=reduce_over)

    def _reading(self, weight: torch.Tensor, norm: Optional[torch.Tensor]) -> torch.Tensor:
        """A layer that reads the residual stream, after the RMSNorm of weight `norm`."""
        if self.rotation is None:
            return weight
        w = weight.float() if norm is None else weight.float() * norm.float()
        return w @ self.rotation

    def column(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               norm: Optional[torch.Tensor] = None) -> Linear | Int8Linear:
        """A layer whose output features are split over ranks (q/k/v, gate/up); `norm` is the
        weight of the RMSNorm before it."""
        return self._make(self._reading(weight, norm), bias, self.quantized, row_parallel=False)

    def row(self, weight: torch.Tensor) -> Linear | Int8Linear:
        """A layer whose input features are split over ranks (o_proj, down): summed over ranks.
        Its output is added to the residual stream."""
        if self.rotation is not None:
            weight = self.rotation.T @ weight.float()
        return self._make(weight, None, self.quantized, row_parallel=True)

    def lm_head(self, weight: torch.Tensor, norm: torch.Tensor) -> Linear | Int8Linear:
        """The vocab-split output layer after the final RMSNorm: W8A8 only with --quantize_lm_head."""
        return self._make(self._reading(weight, norm), None, self.quantize_lm_head, row_parallel=False)

    def norm(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight an RMSNorm before `column`/`lm_head` layers applies at run time (1 once folded)."""
        if self.rotation is not None:
            weight = torch.ones_like(weight)
        return weight.to(device=self.device, dtype=self.dtype)

    def embedding(self, weight: torch.Tensor) -> torch.Tensor:
        """The embedding table (rows of the residual stream), rotated in fp32 and rounded once."""
        weight = weight.to(self.device)
        if self.rotation is not None:
            weight = weight.float() @ self.rotation.to(self.device)
        return weight.to(self.dtype).contiguous()

    def to_residual(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors entering the residual stream (embeddings, image embeddings), rotated like it."""
        if self.rotation is None:
            return x
        return (x.float() @ self.rotation.to(x.device)).to(x.dtype)
