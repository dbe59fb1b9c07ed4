/*
 * Decode attention over a TokenAttention KV pool, reading K/V through the token table in place.
 *
 * The pool of one layer is K/V of shape [S, Hkv, D] (row stride free, inner dims contiguous);
 * req_to_token[r, i] is the pool slot of position i of request r. A gather + SDPA path copies
 * every request's K/V into a padded buffer and then reads it again; this kernel reads each
 * K/V row once, straight from its slot.
 *
 * Work unit: one batch entry and a range of its kv heads, with the G = Hq / Hkv query heads of
 * each kv head processed together, so every K/V row is loaded from memory once for all of them.
 * Large batches take all kv heads per unit: a slot's [Hkv, D] row is then read in one piece,
 * which costs measurably less than Hkv separate sweeps over 128-byte pieces of scattered rows
 * (random rows are latency-bound, not bandwidth-bound); small batches split by kv head to keep
 * every thread busy. Units are scheduled dynamically because contexts are ragged.
 *
 * The context is walked in blocks of BLOCK positions with an online softmax (running max m,
 * running sum l, rescaled fp32 accumulator): a block's scores stay in L1 and no per-context
 * buffer is needed. Slots are scattered, so the hardware prefetcher cannot follow them: each
 * step prefetches the K row about PREFETCH_BYTES ahead and the V row of the current block.
 *
 * All arithmetic is fp32; bf16 is widened by shifting its bits into the top half of a float
 * (or, for q.k with AVX512_BF16, multiplied as exact bf16 products into fp32 sums). With
 * AVX-512 and D a multiple of 16 (D <= 256) the inner loops use intrinsics; otherwise a
 * portable scalar path runs the same algorithm. D = 64 and D = 128 are instantiated with a
 * compile-time D (always_inline + constant argument) so their loops unroll into registers.
 *
 * An int8 pool (K/V int8 with one fp32 scale per slot and kv head, value = int8 * scale) reads
 * half the bytes of a bf16 one. Each position's scale multiplies its score (q . k_int8, once
 * per dot product) and its probability (before the value step). With AVX512-VNNI and D = 64
 * or 128 (the sizes with a compiled-in D) the dot products are integer ones (attend_unit_vnni,
 * see its section); otherwise int8 is widened to fp32 in the paths above. Its rows and scale lines are
 * prefetched into L2 (prefetcht1) L2_PREFETCH_BYTES ahead instead of into L1: with rows this
 * short and two more scattered lines (the scales) per position, prefetches into L1 kept too few
 * lines in flight, presumably bounded by L1's miss buffers (measured on Zen 4, one thread,
 * batch 64 of ragged 256..1024 contexts on random slots: ~3.6 -> ~1.9 ms).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif
#if HAVE_AVX512 && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif

#ifndef BLOCK
#define BLOCK 32 /* positions per online-softmax step (multiple of 16); -DBLOCK=... is for tuning */
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096 /* K bytes in flight ahead of use: sets the prefetch distance */
#endif
#ifndef L2_PREFETCH_BYTES
#define L2_PREFETCH_BYTES 8192 /* int8 pool: K bytes ahead of use prefetched into L2 */
#endif
/* Limits on a work unit. Measured: units reading 384 bytes of each slot row (bf16, 3 x 64-dim
 * heads) beat per-head units by ~25%, units reading 768 (the same in fp32) lost by ~15%. */
#ifndef MAX_UNIT_ROW_BYTES
#define MAX_UNIT_ROW_BYTES 512 /* bytes of a slot row that one unit reads */
#endif
#define MAX_UNIT_HEADS 16 /* query heads per unit */
/* Each extra thread must get this many (position, kv head) rows (~0.1 ms): waking a thread
 * costs more than a tiny call's work, and far more on a busy machine. */
#define MIN_ROWS_PER_THREAD 4096
#define MAX_VEC_DIM 256 /* largest D for the AVX-512 path (a K head row lives in 16 registers) */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Status codes; the Python wrapper turns them into exceptions. */
enum {
    TA_OK = 0,
    TA_BAD_REQ_IDX = 1, /* b_req_idx outside [0, R) */
    TA_BAD_SEQ_LEN = 2, /* b_seq_len outside [1, Lmax] */
    TA_BAD_SLOT = 3,    /* a req_to_token entry outside [0, S) */
    TA_NO_MEMORY = 4,
};

/* ---------------------------------------------------------------- scalar helpers */

ALWAYS_INLINE float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } c = { .u = (uint32_t)h << 16 };
    return c.f;
}

/* Round to nearest even; NaN stays a (quiet) NaN instead of rounding into infinity. */
ALWAYS_INLINE uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } c = { .f = f };
    if ((c.u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

/* Element d of a row of fp32 or bf16 values; `bf16` is a compile-time constant after inlining. */
ALWAYS_INLINE float load_elem(const void *row, int64_t d, const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

/* Element d of a K/V row: int8 (an int8 pool: the caller applies the row's scale) or q's type. */
ALWAYS_INLINE float load_kv_elem(const void *row, int64_t d, const int bf16, const int kv8) {
    return kv8 ? (float)((const int8_t *)row)[d] : load_elem(row, d, bf16);
}

ALWAYS_INLINE void store_elem(void *row, int64_t d, float x, const int bf16) {
    if (bf16)
        ((uint16_t *)row)[d] = f32_to_bf16(x);
    else
        ((float *)row)[d] = x;
}

/*
 * exp(x) for x <= 0 (a score minus the running max): Cody-Waite reduction and a degree-6
 * polynomial (Cephes coefficients, ~2 ulp). Inputs below -87 are clamped, so exp(-inf) is
 * ~1e-38 rather than 0, which is negligible next to the max term (exp(0) = 1).
 */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

ALWAYS_INLINE float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * EXP_LOG2E);
    const float r = (x - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    float p = EXP_P0;
    p = p * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r + EXP_P4;
    p = p * r + EXP_P5;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } two_n = { .u = (uint32_t)((int32_t)n + 127) << 23 };
    return p * two_n.f;
}

/* Touch every cache line of a row so that a scattered slot is in flight before it is used. */
ALWAYS_INLINE void prefetch_row(const char *row, const int row_bytes) {
    for (int off = 0; off < row_bytes; off += 64)
        __builtin_prefetch(row + off, 0, 3);
}

/* An int8 pool's K and V rows and scale lines of one position, into L2 (see the top comment). */
ALWAYS_INLINE void prefetch_position_l2(const char *krow, const char *vrow, const float *ks,
                                        const float *vs, const int row_bytes) {
    for (int off = 0; off < row_bytes; off += 64) {
        __builtin_prefetch(krow + off, 0, 2);
        __builtin_prefetch(vrow + off, 0, 2);
    }
    __builtin_prefetch(ks, 0, 2);
    __builtin_prefetch(vs, 0, 2);
}

/* ---------------------------------------------------------------- AVX-512 block steps */
#if HAVE_AVX512

ALWAYS_INLINE __m512 load16(const void *row, int64_t d, const int bf16) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)row + d);
}

