/* Products of float activations with low-bit weights, for glassformer.quantized (loaded with ctypes).

   A weight matrix (N, K) is stored row by row in groups of `group` columns along K (a multiple of 32);
   column k of row n is  q[n, k] * scale[n, g] + min[n, g]  with g = k / group. bf16 keeps the top half
   of each float32 (scale 1, min 0); int8 keeps one signed byte per weight; int4 packs each block of 32
   columns into 16 bytes, byte i holding column i in its low nibble and column i + 16 in its high
   nibble (the order of llama.cpp's Q4_0/Q4_1 blocks). float32 (bits 32) has no scale or min (NULL):
   the fused decode step (decode_block.c) runs a float model's products here too.

   y (M, N) = x (M, K) @ W.T (+ bias): the sum of each group is taken on float activations first and
   scaled once, so  y = sum_g scale_g * (x_g . q_g) + min_g * sum(x_g). One row of x is run against
   four rows of W at a time (decoding); more rows of x are taken four or eight at a time, so each group
   of weights is decoded once per four or eight rows. Threads split the rows of W.
   Compiled on the machine that runs it (-march=native); without AVX-512 the plain loops are used. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MR 8 /* the most rows of x per pass over a row of W */

/* sums[m * G + g] = sum of x[m] over group g */
static void group_sums(const float *x, int M, int K, int group, float *sums) {
    int G = K / group;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            const float *xg = x + (int64_t)m * K + (int64_t)g * group;
            for (int k = 0; k < group; k++) s += xg[k];
            sums[m * G + g] = s;
        }
}

#ifdef __AVX512F__
/* 32 weights of a block as two vectors of 16 floats (columns 0-15, 16-31). */
static inline void load_int4(const uint8_t *q, __m512 *lo, __m512 *hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

static inline void load_bf16(const uint16_t *q, __m512 *lo, __m512 *hi) {
    __m512i a = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)q)), 16);
    __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(q + 16))), 16);
    *lo = _mm512_castsi512_ps(a);
    *hi = _mm512_castsi512_ps(b);
}

static inline void load_f32(const float *q, __m512 *lo, __m512 *hi) {
    *lo = _mm512_loadu_ps(q);
    *hi = _mm512_loadu_ps(q + 16);
}

static inline void load_int8(const int8_t *q, __m512 *lo, __m512 *hi) {
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
}
#endif

/* One weight of a row as a float (before its group's scale and min). */
static inline float weight_at(int bits, const void *qrow, int k) {
    if (bits == 32) return ((const float *)qrow)[k];
    if (bits == 16) {
        uint32_t u = (uint32_t)((const uint16_t *)qrow)[k] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (bits == 8) return (float)((const int8_t *)qrow)[k];
    uint8_t byte = ((const uint8_t *)qrow)[(k / 32) * 16 + (k % 32) % 16];
    return (float)((k % 32) < 16 ? byte & 15 : byte >> 4);
}

/* out[j][r] = row j of W . x_r, for NR rows of W (qrows, sc, mn: one pointer each) and MR rows x_r.
   Inlined with constant bits, NR and MR, so every combination compiles to its own loop whose
   accumulators stay in registers: NR x MR x 2 independent FMA chains. */
static inline __attribute__((always_inline)) void dots(int bits, int NR, int MR_, const void *const *qrows,
                                                       const float *const *sc, const float *const *mn, int K,
                                                       int group, const float *const *xs,
                                                       const float *const *sums, float out[][MR]) {
    int G = K / group;
#ifdef __AVX512F__
    __m512 total[4][MR];
    for (int j = 0; j < NR; j++)
        for (int r = 0; r < MR_; r++) total[j][r] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512 lo_acc[4][MR], hi_acc[4][MR];
        for (int j = 0; j < NR; j++)
            for (int r = 0; r < MR_; r++) lo_acc[j][r] = hi_acc[j][r] = _mm512_setzero_ps();
        for (int b = 0; b < group; b += 32) {
            int k = g * group + b;
            for (int j = 0; j < NR; j++) {
                __m512 lo, hi;
                if (bits == 4)
                    load_int4((const uint8_t *)qrows[j] + k / 2, &lo, &hi);
                else if (bits == 8)
                    load_int8((const int8_t *)qrows[j] + k, &lo, &hi);
                else if (bits == 16)
                    load_bf16((const uint16_t *)qrows[j] + k, &lo, &hi);
                else
                    load_f32((const float *)qrows[j] + k, &lo, &hi);
                for (int r = 0; r < MR_; r++) {
                    lo_acc[j][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xs[r] + k), lo_acc[j][r]);
                    hi_acc[j][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xs[r] + k + 16), hi_acc[j][r]);
                }
            }
        }
        for (int j = 0; j < NR; j++) {
            __m512 s = _mm512_set1_ps(bits == 32 ? 1.f : sc[j][g]);
            for (int r = 0; r < MR_; r++)
                total[j][r] = _mm512_fmadd_ps(_mm512_add_ps(lo_acc[j][r], hi_acc[j][r]), s, total[j][r]);
        }
    }
    for (int j = 0; j < NR; j++)
        for (int r = 0; r < MR_; r++) {
            float m = 0.f;
            if (bits != 32)
                for (int g = 0; g < G; g++) m += mn[j][g] * sums[r][g];
            out[j][r] = _mm512_reduce_add_ps(total[j][r]) + m;
        }
