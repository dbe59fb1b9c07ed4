/*
 * The small per-layer ops of a decoder layer, fused, for the CPU back end: RMSNorm (alone or
 * after the residual add), rotary embedding in place, SiLU(gate) * up, and the KV write.
 *
 * Why: in torch each of these is 3-12 separate ops (dtype casts, pow, mean, rsqrt, cat, ...),
 * each a pass over memory and a dispatch of ~10 us. A decode step at batch 64 spends more time
 * in those dispatches than in their arithmetic; a prefill pass spends it in the extra passes.
 *
 * Arithmetic is the torch reference's (models/torch_ops.py), so results match it bit for bit
 * except where noted: fp32 throughout, rounded to bf16 where torch rounds (after the residual
 * add, after normalising, before the weight multiply, after SiLU). The build passes
 * -ffp-contract=off so that a*b - c*d is not fused into an FMA that torch does not do.
 * Differences from torch: the RMSNorm sum of squares adds in another order, and SiLU uses the
 * exp below (within 2 ulp of expf); both are below bf16's resolution almost always.
 *
 * Rows are independent: large calls split rows over OpenMP threads (static schedule).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "rows.h"

#define LO_OK 0
#define LO_BAD_SLOT 1 /* a KV slot outside [0, n_slots) */

/* The value as the model dtype holds it: torch rounds every op's result to bf16. */
static inline float round_to(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/*
 * RMSNorm of rows of x into out; with `delta` non-NULL, first x += delta in place (the residual
 * add), then normalise the sum. x, delta and out have row strides in elements; w is [dim].
 *   y = round(x * 1/sqrt(mean(x^2) + eps));  out = round(w * y)
 */
/* Element i of the residual stream, after adding delta (and storing the sum back) if given. */
static inline float residual(void *x, const void *delta, int64_t i, int bf16) {
    if (!delta)
        return load(x, i, bf16);
    float v = round_to(load(x, i, bf16) + load(delta, i, bf16), bf16);
    store(x, i, v, bf16);
    return v;
}

/* Sum of squares of the residual row (x, or x + delta stored back into x). The gcc vectoriser
 * keeps a float reduction in order, one add at a time; sixteen partial sums in a register
 * make it ~10x faster, at the price of another summation order than torch's. */
static inline float residual_sum_squares(void *x, const void *delta, int64_t dim, int bf16) {
    int64_t i = 0;
    float sum = 0.0f;
#if HAVE_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= dim; i += 16) {
        __m512 v = load16(x, i, bf16);
        if (delta) {
            v = _mm512_add_ps(v, load16(delta, i, bf16));
            if (bf16) {
                __m512i bits = bf16_bits16(v);
                _mm256_storeu_si256((__m256i *)((uint16_t *)x + i), _mm512_cvtepi32_epi16(bits));
                v = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
            } else {
                _mm512_storeu_ps((float *)x + i, v);
            }
        }
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; i < dim; i++) {
        float v = residual(x, delta, i, bf16);
        sum += v * v;
    }
    return sum;
}

static inline void rms_norm_row(void *x, const void *delta, void *out, const void *w, int64_t dim, float eps,
                                int bf16) {
    float sum = residual_sum_squares(x, delta, dim, bf16);
    float inv = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) {
        float y = round_to(load(x, i, bf16) * inv, bf16);
        store(out, i, load(w, i, bf16) * y, bf16);
    }
}

int rms_norm(void *x, int64_t x_stride, const void *delta, int64_t delta_stride, void *out, int64_t out_stride,
             const void *w, int64_t rows, int64_t dim, float eps, int32_t is_bf16, int32_t n_threads) {
    const int64_t esz = is_bf16 ? 2 : 4;
    char *xb = (char *)x, *ob = (char *)out;
    const char *db = (const char *)delta;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * dim, n_threads))
    for (int64_t r = 0; r < rows; r++) {
        void *xr = xb + r * x_stride * esz;
        const void *dr = db ? db + r * delta_stride * esz : NULL;
        void *orow = ob + r * out_stride * esz;
        if (is_bf16)
            rms_norm_row(xr, dr, orow, w, dim, eps, 1);
        else
            rms_norm_row(xr, dr, orow, w, dim, eps, 0);
    }
    return LO_OK;
}

