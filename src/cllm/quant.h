/* Int8 (Q8), bfloat16 and float32 weight matrices stored rows by output, for generation
 * (inference only): every matrix of a quantized model, and a float32 model's output head.
 *
 * Generating a token reads every weight of the model once, so its speed is the rate at which
 * the weights stream from memory: 1.125 bytes a weight in Q8 (an int8, and a float32 scale per
 * 32 weights), 2 in bf16, against 4 in float32.
 *
 * A matrix is stored by output row, W (OC, IC): y[m, o] = bias[o] + sum_i x[m, i] W[o, i], so
 * that each output is a dot product along one contiguous row.
 *
 * Q8: blocks of CLLM_QK = 32 along IC, K = IC rounded up to a multiple of 32 (zero padding);
 * q int8 (OC, K), scale float32 (OC, K / 32). The activations are quantized by the same
 * function, so the product of two blocks is an exact int32 dot product times the two scales.
 * bf16: uint16 (OC, IC), the top half of a float32 rounded to nearest even; the activations
 * stay float32.
 *
 * Determinism: an output element is computed whole by one call, in 8 float lanes accumulated in
 * order (over the blocks, or the elements i = lane mod 8) and then added in a fixed tree, so it
 * depends on its inputs alone: never on the thread, the output range or the activation rows of
 * the call. The vector paths (VNNI, AVX2) and the plain C path compute the same lanes with the
 * same roundings (the integer sums are exact; fmaf rounds once like a vector FMA), so every
 * path gives the same bits. Inputs are finite (a model's weights and activations). */
#ifndef CLLM_QUANT_H
#define CLLM_QUANT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define CLLM_QK 32

/* Output rows computed together: they share each load of the activations, and their
 * accumulators are independent chains of FMAs, which hides the FMA latency. */
#define CLLM_ROWS 4

/* Output rows run over every activation row before the next ones (see cllm_matmul_rows): for
 * IC = 1536, 24 KB of Q8 or 48 KB of bf16, which stay in L1 or L2. */
#define CLLM_TILE 16

/* Register allocation decides the speed of the inner loops: the row primitives are always
 * inlined, so that R is a constant and the accumulators stay in registers, and each product is
 * a function of its own, never inlined, so that its loops are allocated apart from the caller's
 * (inlined into a large OpenMP region, they spilled and ran at half speed). */
#if defined(__GNUC__)
#define CLLM_INLINE static inline __attribute__((always_inline))
#define CLLM_NOINLINE static __attribute__((noinline, unused))
#else
#define CLLM_INLINE static inline
#define CLLM_NOINLINE static inline
#endif

static inline float cllm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- the primitives of each path: 8 float lanes (cllm_f8) and what accumulates into them ---- */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* The 256-bit VNNI instruction even with AVX-512: a block of 32 int8 is one 256-bit register,
 * and the same 8 lanes as the AVX2 and C paths keep the bits the same. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CLLM_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define CLLM_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

typedef __m256 cllm_f8;

static inline cllm_f8 cllm_f8_zero(void) { return _mm256_setzero_ps(); }

/* acc + d * s, lane j of s = sum over k < 4 of w[4j + k] x[4j + k]. The unsigned-by-signed
 * instructions take |x| and w with the sign of x (the product is unchanged, 0 where x is 0):
 * |x| is the same for every weight row of a group, so it is computed once for them (the
 * compiler merges the copies of the unrolled rows). maddubs adds pairs in int16 with
 * saturation: q in [-127, 127] bounds a pair by 2 * 127^2 = 32258, which fits, so the sums
 * stay exact. */
CLLM_INLINE cllm_f8 cllm_q8_block(cllm_f8 acc, float d, const int8_t *w, const int8_t *x) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    __m256i ax = _mm256_sign_epi8(xv, xv);
    __m256i sw = _mm256_sign_epi8(wv, xv);
#ifdef CLLM_DPBUSD
    __m256i s = CLLM_DPBUSD(_mm256_setzero_si256(), ax, sw);
#else
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
#endif
    return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
}