#else
    for (int j = 0; j < NR; j++)
        for (int r = 0; r < MR_; r++) {
            float total = 0.f;
            for (int g = 0; g < G; g++) {
                float acc = 0.f;
                for (int i = 0; i < group; i++) {
                    int k = g * group + i;
                    acc += weight_at(bits, qrows[j], k) * xs[r][k];
                }
                total += bits == 32 ? acc : sc[j][g] * acc + mn[j][g] * sums[r][g];
            }
            out[j][r] = total;
        }
#endif
}

/* The specialised loops: one row of x against four rows of W, or four (eight) rows of x against one. */
#define DOTS(BITS)                                                                                       \
    static void dots_##BITS##_1(const void *const *q, const float *const *sc, const float *const *mn, int K,   \
                                int group, const float *const *xs, const float *const *sums, float out[][MR]) { \
        dots(BITS, 4, 1, q, sc, mn, K, group, xs, sums, out);                                           \
    }                                                                                                    \
    static void dots_##BITS##_4(const void *const *q, const float *const *sc, const float *const *mn, int K,   \
                                int group, const float *const *xs, const float *const *sums, float out[][MR]) { \
        dots(BITS, 1, 4, q, sc, mn, K, group, xs, sums, out);                                           \
    }                                                                                                    \
    static void dots_##BITS##_8(const void *const *q, const float *const *sc, const float *const *mn, int K,   \
                                int group, const float *const *xs, const float *const *sums, float out[][MR]) { \
        dots(BITS, 1, 8, q, sc, mn, K, group, xs, sums, out);                                           \
    }
DOTS(4)
DOTS(8)
DOTS(16)
DOTS(32)

typedef void (*dots_fn)(const void *const *, const float *const *, const float *const *, int, int,
                        const float *const *, const float *const *, float[][MR]);

/* y (M, N) = x (M, K) @ W.T + bias (bias may be NULL); float32 weights (bits 32) take one group of K. */
void gf_quant_matmul(int bits, const float *x, int M, int K, const void *q, const float *scale,
                     const float *min, int N, int group, const float *bias, float *y, int threads) {
    int G = K / group;
    int64_t row_bytes = (int64_t)K * bits / 8;
    int mr = M == 1 ? 1 : M < 8 ? 4 : 8, nr = M == 1 ? 4 : 1;
    dots_fn table[4][3] = {{dots_4_1, dots_4_4, dots_4_8}, {dots_8_1, dots_8_4, dots_8_8},
                           {dots_16_1, dots_16_4, dots_16_8}, {dots_32_1, dots_32_4, dots_32_8}};
    dots_fn fn = table[bits == 4 ? 0 : bits == 8 ? 1 : bits == 16 ? 2 : 3][mr == 1 ? 0 : mr == 4 ? 1 : 2];
    float *work = malloc(sizeof(float) * (size_t)M * G); /* each row's sum over each group */
    if (!work) return;
    if (bits != 32) group_sums(x, M, K, group, work);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n0 = 0; n0 < N; n0 += nr) {
        const void *qrows[4];
        const float *sc[4], *mn[4];
        for (int j = 0; j < nr; j++) {
            int n = n0 + j < N ? n0 + j : N - 1; /* past the last row of W: repeat it, discard below */
            qrows[j] = (const uint8_t *)q + (int64_t)n * row_bytes;
            sc[j] = bits == 32 ? NULL : scale + (int64_t)n * G;
            mn[j] = bits == 32 ? NULL : min + (int64_t)n * G;
        }
        for (int m0 = 0; m0 < M; m0 += mr) {
            const float *xs[MR], *sums[MR];
            float out[4][MR];
            for (int r = 0; r < mr; r++) {
                int m = m0 + r < M ? m0 + r : M - 1; /* past the last row of x: likewise */
                xs[r] = x + (int64_t)m * K;
                sums[r] = work + (int64_t)m * G;
            }
            fn(qrows, sc, mn, K, group, xs, sums, out);
            for (int j = 0; j < nr && n0 + j < N; j++)
                for (int r = 0; r < mr && m0 + r < M; r++)
                    y[(int64_t)(m0 + r) * N + n0 + j] = out[j][r] + (bias ? bias[n0 + j] : 0.f);
        }
    }
    free(work);
}

/* W (N, K) as floats, for products with many rows (where a float GEMM beats row dots). */
void gf_dequantize(int bits, const void *q, const float *scale, const float *min, int N, int K, int group,
                   float *w, int threads) {
    int G = K / group;
    int64_t row_bytes = (int64_t)K * bits / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t *qrow = (const uint8_t *)q + (int64_t)n * row_bytes;
        float *wrow = w + (int64_t)n * K;
        for (int k = 0; k < K; k += 32) {
            float s = scale[(int64_t)n * G + k / group], m = min[(int64_t)n * G + k / group];
#ifdef __AVX512F__
            __m512 lo, hi;
            if (bits == 4)
                load_int4(qrow + k / 2, &lo, &hi);
            else if (bits == 8)
                load_int8((const int8_t *)qrow + k, &lo, &hi);
            else
                load_bf16((const uint16_t *)qrow + k, &lo, &hi);
            _mm512_storeu_ps(wrow + k, _mm512_fmadd_ps(lo, _mm512_set1_ps(s), _mm512_set1_ps(m)));
            _mm512_storeu_ps(wrow + k + 16, _mm512_fmadd_ps(hi, _mm512_set1_ps(s), _mm512_set1_ps(m)));
#else
            for (int i = 0; i < 32; i++) wrow[k + i] = weight_at(bits, qrow, k + i) * s + m;
#endif
        }
    }
}
