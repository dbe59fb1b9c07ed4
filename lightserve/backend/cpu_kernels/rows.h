/*
 * What the row-wise C kernels (layer_ops.c, int8_ops.c) share: fp32/bf16 element access with
 * torch's rounding, and how many OpenMP threads a call is worth. Static inline, so each
 * translation unit gets its own copy; build.py hashes this header with the sources.
 */
#ifndef LIGHTSERVE_ROWS_H
#define LIGHTSERVE_ROWS_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif

/* Elements a thread must get before another thread is worth waking (~20 us of work). */
#define MIN_ELEMS_PER_THREAD 65536

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does; NaN becomes the canonical quiet NaN 0x7FC0. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element i of a row of fp32 or bf16 values; `bf16` is a constant after inlining. */
static inline float load(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

static inline void store(void *row, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)row)[i] = f32_to_bf16(v);
    else
        ((float *)row)[i] = v;
}

static inline int threads_for(int64_t elems, int32_t n_threads) {
    int64_t useful = 1 + elems / MIN_ELEMS_PER_THREAD;
    if (n_threads > useful)
        n_threads = (int32_t)useful;
    return n_threads < 1 ? 1 : n_threads;
}

#if HAVE_AVX512
/* 16 elements at i, widened to fp32. */
static inline __m512 load16(const void *row, int64_t i, int bf16) {
    if (!bf16)
        return _mm512_loadu_ps((const float *)row + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* f32_to_bf16 of 16 lanes, the bf16 bits in the low half of each 32-bit lane. */
static inline __m512i bf16_bits16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}
#endif

#endif
