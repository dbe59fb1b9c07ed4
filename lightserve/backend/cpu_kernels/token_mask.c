/*
 * Structured output: set to -inf every logit a row's grammar does not allow next.
 *
 * The allowed tokens of row i come as a bit mask of `words` 32-bit words (bit b of word w is
 * token 32*w + b, 1 = allowed), as llguidance writes them. One pass over the mask: a word of
 * all ones (the common case inside JSON strings) costs one compare, a word of all zeros one
 * run of 32 stores; torch would unpack the bits into a [rows, vocab] tensor first and then
 * read it back.
 */
#include <math.h>
#include <stdint.h>

int apply_token_bitmask(float *logits, int64_t stride, const int64_t *rows, int64_t n_rows, const int32_t *bitmask,
                        int64_t words, int64_t vocab) {
    for (int64_t i = 0; i < n_rows; i++) {
        float *row = logits + rows[i] * stride;
        const uint32_t *mask = (const uint32_t *)(bitmask + i * words);
        for (int64_t w = 0; w < words; w++) {
            uint32_t m = mask[w];
            if (m == 0xFFFFFFFFu)
                continue;
            int64_t base = w * 32;
            int64_t end = base + 32 < vocab ? base + 32 : vocab;
            for (int64_t t = base; t < end; t++)
                if (!((m >> (t - base)) & 1u))
                    row[t] = -INFINITY;
        }
    }
    return 0;
}