/*
 * Rotary embedding in place on x [T, H, D] (row stride in elements, heads contiguous), with
 * cos/sin fp32 [T, D/2] contiguous, in the "rotate half" layout:
 *   x1, x2 = x[:D/2], x[D/2:];  x = (x1*cos - x2*sin, x2*cos + x1*sin)
 */
static inline void rotary_row(void *x, const float *c, const float *s, int64_t heads, int64_t head_dim, int bf16) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        int64_t base = h * head_dim;
        for (int64_t i = 0; i < half; i++) {
            float x1 = load(x, base + i, bf16), x2 = load(x, base + half + i, bf16);
            store(x, base + i, x1 * c[i] - x2 * s[i], bf16);
            store(x, base + half + i, x2 * c[i] + x1 * s[i], bf16);
        }
    }
}

int rotary(void *x, int64_t x_stride, int64_t rows, int64_t heads, int64_t head_dim, const float *cos_t,
           const float *sin_t, int32_t is_bf16, int32_t n_threads) {
    const int64_t esz = is_bf16 ? 2 : 4, half = head_dim / 2;
    char *xb = (char *)x;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * heads * head_dim, n_threads))
    for (int64_t r = 0; r < rows; r++) {
        void *xr = xb + r * x_stride * esz;
        if (is_bf16)
            rotary_row(xr, cos_t + r * half, sin_t + r * half, heads, head_dim, 1);
        else
            rotary_row(xr, cos_t + r * half, sin_t + r * half, heads, head_dim, 0);
    }
    return LO_OK;
}

/*
 * exp(x) for SiLU, written so that gcc vectorises it (no libm call in the loop): x = n ln2 + r
 * with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial, times 2^n built in the exponent
 * bits (as 2^(n/2) * 2^(n - n/2), so that n = 128 near the top of the range does not overflow
 * the exponent field). Within 2 ulp of expf on [-87.33, 88.72]; above, inf; below, 0 (expf
 * gives denormals there, which vanish in 1 + exp(-x) anyway). NaN stays NaN.
 */
static inline float pow2i(int32_t n) { /* 2^n for n in [-126, 127] */
    uint32_t bits = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float exp_vec(float x) {
    const float hi = 88.7228f, lo = -87.33f; /* exp(hi) < FLT_MAX; exp(lo) > FLT_MIN */
    float xc = x > hi ? hi : (x < lo ? lo : x);
    /* n = round(x / ln2) with the 1.5 * 2^23 trick: adding it leaves n in the low mantissa bits. */
    const float shifter = 12582912.0f;
    float t = fmaf(xc, 1.44269504088896341f, shifter);
    float n = t - shifter;
    float r = fmaf(-n, 0.693145751953125f, xc); /* ln2 in two parts, so r is exact */
    r = fmaf(-n, 1.428606765330187e-06f, r);
    /* Horner with explicit FMAs (the build turns implicit contraction off for the other ops). */
    float p = fmaf(r, 1.0f / 5040, 1.0f / 720);
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    int32_t ni = (int32_t)(tb - 0x4b400000u), half = ni / 2;
    float e = p * pow2i(half) * pow2i(ni - half); /* exact: both factors are powers of two */
    e = x > hi ? INFINITY : e;
    e = x < lo ? 0.0f : e;
    return e;
}

/* out[r, i] = round(silu(gate)) * up with gate_up [T, 2I] (row stride in elements), out [T, I]. */
static inline void silu_mul_row(const void *gu, void *out, int64_t inter, int bf16) {
    const char *up = (const char *)gu + inter * (bf16 ? 2 : 4);
    for (int64_t i = 0; i < inter; i++) {
        float g = load(gu, i, bf16);
        float a = round_to(g / (1.0f + exp_vec(-g)), bf16);
        store(out, i, a * load(up, i, bf16), bf16);
    }
}

int silu_and_mul(const void *gate_up, int64_t gu_stride, void *out, int64_t out_stride, int64_t rows, int64_t inter,
                 int32_t is_bf16, int32_t n_threads) {
    const int64_t esz = is_bf16 ? 2 : 4;
    const char *gb = (const char *)gate_up;
    char *ob = (char *)out;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * inter, n_threads))
    for (int64_t r = 0; r < rows; r++) {
        if (is_bf16)
            silu_mul_row(gb + r * gu_stride * esz, ob + r * out_stride * esz, inter, 1);
        else
            silu_mul_row(gb + r * gu_stride * esz, ob + r * out_stride * esz, inter, 0);
    }
    return LO_OK;
}