/* 16 elements of a K/V row as fp32: int8 (an int8 pool) or q's type. */
ALWAYS_INLINE __m512 load16_kv(const void *row, int64_t d, const int bf16, const int kv8) {
    if (kv8) {
        const __m128i b = _mm_loadu_si128((const __m128i *)((const int8_t *)row + d));
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    return load16(row, d, bf16);
}

ALWAYS_INLINE __m512 exp_nonpos16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* x second: a NaN propagates */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/*
 * part[h * BLOCK] = the 16 partial sums of q[h] . K_j for every query head h = j * G + g of the
 * unit's n_kv kv heads (K_j is kv head j of the slot row; part points at the row's column of
 * the block). With AVX512_BF16 and D % 32 == 0, bf16 rows are multiplied as bf16 pairs with
 * fp32 accumulation (exact products), which skips widening K; otherwise qf is used.
 */
ALWAYS_INLINE void score_row_avx512(const void *q, const float *qf, const char *krow, int n_kv,
                                    int G, __m512 *part, const int D, const int bf16, const int kv8) {
    for (int j = 0; j < n_kv; ++j) {
#if defined(__AVX512BF16__)
        if (bf16 && !kv8 && D % 32 == 0) {
            __m512i k[MAX_VEC_DIM / 32];
            for (int c = 0; c < D / 32; ++c)
                k[c] = _mm512_loadu_si512((const uint16_t *)krow + j * D + 32 * c);
            for (int g = 0; g < G; ++g) {
                const uint16_t *qh = (const uint16_t *)q + (j * G + g) * D;
                __m512 s = _mm512_setzero_ps();
                for (int c = 0; c < D / 32; ++c)
                    s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_loadu_si512(qh + 32 * c), (__m512bh)k[c]);
                part[(j * G + g) * BLOCK] = s;
            }
            continue;
        }
#endif
        __m512 k[MAX_VEC_DIM / 16];
        for (int c = 0; c < D / 16; ++c)
            k[c] = load16_kv(krow, j * D + 16 * c, bf16, kv8);
        for (int g = 0; g < G; ++g) {
            const float *qh = qf + (j * G + g) * D;
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);
            for (int c = 1; c < D / 16; ++c)
                s = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), k[c], s);
            part[(j * G + g) * BLOCK] = s;
        }
    }
}

/* Lane sums of 16 vectors combined in pairs: 45 shuffles/adds instead of 16 full reductions. */
ALWAYS_INLINE __m512 add_quarters(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
ALWAYS_INLINE __m512 add_alternate_quarters(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
ALWAYS_INLINE __m512 add_unpacked(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
ALWAYS_INLINE __m512 add_halves(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
}

/* p[h][i] = scale * (lane sum of part[h][i]) for i < n, times the K scale ks[h / G][i] of the
 * position in an int8 pool; lanes i >= n of the last group are 0. */
ALWAYS_INLINE void reduce_scores_avx512(const __m512 *part, int n, int H, int G, float scale,
                                        const float *ks, float *p, const int kv8) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int h = 0; h < H; ++h)
        for (int i0 = 0; i0 < n; i0 += 16) {
            /* The pairing network leaves the sum of input j in lane (j % 4) * 4 + j / 4, so
             * input j takes position (j % 4) * 4 + j / 4 (the map is its own inverse). */
            __m512 v[16], w[8], x[4], y[2];
            for (int j = 0; j < 16; ++j) {
                const int i = i0 + (j % 4) * 4 + j / 4;
                v[j] = i < n ? part[h * BLOCK + i] : _mm512_setzero_ps();
            }
            for (int j = 0; j < 8; ++j)
                w[j] = add_quarters(v[2 * j], v[2 * j + 1]);
            for (int j = 0; j < 4; ++j)
                x[j] = add_alternate_quarters(w[2 * j], w[2 * j + 1]);
            for (int j = 0; j < 2; ++j)
                y[j] = add_unpacked(x[2 * j], x[2 * j + 1]);
            __m512 s = _mm512_mul_ps(vscale, add_halves(y[0], y[1]));
            if (kv8)
                s = _mm512_mul_ps(s, _mm512_loadu_ps(ks + h / G * BLOCK + i0));
            _mm512_storeu_ps(p + h * BLOCK + i0, s);
        }
}

/*
 * Turns the block's scores into probabilities with the running max, updates m and l, and
 * rescales acc by exp(old max - new max). Lanes at and past n are zeroed. In an int8 pool the
 * stored probabilities are multiplied by their V row's scale vs[h / G][i] (l sums them
 * unscaled), so that the value step reads plain int8 V.
 */
ALWAYS_INLINE void softmax_block_avx512(float *p, int n, int H, int G, const float *vs, float *m,
                                        float *l, float *acc, const int D, const int kv8) {
    for (int h = 0; h < H; ++h) {
        float *ph = p + h * BLOCK;
        __m512 s[BLOCK / 16];
        __mmask16 valid[BLOCK / 16];
        __m512 vmax = _mm512_set1_ps(m[h]);
        for (int j = 0; j < BLOCK / 16; ++j) {
            const int left = n - 16 * j;
            valid[j] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            s[j] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid[j], ph + 16 * j);
            vmax = _mm512_max_ps(vmax, s[j]);
        }
        const float new_max = _mm512_reduce_max_ps(vmax);
        const __m512 vnew_max = _mm512_set1_ps(new_max);
        __m512 vsum = _mm512_setzero_ps();
        for (int j = 0; j < BLOCK / 16; ++j) {
            const __m512 e = _mm512_maskz_mov_ps(valid[j], exp_nonpos16(_mm512_sub_ps(s[j], vnew_max)));
            if (kv8) { /* masked: the scales past n are stale */
                const __m512 scale_v = _mm512_loadu_ps(vs + h / G * BLOCK + 16 * j);
                _mm512_storeu_ps(ph + 16 * j, _mm512_maskz_mul_ps(valid[j], e, scale_v));
            } else {
                _mm512_storeu_ps(ph + 16 * j, e);
            }
            vsum = _mm512_add_ps(vsum, e);
        }
        const float alpha = exp_nonpos(m[h] - new_max);
        m[h] = new_max;
        l[h] = l[h] * alpha + _mm512_reduce_add_ps(vsum);
        if (alpha != 1.0f) {
            const __m512 va = _mm512_set1_ps(alpha);
            for (int d = 0; d < D; d += 16)
                _mm512_storeu_ps(acc + h * D + d, _mm512_mul_ps(va, _mm512_loadu_ps(acc + h * D + d)));
        }
    }
}

