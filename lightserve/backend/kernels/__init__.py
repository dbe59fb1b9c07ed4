"""Triton kernels of the `triton` attention back end (the GPU path).

- `token_attention_decode`: decode attention through the token table (split-K flash decoding, GQA).
- `context_attention`: causal prefill attention of packed new tokens through the token table.
- `rotary`, `rmsnorm`, `silu_mul`, `kv_copy`: the other layer ops, gathered in `ops.TritonOps`.
- `triton_attention.TritonAttention`: the back end built from them.
- `runtime`: where kernels can launch (CUDA, or the Triton interpreter with TRITON_INTERPRET=1
  set before triton is imported) and the dtype rules.

Nothing is imported here, so that importing this package never imports triton.
"""
