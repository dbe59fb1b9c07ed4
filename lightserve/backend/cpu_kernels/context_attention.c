/*
 * Prefill attention in bf16 with AVX512-BF16 dot products: causal attention of each request's
 * new tokens to themselves (no cached prefix), packed without padding, GQA.
 *
 * Why: torch's CPU flash attention runs at ~60 GFLOP/s on this work (head_dim 64, a few
 * hundred tokens), a sixth of what the same cores do in a bf16 matmul, and took 30% of a
 * prefill pass. Here both products use VDPBF16PS (two bf16 products summed into an fp32 lane).
 *
 * Layout: q [T, Hq, D], k/v [T, Hkv, D] with any row stride (views into the fused qkv output),
 * heads contiguous; out [T, Hq, D]. Request b owns tokens [start_b, start_b + len_b).
 *
 * First K and V are repacked once per (request, kv head) so that every product reads 64-byte
 * rows: Kp[p][key] holds the pair (k[key][2p], k[key][2p+1]) — sixteen keys per register, one
 * broadcast q pair against them — and Vp[key/2][d] holds (v[2j][d], v[2j+1][d]) — one
 * broadcast pair of probabilities against sixteen dims. Each request's keys are padded with
 * zeros to a multiple of BLOCK, so blocks never straddle requests.
 *
 * Then each work unit (request, kv head, QBLOCK query positions) walks its key blocks with an
 * online softmax per query row: scores in fp32, scaled, masked above the diagonal,
 * exponentiated, rescaled running max/sum, probabilities rounded to bf16 for the second
 * product (as torch's bf16 flash attention does), output divided by the sum and rounded once.
 * A unit's rows share its key blocks in L1.
 *
 * Without AVX512-BF16 the entry point returns CA_UNSUPPORTED and the caller uses torch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1
#else
#define HAVE_AVX512_BF16 0
#endif

#define CA_OK 0
#define CA_UNSUPPORTED 1 /* no AVX512-BF16 in this build, or a head_dim it does not take */
#define CA_NO_MEMORY 2

#define BLOCK 32  /* keys per online-softmax step: two registers of scores */
#define QBLOCK 16 /* query positions per work unit */
#define MAX_D 256 /* head_dim a multiple of 32 up to this (output row in <= 16 registers) */
#define MAX_GROUP 16 /* query heads per kv head */

int context_attention_supported(void) { return HAVE_AVX512_BF16; }

#if HAVE_AVX512_BF16

#define ALWAYS_INLINE static inline __attribute__((always_inline))

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* exp of 16 lanes (same method as exp_vec in layer_ops.c); -inf gives 0. */
ALWAYS_INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33f)); /* masked scores are -inf: exp underflows to ~0 */
    __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.0f));
    __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(12582912.0f));
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t),
                                                                     _mm512_set1_epi32(0x4b400000)),
                                                   _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* Round fp32 lanes to bf16 (nearest even) and store 16 of them. */
ALWAYS_INLINE void store_bf16(uint16_t *dst, __m512 v) { _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(v)); }

/*
 * R query rows (of one kv head) against their keys: row r attends to keys [0, qpos[r]]. Kp/Vp
 * are this request's packed keys for the kv head, q[r] a row's D bf16 values, out[r] its D
 * outputs. R rows at once keep 2R (scores) and R*D/16 (outputs) independent dot-product
 * chains in flight: one row alone waits on VDPBF16PS latency rather than its throughput.
 */