/* acc + x[0:8] * float(w[0:8]): a bf16 is the top half of its float32. */
CLLM_INLINE cllm_f8 cllm_bf16_block(cllm_f8 acc, const float *x, const uint16_t *w) {
    __m256i wi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(wi, 16));
    return _mm256_fmadd_ps(_mm256_loadu_ps(x), wf, acc);
}

/* acc + x[0:8] * w[0:8] */
CLLM_INLINE cllm_f8 cllm_f32_block(cllm_f8 acc, const float *x, const float *w) {
    return _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(w), acc);
}

/* out[r] = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) of a[r], for 4 rows at once. */
CLLM_INLINE void cllm_f8_sum4(float out[4], const cllm_f8 a[4]) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

#else  /* plain C: the same lanes, sums and roundings as the vector path */

typedef struct { float l[8]; } cllm_f8;

static inline cllm_f8 cllm_f8_zero(void) {
    cllm_f8 z = {{0.0f}};
    return z;
}

CLLM_INLINE cllm_f8 cllm_q8_block(cllm_f8 acc, float d, const int8_t *w, const int8_t *x) {
    for (int j = 0; j < 8; j++) {
        int32_t s = 0;
        for (int k = 4 * j; k < 4 * j + 4; k++) s += (int32_t)w[k] * x[k];
        acc.l[j] = fmaf(d, (float)s, acc.l[j]);
    }
    return acc;
}

CLLM_INLINE cllm_f8 cllm_bf16_block(cllm_f8 acc, const float *x, const uint16_t *w) {
    for (int j = 0; j < 8; j++) acc.l[j] = fmaf(x[j], cllm_bf16_to_f32(w[j]), acc.l[j]);
    return acc;
}

CLLM_INLINE cllm_f8 cllm_f32_block(cllm_f8 acc, const float *x, const float *w) {
    for (int j = 0; j < 8; j++) acc.l[j] = fmaf(x[j], w[j], acc.l[j]);
    return acc;
}

CLLM_INLINE void cllm_f8_sum4(float out[4], const cllm_f8 a[4]) {
    for (int r = 0; r < 4; r++) {
        const float *l = a[r].l;
        out[r] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
}

#endif

/* ---- the products ---- */

/* y[r * step] = the lanes of acc[r] summed, plus bias[r * step], for r < R */
CLLM_INLINE void cllm_store_rows(float *y, const float *bias, long step, const cllm_f8 acc[4],
                                 int R) {
    float s[4];
    cllm_f8_sum4(s, acc);
    for (int r = 0; r < R; r++) y[r * step] = s[r] + (bias ? bias[r * step] : 0.0f);
}

/* y[r * step] for the weight rows r * step, r < R, and one activation row. R <= CLLM_ROWS is
 * a constant at each call, so that the loops over r unroll and acc stays in registers. */
CLLM_INLINE void cllm_q8_rows(float *y, const float *bias, long step, const int8_t *xq,
                              const float *xs, const int8_t *wq, const float *ws, int nb, int R) {
    cllm_f8 acc[CLLM_ROWS];
    for (int r = 0; r < CLLM_ROWS; r++) acc[r] = cllm_f8_zero();
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < R; r++)
            acc[r] = cllm_q8_block(acc[r], ws[r * step * nb + b] * xs[b],
                                   wq + (r * step * nb + b) * CLLM_QK, xq + b * CLLM_QK);
    cllm_store_rows(y, bias, step, acc, R);
}

/* The same for bf16 rows (wb) or float32 rows (wf, when not NULL) of IC elements. The last
 * IC mod 8 go through zero-padded copies, whose products add +0 to the lanes, the same on
 * every path. */