/*
 * k_cache[slots[r]] = k[r] and v_cache[slots[r]] = v[r]: rows of `row_bytes` bytes, copied as
 * bytes (any dtype). Every slot is checked before anything is written, so a bad slot changes
 * nothing.
 */
int write_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache, void *v_cache,
             int64_t cache_stride, const int64_t *slots, int64_t rows, int64_t n_slots, int64_t row_bytes,
             int64_t esz) {
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= n_slots)
            return LO_BAD_SLOT;
    for (int64_t r = 0; r < rows; r++) {
        memcpy((char *)k_cache + slots[r] * cache_stride * esz, (const char *)k + r * k_stride * esz, row_bytes);
        memcpy((char *)v_cache + slots[r] * cache_stride * esz, (const char *)v + r * v_stride * esz, row_bytes);
    }
    return LO_OK;
}

/*
 * The int8 pool's write: every (token, head) row of D values is quantized as
 * mem_manager.quantize_kv (quant.quantize_symmetric) does, bit for bit: in fp32, absmax = max |x|,
 * inv = 127 / absmax (0 for an all-zero row), q = x * inv rounded half to even (the default
 * rounding mode) and clamped to [-127, 127], scale = absmax / 127. A row holding a NaN gets
 * scale NaN, so it reads back as NaN.
 */
static inline void quantize_row(const void *x, int8_t *q, float *scale, int64_t dim, int bf16) {
    float absmax = 0.0f;
    int nan = 0;
    int64_t i = 0;
#if HAVE_AVX512
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 vnan = 0;
    for (; i + 16 <= dim; i += 16) {
        const __m512 v = load16(x, i, bf16);
        vnan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    absmax = _mm512_reduce_max_ps(vmax);
    nan = vnan != 0;
#endif
    for (int64_t t = i; t < dim; t++) {
        const float a = fabsf(load(x, t, bf16));
        nan |= a != a;
        absmax = a > absmax ? a : absmax;
    }
    if (nan)
        absmax = NAN;
    const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    i = 0;
#if HAVE_AVX512
    const __m512 vinv = _mm512_set1_ps(inv);
    for (; i + 16 <= dim; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, i, bf16), vinv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(v));
    }
#endif
    for (; i < dim; i++) {
        const float v = nearbyintf(load(x, i, bf16) * inv);
        q[i] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
    }
    *scale = absmax / 127.0f;
}

/*
 * An int8 pool's k_cache[slots[r]] = quantized k[r] with k_scale[slots[r]] its scales (and the
 * same for v): k/v rows [heads, dim] of fp32 or bf16 with row strides in elements; the cache rows
 * (int8, stride cache_stride) and scale rows (fp32, stride scale_stride) likewise. Every slot is
 * checked before anything is written, so a bad slot changes nothing.
 */
int write_kv_int8(const void *k, int64_t k_stride, const void *v, int64_t v_stride, int8_t *k_cache,
                  int8_t *v_cache, int64_t cache_stride, float *k_scale, float *v_scale, int64_t scale_stride,
                  const int64_t *slots, int64_t rows, int64_t n_slots, int64_t heads, int64_t dim,
                  int32_t is_bf16) {
    const int64_t esz = is_bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= n_slots)
            return LO_BAD_SLOT;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t src = h * dim * esz, dst = slots[r] * cache_stride + h * dim;
            const int64_t s = slots[r] * scale_stride + h;
            quantize_row((const char *)k + r * k_stride * esz + src, k_cache + dst, k_scale + s, dim, is_bf16);
            quantize_row((const char *)v + r * v_stride * esz + src, v_cache + dst, v_scale + s, dim, is_bf16);
        }
    return LO_OK;
}