ALWAYS_INLINE void attend_rows(const uint32_t *const *q, const int64_t *qpos, uint16_t *const *out,
                               const uint32_t *Kp, int64_t kp_stride, const uint32_t *Vp, float scale, const int R,
                               const int D) {
    __m512 o[R][MAX_D / 16];
    float m[R], l[R];
    int64_t last = 0;
    for (int r = 0; r < R; r++) {
        for (int c = 0; c < D / 16; c++)
            o[r][c] = _mm512_setzero_ps();
        m[r] = -INFINITY;
        l[r] = 0.0f;
        last = qpos[r] > last ? qpos[r] : last;
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t k0 = 0; k0 <= last; k0 += BLOCK) {
        __m512 s[R][2];
        for (int r = 0; r < R; r++)
            s[r][0] = s[r][1] = _mm512_setzero_ps();
        for (int p = 0; p < D / 2; p++) {
            const uint32_t *kp = Kp + p * kp_stride + k0;
            __m512bh k_lo = (__m512bh)_mm512_loadu_si512(kp), k_hi = (__m512bh)_mm512_loadu_si512(kp + 16);
            for (int r = 0; r < R; r++) {
                __m512bh qp = (__m512bh)_mm512_set1_epi32((int)q[r][p]);
                s[r][0] = _mm512_dpbf16_ps(s[r][0], qp, k_lo);
                s[r][1] = _mm512_dpbf16_ps(s[r][1], qp, k_hi);
            }
        }
        __m512i key0 = _mm512_add_epi32(lane, _mm512_set1_epi32((int)k0));
        __m512i key1 = _mm512_add_epi32(key0, _mm512_set1_epi32(16));
        uint32_t pp[R][BLOCK / 2];
        for (int r = 0; r < R; r++) {
            /* Causal mask: keys after qpos[r] (incl. the zero padding) do not count. */
            __m512i limit = _mm512_set1_epi32((int)qpos[r]);
            __mmask16 late0 = _mm512_cmpgt_epi32_mask(key0, limit), late1 = _mm512_cmpgt_epi32_mask(key1, limit);
            __m512 s0 = _mm512_mask_mov_ps(_mm512_mul_ps(s[r][0], _mm512_set1_ps(scale)), late0, _mm512_set1_ps(-INFINITY));
            __m512 s1 = _mm512_mask_mov_ps(_mm512_mul_ps(s[r][1], _mm512_set1_ps(scale)), late1, _mm512_set1_ps(-INFINITY));
            float m_new = fmaxf(m[r], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
            if (m_new == -INFINITY) { /* every key of this block is after qpos[r] */
                memset(pp[r], 0, sizeof pp[r]);
                continue;
            }
            __m512 mv = _mm512_set1_ps(m_new);
            __m512 p0 = _mm512_maskz_mov_ps((__mmask16)~late0, exp16(_mm512_sub_ps(s0, mv)));
            __m512 p1 = _mm512_maskz_mov_ps((__mmask16)~late1, exp16(_mm512_sub_ps(s1, mv)));
            float alpha = expf(m[r] - m_new); /* 0 on the first block (m = -inf) */
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            m[r] = m_new;
            __m512 av = _mm512_set1_ps(alpha);
            for (int c = 0; c < D / 16; c++)
                o[r][c] = _mm512_mul_ps(o[r][c], av);
            /* Probabilities as bf16 pairs (keys 2j, 2j+1), one 32-bit word per pair. */
            _mm512_storeu_si512(pp[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        int64_t pairs = (last - k0) / 2 + 1;
        if (pairs > BLOCK / 2)
            pairs = BLOCK / 2;
        const uint32_t *vp = Vp + (k0 / 2) * D;
        for (int64_t j = 0; j < pairs; j++) {
            for (int c = 0; c < D / 16; c++) {
                __m512bh vj = (__m512bh)_mm512_loadu_si512(vp + j * D + c * 16);
                for (int r = 0; r < R; r++)
                    o[r][c] = _mm512_dpbf16_ps(o[r][c], (__m512bh)_mm512_set1_epi32((int)pp[r][j]), vj);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int c = 0; c < D / 16; c++)
            store_bf16(out[r] + c * 16, _mm512_mul_ps(o[r][c], inv));
    }
}

/* Rows per call: as many as keep the output accumulators in the 32 vector registers. */
#define ROWS_64 4
#define ROWS_128 2

static void attend_rows_any(const uint32_t *const *q, const int64_t *qpos, uint16_t *const *out, int n,
                            const uint32_t *Kp, int64_t kp_stride, const uint32_t *Vp, float scale, int D) {
    int i = 0;
    if (D == 64)
        for (; i + ROWS_64 <= n; i += ROWS_64)
            attend_rows(q + i, qpos + i, out + i, Kp, kp_stride, Vp, scale, ROWS_64, 64);
    else if (D == 128)
        for (; i + ROWS_128 <= n; i += ROWS_128)
            attend_rows(q + i, qpos + i, out + i, Kp, kp_stride, Vp, scale, ROWS_128, 128);
    for (; i < n; i++)
        attend_rows(q + i, qpos + i, out + i, Kp, kp_stride, Vp, scale, 1, D);
}

#endif /* HAVE_AVX512_BF16 */

/*
 * q/k/v/out strides are per token, in elements; b_start/b_len int64 [batch].
 * Returns CA_OK, CA_UNSUPPORTED or CA_NO_MEMORY (nothing written to out on failure).
 */
int context_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k, int64_t k_stride, const uint16_t *v,
                      int64_t v_stride, uint16_t *out, int64_t out_stride, const int64_t *b_start,
                      const int64_t *b_len, int64_t batch, int64_t n_q_heads, int64_t n_kv_heads, int64_t D,
                      float scale, int32_t n_threads) {
#if !HAVE_AVX512_BF16
    (void)q; (void)q_stride; (void)k; (void)k_stride; (void)v; (void)v_stride; (void)out; (void)out_stride;
    (void)b_start; (void)b_len; (void)batch; (void)n_q_heads; (void)n_kv_heads; (void)D; (void)scale;
    (void)n_threads;
    return CA_UNSUPPORTED;
#else
    if (D % 32 || D > MAX_D || n_kv_heads <= 0 || n_q_heads % n_kv_heads || n_q_heads / n_kv_heads > MAX_GROUP)
        return CA_UNSUPPORTED;
    const int64_t G = n_q_heads / n_kv_heads;
    /* Per request: offset of its padded keys in the packed buffers, and its first work unit. */
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(2 * batch + 2));
    if (!off)
        return CA_NO_MEMORY;
    int64_t *first_unit = off + batch + 1;
    off[0] = 0;
    first_unit[0] = 0;
    for (int64_t b = 0; b < batch; b++) {
        off[b + 1] = off[b] + round_up(b_len[b], BLOCK);
        first_unit[b + 1] = first_unit[b] + (b_len[b] + QBLOCK - 1) / QBLOCK * n_kv_heads;
    }
    const int64_t padded = off[batch], units = first_unit[batch];
    /* Kp: [Hkv][D/2][padded] words; Vp: [Hkv][padded/2][D] words. */
    uint32_t *Kp = calloc((size_t)(n_kv_heads * padded * D / 2), sizeof(uint32_t));
    uint32_t *Vp = calloc((size_t)(n_kv_heads * padded * D / 2), sizeof(uint32_t));
    if (!Kp || !Vp) {
        free(Kp);
        free(Vp);
        free(off);
        return CA_NO_MEMORY;
    }
    if (n_threads < 1)
        n_threads = 1;
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * n_kv_heads; bh++) {
            const int64_t b = bh / n_kv_heads, h = bh % n_kv_heads;
            uint32_t *kp = Kp + h * (D / 2) * padded + off[b];
            uint32_t *vp = Vp + h * (padded / 2) * D + (off[b] / 2) * D;
            for (int64_t t = 0; t < b_len[b]; t++) {
                const uint32_t *krow = (const uint32_t *)(k + (b_start[b] + t) * k_stride + h * D);
                for (int64_t p = 0; p < D / 2; p++)
                    kp[p * padded + t] = krow[p];
                const uint16_t *vrow = v + (b_start[b] + t) * v_stride + h * D;
                uint16_t *pair = (uint16_t *)(vp + (t / 2) * D) + (t & 1);
                for (int64_t d = 0; d < D; d++)
                    pair[2 * d] = vrow[d];
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = units - 1; u >= 0; u--) { /* the last (longest) query blocks first */
            int64_t b = 0;
            while (first_unit[b + 1] <= u)
                b++;
            const int64_t local = u - first_unit[b], h = local % n_kv_heads, q0 = local / n_kv_heads * QBLOCK;
            const int64_t q1 = q0 + QBLOCK < b_len[b] ? q0 + QBLOCK : b_len[b];
            const uint32_t *kp = Kp + h * (D / 2) * padded + off[b];
            const uint32_t *vp = Vp + h * (padded / 2) * D + (off[b] / 2) * D;
            const uint32_t *rows_q[QBLOCK * MAX_GROUP];
            int64_t rows_pos[QBLOCK * MAX_GROUP];
            uint16_t *rows_out[QBLOCK * MAX_GROUP];
            int n = 0;
            for (int64_t qpos = q0; qpos < q1; qpos++)
                for (int64_t g = 0; g < G; g++, n++) {
                    const int64_t head = h * G + g, t = b_start[b] + qpos;
                    rows_q[n] = (const uint32_t *)(q + t * q_stride + head * D);
                    rows_pos[n] = qpos;
                    rows_out[n] = out + t * out_stride + head * D;
                }
            attend_rows_any(rows_q, rows_pos, rows_out, n, kp, padded, vp, scale, (int)D);
        }
    }
    free(Kp);
    free(Vp);
    free(off);
    return CA_OK;
#endif
}