/*
 * acc[h] += sum_i p[h][i] * V_j[i] for every query head h = j * G + g. Tiles of up to 4 heads x
 * 64 dims keep 16 accumulators in registers, and each V chunk is widened once per tile.
 */
ALWAYS_INLINE void value_block_avx512(const float *p, const char *const *vrows, int n, int n_kv,
                                      int G, float *acc, const int D, const int bf16, const int kv8) {
    const int nc = D / 16;
    for (int j = 0; j < n_kv; ++j)
        for (int c0 = 0; c0 < nc; c0 += 4) {
            const int cn = nc - c0 < 4 ? nc - c0 : 4;
            for (int g0 = 0; g0 < G; g0 += 4) {
                const int gn = G - g0 < 4 ? G - g0 : 4;
                float *acc0 = acc + (j * G + g0) * D + 16 * c0;
                const float *p0 = p + (j * G + g0) * BLOCK;
                __m512 a[4][4];
                for (int t = 0; t < 4; ++t)
                    for (int c = 0; c < 4; ++c)
                        a[t][c] = (t < gn && c < cn) ? _mm512_loadu_ps(acc0 + t * D + 16 * c)
                                                     : _mm512_setzero_ps();
                for (int i = 0; i < n; ++i) {
                    __m512 v[4];
                    for (int c = 0; c < 4; ++c)
                        v[c] = c < cn ? load16_kv(vrows[i], j * D + 16 * (c0 + c), bf16, kv8)
                                      : _mm512_setzero_ps();
                    for (int t = 0; t < 4; ++t) {
                        if (t >= gn)
                            break;
                        const __m512 pt = _mm512_set1_ps(p0[t * BLOCK + i]);
                        for (int c = 0; c < 4; ++c)
                            if (c < cn)
                                a[t][c] = _mm512_fmadd_ps(pt, v[c], a[t][c]);
                    }
                }
                for (int t = 0; t < gn; ++t)
                    for (int c = 0; c < cn; ++c)
                        _mm512_storeu_ps(acc0 + t * D + 16 * c, a[t][c]);
            }
        }
}

#endif /* HAVE_AVX512 */

/* ---------------------------------------------------------------- int8 pool with AVX512-VNNI */
#if HAVE_VNNI
/*
 * An int8 pool is read with integer dot products instead of widening every element to fp32:
 *
 * Scores: q is quantized per head to 16-bit integers (step absmax / Q16_MAX, ~2^-15 of the
 * largest element: far below bf16's resolution) and split into int8 halves, q = 256 * hi + lo.
 * For 16 positions at a time, the K rows of one kv head are transposed so that each 32-bit lane
 * holds 4 bytes of one position; VPDPBUSD then accumulates 4 products per lane, so the 16
 * scores come out in one register with no horizontal sums. VPDPBUSD takes one unsigned operand:
 * K + 128 (an xor of the sign bit), whose extra 128 * sum(q half) is a per-head constant set as
 * the accumulator's start. The integer dot product is exact (|256 hi . k| < 2^31 for D <= 256).
 *
 * Values: the block's weights w = p * scale_v (fp32) are quantized per head to 15-bit integers
 * (step max(w) / W16_MAX, relative error < 2^-15 of the block's largest weight), and VPDPWSSD
 * adds w[i] v_i[d] + w[i+1] v_{i+1}[d] per lane for two interleaved V rows widened to int16.
 * Each block's integer sums (< 2^31: 32 * 32767 * 127) are added to the fp32 accumulator.
 * The interleave permutes the 64 elements of each 64-byte chunk; the accumulator keeps that
 * order (the softmax rescale is elementwise) and unpermute_chunk restores it at the end.
 */
#define Q16_MAX 32639 /* 127 * 256 + 127: the largest q whose halves both fit int8 */
#define W16_MAX 32767

ALWAYS_INLINE int32_t load_i32(const void *p) {
    int32_t x;
    memcpy(&x, p, sizeof x);
    return x;
}

/*
 * Per head h of q ([H, D], fp32 or bf16): q16 = round(q * Q16_MAX / absmax) split into int8
 * q_hi/q_lo ([H, D], q16 = 256 * hi + lo); corr_hi/corr_lo[h] = -128 * the sum of each half;
 * q_mult[h] = scale * absmax / Q16_MAX, so that score = q_mult * (256 * q_hi . k + q_lo . k).
 * A head with a NaN or infinite element gets q_mult NaN (its output is NaN, as in fp32).
 */