CLLM_INLINE void cllm_float_rows(float *y, const float *bias, long step, const float *x,
                                 const uint16_t *wb, const float *wf, int IC, int R) {
    cllm_f8 acc[CLLM_ROWS];
    for (int r = 0; r < CLLM_ROWS; r++) acc[r] = cllm_f8_zero();
    int i = 0;
    for (; i + 8 <= IC; i += 8)
        for (int r = 0; r < R; r++)
            acc[r] = wf ? cllm_f32_block(acc[r], x + i, wf + r * step * IC + i)
                        : cllm_bf16_block(acc[r], x + i, wb + r * step * IC + i);
    if (i < IC) {
        float xt[8] = {0.0f};
        memcpy(xt, x + i, (IC - i) * sizeof(float));
        for (int r = 0; r < R; r++) {
            uint16_t bt[8] = {0};
            float ft[8] = {0.0f};
            if (wf) {
                memcpy(ft, wf + r * step * IC + i, (IC - i) * sizeof(float));
                acc[r] = cllm_f32_block(acc[r], xt, ft);
            } else {
                memcpy(bt, wb + r * step * IC + i, (IC - i) * sizeof(uint16_t));
                acc[r] = cllm_bf16_block(acc[r], xt, bt);
            }
        }
    }
    cllm_store_rows(y, bias, step, acc, R);
}

/* The operands of a product: Q8 weights and activations when q8 is set, else bf16 weights (w)
 * or float32 ones (wf) and float32 activations. */
typedef struct {
    int q8;
    const int8_t *wq, *xq;
    const float *ws, *xs;
    int K;
    const uint16_t *w;
    const float *wf;
    const float *x;
    int IC;
} cllm_operands;

/* y[m, o + r step], r < R */
CLLM_INLINE void cllm_group(const cllm_operands *p, float *y, long ldy, const float *bias,
                            long step, int m, int o, int R) {
    float *ym = y + m * ldy + o;
    const float *b = bias ? bias + o : NULL;
    if (p->q8) {
        int nb = p->K / CLLM_QK;
        cllm_q8_rows(ym, b, step, p->xq + (long)m * p->K, p->xs + (long)m * nb,
                     p->wq + (long)o * p->K, p->ws + (long)o * nb, nb, R);
    } else {
        cllm_float_rows(ym, b, step, p->x + (long)m * p->IC,
                        p->w ? p->w + (long)o * p->IC : NULL,
                        p->wf ? p->wf + (long)o * p->IC : NULL, p->IC, R);
    }
}

/* The loop nest of both products, over the output rows [o0, o1) and the activation rows
 * [0, M). The rows are cut into CLLM_ROWS slices of S rows, and a group of rows computed
 * together takes the same row of each slice: the weights are then read as CLLM_ROWS streams far
 * apart, each with its own hardware prefetcher, which draws more from memory than one stream
 * (12-16 GB/s against 8-9 on one core of the AMD EPYC it was measured on, where software
 * prefetching added nothing). A tile of CLLM_TILE rows is run over every activation row before
 * the next tile: it stays in L1/L2 while the activations stream, so a large M reads the weights
 * from memory once, and M = 1 is a plain sweep of the slices. */
CLLM_INLINE void cllm_matmul_rows(const cllm_operands *p, float *y, long ldy, const float *bias,
                                  int M, int o0, int o1) {
    const int steps = CLLM_TILE / CLLM_ROWS;           /* groups in a tile */
    int S = (o1 - o0 + CLLM_ROWS - 1) / CLLM_ROWS;
    int full = o1 - o0 - (CLLM_ROWS - 1) * S;          /* the steps with a row in every slice */
    for (int k0 = 0; k0 < S; k0 += steps) {
        int k1 = k0 + steps < S ? k0 + steps : S;
        for (int m = 0; m < M; m++)
            for (int k = k0; k < k1; k++) {
                if (k < full)
                    cllm_group(p, y, ldy, bias, S, m, o0 + k, CLLM_ROWS);
                else
                    for (int o = o0 + k; o < o1; o += S) cllm_group(p, y, ldy, bias, S, m, o, 1);
            }
    }
}

/* y[m * ldy + o] = bias[o] + sum over blocks b of (ws[o, b] xs[m, b]) * (int32 dot product of
 * block b of rows o of wq and m of xq), for o in [o0, o1) and m in [0, M); bias may be NULL. */
CLLM_NOINLINE void cllm_q8_matmul(float *y, long ldy, const float *bias, const int8_t *xq,
                                  const float *xs, int M, const int8_t *wq, const float *ws,
                                  int K, int o0, int o1) {
    cllm_operands p = {1, wq, xq, ws, xs, K, NULL, NULL, NULL, 0};
    cllm_matmul_rows(&p, y, ldy, bias, M, o0, o1);
}

