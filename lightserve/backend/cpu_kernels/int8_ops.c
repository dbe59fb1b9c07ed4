/*
 * The two passes around a W8A8 matmul (the int8 x int8 -> int32 product itself is oneDNN's,
 * through torch._int_mm, which runs VNNI's VPDPBUSD at ~80 % of the peak here):
 *
 *   quantize_rows:   activations [M, K] (bf16 or fp32, strided rows) -> int8 [M, K] + fp32 scale [M]
 *   dequantize_rows: int32 [M, N] -> model dtype [M, N], times the row's and the column's scale
 *
 * Why C: in torch each is 5-6 ops (abs, amax, division, round, clamp, casts), ~40 us apiece for
 * a decode batch, and a step runs 120 of each; here each is one pass of a few microseconds.
 *
 * The arithmetic is `lightserve/backend/quant.py`'s, bit for bit: absmax and 127 / absmax in
 * fp32, x * inv rounded half to even (the vector convert uses MXCSR's default rounding, the
 * scalar path nearbyintf), scale = absmax / 127; dequantization (acc * x_scale) * w_scale,
 * + bias, rounded to bf16 to nearest even. The build passes -ffp-contract=off, so no product is
 * fused into an add that torch rounds separately.
 */
#include <math.h>
#include <stdint.h>

#include "rows.h"

static float absmax_of(const void *row, int64_t cols, int bf16) {
    int64_t i = 0;
    float m = 0.0f;
#if HAVE_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= cols; i += 16)
        acc = _mm512_max_ps(acc, _mm512_abs_ps(load16(row, i, bf16)));
    m = _mm512_reduce_max_ps(acc);
#endif
    for (; i < cols; i++) {
        float a = fabsf(load(row, i, bf16));
        if (a > m)
            m = a;
    }
    return m;
}

static void quantize_row(const void *row, int64_t cols, int bf16, float absmax, int8_t *out) {
    float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    int64_t i = 0;
#if HAVE_AVX512
    __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (; i + 16 <= cols; i += 16) {
        __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(load16(row, i, bf16), vinv), lo), hi);
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
#endif
    for (; i < cols; i++) {
        float v = nearbyintf(load(row, i, bf16) * inv);
        out[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
}

/* absmax[r] = max |x[r, :]| (fp32), for ranks that share a row's scale before quantizing. */
int row_absmax(const void *x, int64_t x_stride, int32_t bf16, int64_t rows, int64_t cols, float *absmax,
               int32_t n_threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols, n_threads))
    for (int64_t r = 0; r < rows; r++)
        absmax[r] = absmax_of((const char *)x + r * x_stride * esize, cols, bf16);
    return 0;
}

/* out[r, :] = round(x[r, :] * 127 / a), scale[r] = a / 127, with a = absmax[r] when given
 * (NULL: the row's own). out is [rows, cols] contiguous. */
int quantize_rows(const void *x, int64_t x_stride, int32_t bf16, int64_t rows, int64_t cols, const float *absmax,
                  int8_t *out, float *scale, int32_t n_threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols, n_threads))
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)x + r * x_stride * esize;
        float a = absmax ? absmax[r] : absmax_of(row, cols, bf16);
        quantize_row(row, cols, bf16, a, out + r * cols);
        scale[r] = a / 127.0f;
    }
    return 0;
}

/* out[r, c] = (acc[r, c] * x_scale[r]) * w_scale[c] (+ bias[c]), rounded to bf16 or kept fp32.
 * acc is [rows, cols] contiguous, out has row stride out_stride (elements); bias (model dtype)
 * may be NULL. */
int dequantize_rows(const int32_t *acc, int64_t rows, int64_t cols, const float *x_scale, const float *w_scale,
                    const void *bias, void *out, int64_t out_stride, int32_t bf16, int32_t n_threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * cols, n_threads))
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *a = acc + r * cols;
        char *o = (char *)out + r * out_stride * esize;
        const float xs = x_scale[r];
        int64_t c = 0;
#if HAVE_AVX512
        __m512 vxs = _mm512_set1_ps(xs);
        for (; c + 16 <= cols; c += 16) {
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(a + c)), vxs),
                                     _mm512_loadu_ps(w_scale + c));
            if (bias)
                v = _mm512_add_ps(v, load16(bias, c, bf16));
            if (bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)o + c), _mm512_cvtepi32_epi16(bf16_bits16(v)));
            else
                _mm512_storeu_ps((float *)o + c, v);
        }
#endif
        for (; c < cols; c++) {
            float v = ((float)a[c] * xs) * w_scale[c];
            if (bias)
                v = v + load(bias, c, bf16);
            store(o, c, v, bf16);
        }
    }
    return 0;
}