ALWAYS_INLINE void quantize_queries_vnni(const void *q, int H, float scale, int8_t *q_hi,
                                         int8_t *q_lo, int32_t *corr_hi, int32_t *corr_lo,
                                         float *q_mult, const int D, const int bf16) {
    for (int h = 0; h < H; ++h) {
        __m512 vmax = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int d = 0; d < D; d += 16) {
            const __m512 a = _mm512_abs_ps(load16(q, (int64_t)h * D + d, bf16));
            bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ);
            vmax = _mm512_max_ps(vmax, a);
        }
        const float absmax = _mm512_reduce_max_ps(vmax);
        /* |q * inv| <= Q16_MAX * (1 + 2^-22), so rounding stays within [-Q16_MAX, Q16_MAX]. */
        const __m512 inv = _mm512_set1_ps(!bad && absmax > 0.0f ? (float)Q16_MAX / absmax : 0.0f);
        __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
        for (int d = 0; d < D; d += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(q, (int64_t)h * D + d, bf16), inv));
            const __m512i lo = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24); /* low byte, signed */
            const __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(v, lo), 8);   /* exact */
            _mm_storeu_si128((__m128i *)(q_hi + h * D + d), _mm512_cvtepi32_epi8(hi));
            _mm_storeu_si128((__m128i *)(q_lo + h * D + d), _mm512_cvtepi32_epi8(lo));
            sum_hi = _mm512_add_epi32(sum_hi, hi);
            sum_lo = _mm512_add_epi32(sum_lo, lo);
        }
        corr_hi[h] = -128 * _mm512_reduce_add_epi32(sum_hi);
        corr_lo[h] = -128 * _mm512_reduce_add_epi32(sum_lo);
        q_mult[h] = bad ? NAN : scale * (absmax / Q16_MAX);
    }
}

/* In place: t[c] lane r = lane c of t[r] (a 16 x 16 transpose of 32-bit lanes). */
ALWAYS_INLINE void transpose16_epi32(__m512i *t) {
    __m512i u[16];
    for (int r = 0; r < 16; r += 2) {
        u[r] = _mm512_unpacklo_epi32(t[r], t[r + 1]);
        u[r + 1] = _mm512_unpackhi_epi32(t[r], t[r + 1]);
    }
    /* t[4R + m] 128-bit block L: column 4L + m of rows 4R..4R+3 */
    for (int r = 0; r < 16; r += 4) {
        t[r] = _mm512_unpacklo_epi64(u[r], u[r + 2]);
        t[r + 1] = _mm512_unpackhi_epi64(u[r], u[r + 2]);
        t[r + 2] = _mm512_unpacklo_epi64(u[r + 1], u[r + 3]);
        t[r + 3] = _mm512_unpackhi_epi64(u[r + 1], u[r + 3]);
    }
    /* For each m, a 4 x 4 transpose of 128-bit blocks over t[m], t[4 + m], t[8 + m], t[12 + m]. */
    for (int m = 0; m < 4; ++m) {
        const __m512i v0 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0xEE);
        u[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        u[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        u[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        u[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
    for (int c = 0; c < 16; ++c)
        t[c] = u[c];
}

/*
 * p[h][t] = q_mult[h] * ks[t] * q[h] . K_j(krows[t]) for the 16 positions t of krows and the
 * G query heads h = j * G + g of kv head j. sacc ([G, 2, 16]) carries the integer sums from
 * one 64-byte chunk of D to the next.
 */
ALWAYS_INLINE void score16_vnni(const char *const *krows, int j, int G, const int8_t *q_hi,
                                const int8_t *q_lo, const int32_t *corr_hi,
                                const int32_t *corr_lo, const float *q_mult, const float *ks,
                                int32_t *sacc, float *p, const int D) {
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    for (int c = 0; c < D / 64; ++c) {
        __m512i t[16];
        for (int r = 0; r < 16; ++r)
            t[r] = _mm512_xor_si512(_mm512_loadu_si512(krows[r] + j * D + 64 * c), sign);
        transpose16_epi32(t);
        for (int g = 0; g < G; ++g) {
            const int h = j * G + g;
            const int8_t *qh = q_hi + h * D + 64 * c, *ql = q_lo + h * D + 64 * c;
            /* Two accumulators per half halve the dependency chains. */
            __m512i hi0 = c ? _mm512_loadu_si512(sacc + g * 32) : _mm512_set1_epi32(corr_hi[h]);
            __m512i lo0 = c ? _mm512_loadu_si512(sacc + g * 32 + 16) : _mm512_set1_epi32(corr_lo[h]);
            __m512i hi1 = _mm512_setzero_si512(), lo1 = _mm512_setzero_si512();
            for (int col = 0; col < 16; col += 2) {
                hi0 = _mm512_dpbusd_epi32(hi0, t[col], _mm512_set1_epi32(load_i32(qh + 4 * col)));
                lo0 = _mm512_dpbusd_epi32(lo0, t[col], _mm512_set1_epi32(load_i32(ql + 4 * col)));
                hi1 = _mm512_dpbusd_epi32(hi1, t[col + 1], _mm512_set1_epi32(load_i32(qh + 4 * col + 4)));
                lo1 = _mm512_dpbusd_epi32(lo1, t[col + 1], _mm512_set1_epi32(load_i32(ql + 4 * col + 4)));
            }
            hi0 = _mm512_add_epi32(hi0, hi1);
            lo0 = _mm512_add_epi32(lo0, lo1);
            if (c + 1 < D / 64) {
                _mm512_storeu_si512(sacc + g * 32, hi0);
                _mm512_storeu_si512(sacc + g * 32 + 16, lo0);
                continue;
            }
            const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(hi0, 8), lo0);
            const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(q_mult[h]));
            _mm512_storeu_ps(p + h * BLOCK, _mm512_mul_ps(s, _mm512_loadu_ps(ks)));
        }
    }
}

/*
 * acc[h] += sum_{i < n} w[h][i] * V_j[i] (one 64-element chunk of D at byte `offset` of the
 * rows) for the GN heads h = h0 .. h0 + GN - 1 of kv head j: wq ([H, BLOCK]) holds the
 * weights as int16 (zero at and past n, so an odd last position pairs with a zero weight), step
 * the value of one unit of each. GN is a compile-time constant so that the GN x 4 accumulators
 * stay in registers.
 */
ALWAYS_INLINE void value_tile_vnni(const int16_t *wq, const float *step,
                                   const char *const *vrows, int n, int64_t offset, int h0,
                                   float *acc, const int D, const int GN) {
    __m512i a[4][4];
    for (int t = 0; t < GN; ++t)
        for (int k = 0; k < 4; ++k)
            a[t][k] = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 2) {
        /* A missing partner row reuses row i: its weight is 0. */
        const __m512i r0 = _mm512_loadu_si512(vrows[i] + offset);
        const __m512i r1 = _mm512_loadu_si512(vrows[i + 1 < n ? i + 1 : i] + offset);
        const __m512i lo = _mm512_unpacklo_epi8(r0, r1), hi = _mm512_unpackhi_epi8(r0, r1);
        /* lane e of x[k]: (v_i[d], v_{i+1}[d]) as int16, d as unpermute_chunk describes */
        const __m512i x[4] = {
            _mm512_cvtepi8_epi16(_mm512_castsi512_si256(lo)),
            _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
            _mm512_cvtepi8_epi16(_mm512_castsi512_si256(hi)),
            _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(hi, 1)),
        };
        for (int t = 0; t < GN; ++t) {
            const __m512i w = _mm512_set1_epi32(load_i32(wq + (h0 + t) * BLOCK + i));
            for (int k = 0; k < 4; ++k)
                a[t][k] = _mm512_dpwssd_epi32(a[t][k], x[k], w);
        }
    }
    for (int t = 0; t < GN; ++t) {
        const __m512 vstep = _mm512_set1_ps(step[h0 + t]);
        float *ah = acc + (h0 + t) * D;
        for (int k = 0; k < 4; ++k)
            _mm512_storeu_ps(ah + 16 * k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[t][k]), vstep,
                                                          _mm512_loadu_ps(ah + 16 * k)));
    }
}