/* y[m * ldy + o] = bias[o] + sum_i x[m, i] * float(w[o, i]), o in [o0, o1), m in [0, M) */
CLLM_NOINLINE void cllm_bf16_matmul(float *y, long ldy, const float *bias, const float *x,
                                    int M, int IC, const uint16_t *w, int o0, int o1) {
    cllm_operands p = {0, NULL, NULL, NULL, NULL, 0, w, NULL, x, IC};
    cllm_matmul_rows(&p, y, ldy, bias, M, o0, o1);
}

/* The same with float32 weights w (OC, IC): the output head, (V, C) rows by output as it is
 * stored, read without a transposed copy. */
CLLM_NOINLINE void cllm_f32_matmul(float *y, long ldy, const float *bias, const float *x,
                                   int M, int IC, const float *w, int o0, int o1) {
    cllm_operands p = {0, NULL, NULL, NULL, NULL, 0, NULL, w, x, IC};
    cllm_matmul_rows(&p, y, ldy, bias, M, o0, o1);
}

/* ---- conversions ---- */

/* Plain comparisons, as in vecmath.h; the order makes a NaN 127 rather than undefined. */
static inline float cllm_q8_clamp(float v) {
    v = v < 127.0f ? v : 127.0f;
    return v > -127.0f ? v : -127.0f;
}

/* x (M, IC) -> q (M, K), scale (M, K / 32), K = IC rounded up to 32: per block, scale =
 * amax / 127 and q = x / scale rounded to nearest even (nearbyintf in the default rounding
 * mode), so that +-amax becomes +-127. A true division, not a product by 1 / scale: each q is
 * then exactly specified by IEEE arithmetic. A block whose scale is 0 (all zero) has q = 0.
 * One plain C path for weights and activations alike (it costs O(M IC), next to the O(M IC OC)
 * product), so that a quantized matrix is the same on every machine. */
static inline void cllm_q8_quantize_rows(int8_t *q, float *scale, const float *x, int M, int IC,
                                         int K) {
    int nb = K / CLLM_QK;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            float v[CLLM_QK] = {0.0f};
            int n = IC - b * CLLM_QK;
            n = n < 0 ? 0 : n > CLLM_QK ? CLLM_QK : n;
            memcpy(v, x + (long)m * IC + b * CLLM_QK, n * sizeof(float));
            float amax = 0.0f;
            #pragma omp simd reduction(max:amax)
            for (int i = 0; i < CLLM_QK; i++) amax = amax > fabsf(v[i]) ? amax : fabsf(v[i]);
            float s = amax / 127.0f;
            int8_t *qb = q + (long)m * K + b * CLLM_QK;
            scale[(long)m * nb + b] = s;
            #pragma omp simd
            for (int i = 0; i < CLLM_QK; i++)
                qb[i] = (int8_t)(s != 0.0f ? cllm_q8_clamp(nearbyintf(v[i] / s)) : 0.0f);
        }
    }
}

/* One row (IC values) back to float32: the embedding of a token from a Q8 table. */
static inline void cllm_q8_dequantize_row(float *out, const int8_t *q, const float *scale, int IC) {
    for (int b = 0; b * CLLM_QK < IC; b++) {
        int n = IC - b * CLLM_QK < CLLM_QK ? IC - b * CLLM_QK : CLLM_QK;
        float s = scale[b];
        #pragma omp simd
        for (int j = 0; j < n; j++) out[b * CLLM_QK + j] = s * (float)q[b * CLLM_QK + j];
    }
}

/* float32 -> bf16 bits, rounded to nearest even by adding 0x7fff plus the kept lowest bit
 * (a carry into the exponent rounds up to the next binade or to infinity, as it should). A NaN
 * keeps its top half with the quiet bit set, so that one whose payload lies in the low half
 * stays a NaN rather than becoming infinity. */
static inline uint16_t cllm_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void cllm_bf16_round(uint16_t *out, const float *x, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) out[i] = cllm_f32_to_bf16(x[i]);
}

static inline void cllm_bf16_to_float(float *out, const uint16_t *w, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) out[i] = cllm_bf16_to_f32(w[i]);
}

#endif