/*
 * acc[h] += sum_{i < n} p[h][i] * V_j[i] for every query head h = j * G + g, with p already
 * holding probability * V scale (zero at and past n). wq ([H, BLOCK] int16) is scratch.
 */
ALWAYS_INLINE void value_block_vnni(const float *p, const char *const *vrows, int n, int n_kv,
                                    int G, int16_t *wq, float *acc, const int D) {
    const int H = n_kv * G;
    float step[MAX_UNIT_HEADS];
    for (int h = 0; h < H; ++h) {
        __m512 vmax = _mm512_setzero_ps();
        for (int i = 0; i < BLOCK; i += 16)
            vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p + h * BLOCK + i));
        const float wmax = _mm512_reduce_max_ps(vmax);
        step[h] = wmax / W16_MAX;
        const __m512 inv = _mm512_set1_ps(wmax > 0.0f ? W16_MAX / wmax : 0.0f);
        for (int i = 0; i < BLOCK; i += 16)
            _mm256_storeu_si256((__m256i *)(wq + h * BLOCK + i),
                                _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
                                    _mm512_mul_ps(_mm512_loadu_ps(p + h * BLOCK + i), inv))));
    }
    for (int j = 0; j < n_kv; ++j)
        for (int c = 0; c < D / 64; ++c)
            for (int g0 = 0; g0 < G; g0 += 4) {
                const int64_t offset = (int64_t)j * D + 64 * c;
                float *ac = acc + 64 * c;
                const int h0 = j * G + g0;
                switch (G - g0 < 4 ? G - g0 : 4) {
                case 1: value_tile_vnni(wq, step, vrows, n, offset, h0, ac, D, 1); break;
                case 2: value_tile_vnni(wq, step, vrows, n, offset, h0, ac, D, 2); break;
                case 3: value_tile_vnni(wq, step, vrows, n, offset, h0, ac, D, 3); break;
                default: value_tile_vnni(wq, step, vrows, n, offset, h0, ac, D, 4); break;
                }
            }
}

/* A 64-element chunk of the accumulator from value_block_vnni's order back to element order:
 * as the byte unpack and the widening leave them, lanes 0-7 of its 16-float group k hold
 * elements b + {0..7} and lanes 8-15 elements b + 16 + {0..7}, with b = 32 (k & 1) + 8 (k >> 1). */
ALWAYS_INLINE void unpermute_chunk(float *a) {
    const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
    const __m512 a2 = _mm512_loadu_ps(a + 32), a3 = _mm512_loadu_ps(a + 48);
    _mm512_storeu_ps(a, _mm512_shuffle_f32x4(a0, a2, 0x44));
    _mm512_storeu_ps(a + 16, _mm512_shuffle_f32x4(a0, a2, 0xEE));
    _mm512_storeu_ps(a + 32, _mm512_shuffle_f32x4(a1, a3, 0x44));
    _mm512_storeu_ps(a + 48, _mm512_shuffle_f32x4(a1, a3, 0xEE));
}

/*
 * attend_unit for an int8 pool with D = 64 or 128 (see the section's comment): the same
 * walk over blocks of BLOCK positions with an online softmax, with integer dot products.
 */
ALWAYS_INLINE int attend_unit_vnni(const void *q, void *out, const char *k_row, const char *v_row,
                                   int64_t k_row_bytes, int64_t v_row_bytes, const float *ks_row,
                                   const float *vs_row, int64_t scale_row_floats,
                                   const int32_t *slots, int len, int64_t n_slots, int n_kv, int G,
                                   float scale, float *work, const int D, const int bf16) {
    const int H = n_kv * G;
    const int row_bytes = n_kv * D; /* the unit's part of a slot row */
    const int ahead = L2_PREFETCH_BYTES / row_bytes > 2 ? L2_PREFETCH_BYTES / row_bytes : 2;
    float *acc = work;         /* [H, D] unnormalised output, 64-byte chunks permuted */
    float *p = acc + H * D;    /* [H, BLOCK] scores, then probability * V scale */
    float *ks = p + H * BLOCK; /* [n_kv, BLOCK] K scales of the block's positions */
    float *vs = ks + H * BLOCK; /* [n_kv, BLOCK] V scales */
    float *m = vs + H * BLOCK; /* [H] running max */
    float *l = m + H;          /* [H] running sum of exp(score - m) */
    float *q_mult = l + H;     /* [H] */
    int32_t *corr = (int32_t *)(q_mult + H); /* [2, H] */
    int32_t *sacc = corr + 2 * H;            /* [G, 2, 16] */
    int8_t *q_hi = (int8_t *)(sacc + H * 32); /* [H, D] */
    int8_t *q_lo = q_hi + H * D;              /* [H, D] */
    int16_t *wq = (int16_t *)(q_lo + H * D);  /* [H, BLOCK] quantized weights */
    const char *krows[BLOCK], *vrows[BLOCK];

    quantize_queries_vnni(q, H, scale, q_hi, q_lo, corr, corr + H, q_mult, D, bf16);
    for (int h = 0; h < H; ++h) {
        for (int d = 0; d < D; ++d)
            acc[h * D + d] = 0.0f;
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int i = 0; i < len && i < ahead; ++i) /* the first positions, before the walk */
        prefetch_position_l2(k_row + slots[i] * k_row_bytes, v_row + slots[i] * v_row_bytes,
                             ks_row + slots[i] * scale_row_floats,
                             vs_row + slots[i] * scale_row_floats, row_bytes);

    for (int start = 0; start < len; start += BLOCK) {
        const int n = len - start < BLOCK ? len - start : BLOCK;
        for (int i = 0; i < n; ++i) {
            const int64_t slot = slots[start + i];
            if ((uint64_t)slot >= (uint64_t)n_slots)
                return TA_BAD_SLOT;
            krows[i] = k_row + slot * k_row_bytes;
            vrows[i] = v_row + slot * v_row_bytes;
            for (int j = 0; j < n_kv; ++j) {
                ks[j * BLOCK + i] = ks_row[slot * scale_row_floats + j];
                vs[j * BLOCK + i] = vs_row[slot * scale_row_floats + j];
            }
            if (start + i + ahead < len) { /* prefetch never faults: no bounds check needed */
                const int64_t later = slots[start + i + ahead];
                prefetch_position_l2(k_row + later * k_row_bytes, v_row + later * v_row_bytes,
                                     ks_row + later * scale_row_floats,
                                     vs_row + later * scale_row_floats, row_bytes);
            }
        }
        for (int i0 = 0; i0 < n; i0 += 16) {
            const char *group[16]; /* positions past n repeat the last one (masked later) */
            for (int t = 0; t < 16; ++t)
                group[t] = krows[i0 + t < n ? i0 + t : n - 1];
            for (int j = 0; j < n_kv; ++j)
                score16_vnni(group, j, G, q_hi, q_lo, corr, corr + H, q_mult, ks + j * BLOCK + i0,
                             sacc, p + i0, D);
        }
        softmax_block_avx512(p, n, H, G, vs, m, l, acc, D, 1);
        value_block_vnni(p, vrows, n, n_kv, G, wq, acc, D);
    }

    for (int h = 0; h < H; ++h) {
        const float inv = 1.0f / l[h];
        for (int c = 0; c < D; c += 64)
            unpermute_chunk(acc + h * D + c);
        for (int d = 0; d < D; ++d)
            store_elem(out, (int64_t)h * D + d, acc[h * D + d] * inv, bf16);
    }
    return TA_OK;
}
#endif /* HAVE_VNNI */

/* ---------------------------------------------------------------- portable block steps */

/* p[h * BLOCK] = scale * qf[h] . K_j for every query head h = j * G + g, times K_j's scale
 * ks[j * BLOCK] in an int8 pool. */
ALWAYS_INLINE void score_row_scalar(const float *qf, const char *krow, int n_kv, int G,
                                    float scale, const float *ks, float *p, const int D,
                                    const int bf16, const int kv8) {
    for (int h = 0; h < n_kv * G; ++h) {
        const int64_t k0 = (int64_t)(h / G) * D;
        float s = 0.0f;
        for (int d = 0; d < D; ++d)
            s += qf[h * D + d] * load_kv_elem(krow, k0 + d, bf16, kv8);
        p[h * BLOCK] = kv8 ? scale * s * ks[h / G * BLOCK] : scale * s;
    }
}

ALWAYS_INLINE void softmax_block_scalar(float *p, int n, int H, int G, const float *vs, float *m,
                                        float *l, float *acc, const int D, const int kv8) {
    for (int h = 0; h < H; ++h) {
        float *ph = p + h * BLOCK;
        float new_max = m[h];
        for (int i = 0; i < n; ++i)
            new_max = ph[i] > new_max ? ph[i] : new_max;
        float sum = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float e = exp_nonpos(ph[i] - new_max);
            sum += e;
            ph[i] = kv8 ? e * vs[h / G * BLOCK + i] : e;
        }
        const float alpha = exp_nonpos(m[h] - new_max);
        m[h] = new_max;
        l[h] = l[h] * alpha + sum;
        for (int d = 0; d < D; ++d)
            acc[h * D + d] *= alpha;
    }
}

ALWAYS_INLINE void value_block_scalar(const float *p, const char *const *vrows, int n, int n_kv,
                                      int G, float *acc, const int D, const int bf16, const int kv8) {
    for (int h = 0; h < n_kv * G; ++h) {
        const int64_t v0 = (int64_t)(h / G) * D;
        for (int d = 0; d < D; ++d) {
            float a = acc[h * D + d];
            for (int i = 0; i < n; ++i)
                a += p[h * BLOCK + i] * load_kv_elem(vrows[i], v0 + d, bf16, kv8);
            acc[h * D + d] = a;
        }
    }
}

/* ---------------------------------------------------------------- one work unit */

/* Floats of per-thread scratch that attend_unit needs for H query heads (64-byte aligned); the
 * partial sums (H * BLOCK * 16) alone exceed what attend_unit_vnni needs. */
static size_t work_floats(int H, int D) {
    return (size_t)H * BLOCK * 16 + 2 * (size_t)H * D + 3 * (size_t)H * BLOCK + 2 * (size_t)H;
}

/*
 * Attention of the H = n_kv * G query heads `q` ([H, D], contiguous) over `len` positions whose
 * slots are `slots`; writes `out` ([H, D]). `k_row`/`v_row` point at the unit's first kv head
 * inside slot 0; consecutive slots are `k_row_bytes`/`v_row_bytes` apart. In an int8 pool (kv8)
 * K/V are int8 and `ks_row`/`vs_row` point at the unit's first kv head in the scale rows of
 * slot 0, `scale_row_floats` apart. `work` holds work_floats(H, D) floats. Returns TA_BAD_SLOT
 * (leaving `out` unwritten) on a slot outside [0, n_slots).
 */
ALWAYS_INLINE int attend_unit(const void *q, void *out, const char *k_row, const char *v_row,
                              int64_t k_row_bytes, int64_t v_row_bytes, const float *ks_row,
                              const float *vs_row, int64_t scale_row_floats, const int32_t *slots,
                              int len, int64_t n_slots, int n_kv, int G, float scale, float *work,
                              const int D, const int bf16, const int kv8) {
    const int H = n_kv * G;
#if HAVE_AVX512
    const int vector_path = D % 16 == 0 && D <= MAX_VEC_DIM;
    __m512 *part = (__m512 *)work; /* [H, BLOCK] partial dot products (vector path) */
#endif
    const int row_bytes = n_kv * D * (kv8 ? 1 : bf16 ? 2 : 4); /* the unit's part of a slot row */
    const int ahead_bytes = kv8 ? L2_PREFETCH_BYTES : PREFETCH_BYTES;
    const int ahead = ahead_bytes / row_bytes > 2 ? ahead_bytes / row_bytes : 2;
    float *qf = work + (size_t)H * BLOCK * 16; /* [H, D] queries as fp32 */
    float *acc = qf + H * D;                    /* [H, D] unnormalised output */
    float *p = acc + H * D;   /* [H, BLOCK] scaled scores, then probabilities, of one block */
    float *ks = p + H * BLOCK; /* [n_kv, BLOCK] K scales of the block's positions (int8 pool) */
    float *vs = ks + H * BLOCK; /* [n_kv, BLOCK] V scales */
    float *m = vs + H * BLOCK; /* [H] running max */
    float *l = m + H;          /* [H] running sum of exp(score - m) */
    const char *vrows[BLOCK];

    for (int h = 0; h < H; ++h) {
        for (int d = 0; d < D; ++d) {
            qf[h * D + d] = load_elem(q, (int64_t)h * D + d, bf16);
            acc[h * D + d] = 0.0f;
        }
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }

    for (int start = 0; start < len; start += BLOCK) {
        const int n = len - start < BLOCK ? len - start : BLOCK;
        for (int i = 0; i < n; ++i) {
            const int64_t slot = slots[start + i];
            if ((uint64_t)slot >= (uint64_t)n_slots)
                return TA_BAD_SLOT;
            const char *krow = k_row + slot * k_row_bytes;
            vrows[i] = v_row + slot * v_row_bytes;
            if (kv8) { /* this position's scales; the one `ahead` on into L2 (top comment) */
                for (int j = 0; j < n_kv; ++j) {
                    ks[j * BLOCK + i] = ks_row[slot * scale_row_floats + j];
                    vs[j * BLOCK + i] = vs_row[slot * scale_row_floats + j];
                }
                if (start + i + ahead < len) {
                    const int64_t later = slots[start + i + ahead];
                    prefetch_position_l2(k_row + later * k_row_bytes, v_row + later * v_row_bytes,
                                         ks_row + later * scale_row_floats,
                                         vs_row + later * scale_row_floats, row_bytes);
                }
            } else {
                /* One row of each kind per step, so the fill buffers are never flooded: K for
                 * `ahead` positions later, V for this block's value step. Prefetch never
                 * faults, so the future slot needs no bounds check. */
                if (start + i + ahead < len)
                    prefetch_row(k_row + (int64_t)slots[start + i + ahead] * k_row_bytes, row_bytes);
                prefetch_row(vrows[i], row_bytes);
            }
#if HAVE_AVX512
            if (vector_path) {
                score_row_avx512(q, qf, krow, n_kv, G, part + i, D, bf16, kv8);
                continue;
            }
#endif
            score_row_scalar(qf, krow, n_kv, G, scale, ks + i, p + i, D, bf16, kv8);
        }
#if HAVE_AVX512
        if (vector_path) {
            reduce_scores_avx512(part, n, H, G, scale, ks, p, kv8);
            softmax_block_avx512(p, n, H, G, vs, m, l, acc, D, kv8);
            value_block_avx512(p, vrows, n, n_kv, G, acc, D, bf16, kv8);
            continue;
        }
#endif
        softmax_block_scalar(p, n, H, G, vs, m, l, acc, D, kv8);
        value_block_scalar(p, vrows, n, n_kv, G, acc, D, bf16, kv8);
    }

    for (int h = 0; h < H; ++h) {
        const float inv = 1.0f / l[h];
        for (int d = 0; d < D; ++d)
            store_elem(out, (int64_t)h * D + d, acc[h * D + d] * inv, bf16);
    }
    return TA_OK;
}

/*
 * attend_unit with D and dtypes as compile-time constants for the common head sizes. The switch
 * lives here, per work unit, because OpenMP outlines a parallel region before inlining:
 * constants passed into a function that contains the region would arrive there as variables.
 */
static int attend_unit_dispatch(const void *q, void *out, const char *k_row, const char *v_row,
                                int64_t k_row_bytes, int64_t v_row_bytes, const float *ks_row,
                                const float *vs_row, int64_t scale_row_floats,
                                const int32_t *slots, int len, int64_t n_slots, int n_kv, int G,
                                float scale, float *work, int D, int bf16, int kv8) {
#define ATTEND(D_, BF16_, KV8_)                                                                   \
    attend_unit(q, out, k_row, v_row, k_row_bytes, v_row_bytes, ks_row, vs_row,                 \
                scale_row_floats, slots, len, n_slots, n_kv, G, scale, work, D_, BF16_, KV8_)
#define BY_DIM(BF16_, KV8_)                                                                       \
    (D == 64 ? ATTEND(64, BF16_, KV8_) : D == 128 ? ATTEND(128, BF16_, KV8_) : ATTEND(D, BF16_, KV8_))
#if HAVE_VNNI
#define VNNI(D_, BF16_)                                                                           \
    attend_unit_vnni(q, out, k_row, v_row, k_row_bytes, v_row_bytes, ks_row, vs_row,            \
                     scale_row_floats, slots, len, n_slots, n_kv, G, scale, work, D_, BF16_)
    /* Only the common head sizes get the integer path, each with a compile-time D: every
     * instance of it costs ~1 s of compile time, on the serving machine's first start. */
    if (kv8 && (D == 64 || D == 128)) {
        if (bf16)
            return D == 64 ? VNNI(64, 1) : VNNI(128, 1);
        return D == 64 ? VNNI(64, 0) : VNNI(128, 0);
    }
#undef VNNI
    /* The VNNI path took D = 64 and 128: one instance with a run-time D serves the rest
     * (compile-time D instances here would only add compile time). */
    if (kv8)
        return bf16 ? ATTEND(D, 1, 1) : ATTEND(D, 0, 1);
#endif
    if (kv8)
        return bf16 ? BY_DIM(1, 1) : BY_DIM(0, 1);
    return bf16 ? BY_DIM(1, 0) : BY_DIM(0, 0);
#undef BY_DIM
#undef ATTEND
}

/* ---------------------------------------------------------------- entry point */

/*
 * Kv heads per work unit: the most (a divisor of n_kv_heads within the unit limits) that still
 * leaves 4 units per thread for dynamic scheduling to balance.
 */
static int kv_heads_per_unit(int64_t batch, int n_kv_heads, int G, int D, int esz, int n_threads) {
    for (int nh = n_kv_heads; nh > 1; --nh)
        if (n_kv_heads % nh == 0 && nh * G <= MAX_UNIT_HEADS && nh * D * esz <= MAX_UNIT_ROW_BYTES &&
            batch * (n_kv_heads / nh) >= 4 * (int64_t)n_threads)
            return nh;
    return 1;
}

/*
 * Called through ctypes. Strides are in elements; q/out are [B, Hq, D] and k/v [S, Hkv, D]
 * with the inner two dims contiguous; req_to_token is [n_req, max_len] with row stride
 * rtt_stride. k_scale/v_scale are NULL, or, for an int8 pool (k/v int8), fp32 [S, Hkv] with
 * row stride scale_stride. Returns a TA_* status; on failure `out` is partly unwritten.
 */
int token_decode_attention(const void *q, int64_t q_stride_b, const void *k, int64_t k_stride_s,
                           const void *v, int64_t v_stride_s, const float *k_scale,
                           const float *v_scale, int64_t scale_stride_s,
                           const int32_t *req_to_token, int64_t rtt_stride, int64_t n_req,
                           int64_t max_len, const int32_t *b_req_idx, const int32_t *b_seq_len,
                           int64_t batch, int64_t n_slots, int64_t n_q_heads, int64_t n_kv_heads,
                           int64_t head_dim, int32_t is_bf16, float scale, void *out,
                           int64_t out_stride_b, int32_t n_threads) {
    const int D = (int)head_dim;
    const int kv8 = k_scale != NULL;
    const int64_t esz = is_bf16 ? 2 : 4;    /* q and out */
    const int64_t kv_esz = kv8 ? 1 : esz;   /* the pool */
    int64_t rows = 0;
    for (int64_t b = 0; b < batch; ++b)
        rows += (b_seq_len[b] > 0 ? b_seq_len[b] : 0) * n_kv_heads;
    if (n_threads > 1 + rows / MIN_ROWS_PER_THREAD)
        n_threads = (int32_t)(1 + rows / MIN_ROWS_PER_THREAD);
    if (n_threads < 1)
        n_threads = 1;
    const int G = (int)(n_q_heads / n_kv_heads);
    const int n_kv = kv_heads_per_unit(batch, (int)n_kv_heads, G, D, (int)kv_esz, n_threads);
    const int64_t units_per_entry = n_kv_heads / n_kv;
    const int64_t n_units = batch * units_per_entry;
    const size_t work_bytes = (sizeof(float) * work_floats(n_kv * G, D) + 63) / 64 * 64;
    int status = TA_OK;

#pragma omp parallel num_threads(n_threads)
    {
        float *work = aligned_alloc(64, work_bytes);
        if (!work) {
#pragma omp atomic write
            status = TA_NO_MEMORY;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < n_units; ++unit) {
            int err;
#pragma omp atomic read
            err = status;
            if (err != TA_OK)
                continue; /* the call has failed: stop working early */
            const int64_t b = unit / units_per_entry;
            const int64_t kv0 = unit % units_per_entry * n_kv; /* first kv head of the unit */
            const int64_t r = b_req_idx[b], len = b_seq_len[b];
            if (r < 0 || r >= n_req)
                err = TA_BAD_REQ_IDX;
            else if (len < 1 || len > max_len)
                err = TA_BAD_SEQ_LEN;
            else
                err = attend_unit_dispatch(
                    (const char *)q + (b * q_stride_b + kv0 * G * D) * esz,
                    (char *)out + (b * out_stride_b + kv0 * G * D) * esz,
                    (const char *)k + kv0 * D * kv_esz, (const char *)v + kv0 * D * kv_esz,
                    k_stride_s * kv_esz, v_stride_s * kv_esz, kv8 ? k_scale + kv0 : NULL,
                    kv8 ? v_scale + kv0 : NULL, scale_stride_s, req_to_token + r * rtt_stride,
                    (int)len, n_slots, n_kv, G, scale, work, D, is_bf16, kv8);
            if (err != TA_OK) {
#pragma omp atomic write
                status = err;
            }
        }
        free(work);
    }
    return status;
}
