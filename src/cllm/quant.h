/* The kernels of generation (inference only): int8 (Q8), bfloat16 and float32 weight
 * matrices stored rows by output (every matrix of a quantized model, and a float32 model's
 * output head), float32 ones in the training layout (a float32 model's layers), and the
 * weighted sum of attention's cached values.
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

#include "lanes.h"

#define CLLM_QK 32

/* Output rows computed together for one activation row (a generation step): they share each
 * load of the activations, and their accumulators are independent chains of FMAs, which hides
 * the FMA latency. */
#define CLLM_ROWS 4

/* Activation rows computed together for one output row (several rows: a batch): each weight
 * block is loaded (and converted) once for all of them, so that the arithmetic, not the loads,
 * sets the speed once the weights no longer stream from memory for a single row. */
#define CLLM_MROWS 8

/* How far ahead a product of several rows fetches the weight rows it will read */
#define CLLM_PREFETCH_ROWS 4

/* Register allocation decides the speed of the inner loops: the tile primitives are always
 * inlined (CLLM_INLINE), so that their shape is a constant and the accumulators stay in
 * registers, and each product is a function of its own, never inlined (CLLM_NOINLINE), so that
 * its loops are allocated apart from the caller's (inlined into a large OpenMP region, they
 * spilled and ran at half speed). */

static inline float cllm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- the primitives of each path (the float lanes cllm_f8 are lanes.h's): a block of 32
 * int8 (cllm_q8v) and its 8 lane sums (cllm_i8) ---- */

#ifdef CLLM_LANES_AVX2

/* The 256-bit VNNI instruction even with AVX-512: a block of 32 int8 is one 256-bit register,
 * and the same 8 lanes as the AVX2 and C paths keep the bits the same. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define CLLM_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define CLLM_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

typedef __m256i cllm_q8v;
typedef __m256i cllm_i8;

/* 8 bf16 as float32: a bf16 is the top half of its float32 */
CLLM_INLINE cllm_f8 cllm_bf16_load(const uint16_t *p) {
    __m256i wi = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wi, 16));
}

CLLM_INLINE cllm_q8v cllm_q8_load(const int8_t *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

CLLM_INLINE cllm_q8v cllm_q8_abs(cllm_q8v v) { return _mm256_sign_epi8(v, v); }

/* lane j = sum over k < 4 of a[4j + k] b[4j + k], given abs_a = |a|. The unsigned-by-signed
 * instructions take |a| and b with the sign of a (the product is unchanged, 0 where a is 0).
 * maddubs adds pairs in int16 with saturation: q in [-127, 127] bounds a pair by
 * 2 * 127^2 = 32258, which fits, so the sums stay exact. */
CLLM_INLINE cllm_i8 cllm_q8_dot(cllm_q8v abs_a, cllm_q8v a, cllm_q8v b) {
    __m256i sb = _mm256_sign_epi8(b, a);
#ifdef CLLM_DPBUSD
    return CLLM_DPBUSD(_mm256_setzero_si256(), abs_a, sb);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_a, sb), _mm256_set1_epi16(1));
#endif
}

/* acc + d * float(s) */
CLLM_INLINE cllm_f8 cllm_q8_accumulate(cllm_f8 acc, cllm_f8 d, cllm_i8 s) {
    return _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
}

#else  /* plain C: the same lanes, sums and roundings as the vector path */

typedef struct { int8_t b[CLLM_QK]; } cllm_q8v;
typedef struct { int32_t l[8]; } cllm_i8;

CLLM_INLINE cllm_f8 cllm_bf16_load(const uint16_t *p) {
    cllm_f8 r;
    for (int j = 0; j < 8; j++) r.l[j] = cllm_bf16_to_f32(p[j]);
    return r;
}

CLLM_INLINE cllm_q8v cllm_q8_load(const int8_t *p) {
    cllm_q8v r;
    memcpy(r.b, p, sizeof r.b);
    return r;
}

CLLM_INLINE cllm_q8v cllm_q8_abs(cllm_q8v v) {
    for (int k = 0; k < CLLM_QK; k++) v.b[k] = (int8_t)(v.b[k] < 0 ? -v.b[k] : v.b[k]);
    return v;
}

CLLM_INLINE cllm_i8 cllm_q8_dot(cllm_q8v abs_a, cllm_q8v a, cllm_q8v b) {
    cllm_i8 s;
    (void)abs_a;
    for (int j = 0; j < 8; j++) {
        s.l[j] = 0;
        for (int k = 4 * j; k < 4 * j + 4; k++) s.l[j] += (int32_t)a.b[k] * b.b[k];
    }
    return s;
}

CLLM_INLINE cllm_f8 cllm_q8_accumulate(cllm_f8 acc, cllm_f8 d, cllm_i8 s) {
    for (int j = 0; j < 8; j++) acc.l[j] = fmaf(d.l[j], (float)s.l[j], acc.l[j]);
    return acc;
}

#endif

/* ---- the products ---- */

/* Most accumulators of a tile: CLLM_ROWS x 1 or 1 x CLLM_MROWS. */
#define CLLM_TILE_ACC 8

/* Blocks whose scale products a Q8 tile computes ahead (on the stack) */
#define CLLM_SCALE_BLOCKS 16

/* y[m * ldy + r * step] = the lanes of acc[r * RM + m] summed, plus bias[r * step], for the
 * RO x RM outputs of a tile. */
CLLM_INLINE void cllm_store_tile(float *y, long ldy, const float *bias, long step,
                                 const cllm_f8 *acc, int RO, int RM) {
    for (int t = 0; t < RO * RM; t += 4) {
        cllm_f8 four[4];
        float s[4];
        for (int u = 0; u < 4; u++) four[u] = t + u < RO * RM ? acc[t + u] : cllm_f8_zero();
        cllm_f8_sum4(s, four);
        for (int u = 0; u < 4 && t + u < RO * RM; u++) {
            int r = (t + u) / RM, m = (t + u) % RM;
            y[m * ldy + r * step] = s[u] + (bias ? bias[r * step] : 0.0f);
        }
    }
}

/* A tile of Q8 products: the weight rows r * step (r < RO) by the activation rows m < RM, nb
 * blocks each, the activations in tile order (block b of row m at x[(b RM + m) 32], see
 * cllm_q8_quantize_activation), so that a block's rows are adjacent and addressed by
 * constants. RO and RM are constants at each call, so that the loops unroll and the
 * accumulators stay in registers. Each output's lanes accumulate over the blocks in order,
 * whatever the tile's shape: the bits depend on the output's inputs alone. The absolute value
 * is taken of the operand that the tile shares the most. */
CLLM_INLINE void cllm_q8_tile(float *y, long ldy, const float *bias, long step,
                              const int8_t *xq, const float *xs, const int8_t *wq,
                              const float *ws, int nb, int RO, int RM) {
    cllm_f8 acc[CLLM_TILE_ACC];
    for (int t = 0; t < RO * RM; t++) acc[t] = cllm_f8_zero();
    for (int b0 = 0; b0 < nb; b0 += CLLM_SCALE_BLOCKS) {
        int n = nb - b0 < CLLM_SCALE_BLOCKS ? nb - b0 : CLLM_SCALE_BLOCKS;
        /* the scales of the products, ws[r, b] xs[m, b], a vector at a time, read back one
         * by one as broadcasts from memory (load instructions, not arithmetic) */
        float d[CLLM_SCALE_BLOCKS][CLLM_TILE_ACC];
        for (int b = 0; b < n; b++)
            for (int r = 0; r < RO; r++) {
                float wsr = ws[r * step * nb + b0 + b];
                const float *xsb = xs + (b0 + b) * RM;
                #pragma omp simd
                for (int m = 0; m < RM; m++) d[b][r * RM + m] = wsr * xsb[m];
            }
        for (int b = 0; b < n; b++) {
            const int8_t *xb = xq + (long)(b0 + b) * RM * CLLM_QK;
            cllm_q8v w[CLLM_ROWS], x[CLLM_MROWS], a[CLLM_TILE_ACC];
            for (int r = 0; r < RO; r++) {
                w[r] = cllm_q8_load(wq + (r * step * nb + b0 + b) * CLLM_QK);
                if (RO < RM) a[r] = cllm_q8_abs(w[r]);
            }
            for (int m = 0; m < RM; m++) {
                x[m] = cllm_q8_load(xb + m * CLLM_QK);
                if (RO >= RM) a[m] = cllm_q8_abs(x[m]);
            }
            for (int r = 0; r < RO; r++)
                for (int m = 0; m < RM; m++) {
                    cllm_i8 s = RO >= RM ? cllm_q8_dot(a[m], x[m], w[r])
                                         : cllm_q8_dot(a[r], w[r], x[m]);
                    acc[r * RM + m] = cllm_q8_accumulate(acc[r * RM + m],
                                                         cllm_f8_set1(d[b][r * RM + m]), s);
                }
        }
    }
    cllm_store_tile(y, ldy, bias, step, acc, RO, RM);
}

/* The same for bf16 rows (wb) or float32 rows (wf, when not NULL) of IC elements, the
 * activations in tile order (chunk c of 8 values of row m at xt[(c RM + m) 8], the last chunk
 * zero padded: cllm_float_tile_order). The weights' last IC mod 8 go through zero-padded
 * copies, whose products add +0 to the lanes, the same on every path. */
CLLM_INLINE void cllm_float_tile(float *y, long ldy, const float *bias, long step,
                                 const float *xt, const uint16_t *wb, const float *wf, int IC,
                                 int RO, int RM) {
    cllm_f8 acc[CLLM_TILE_ACC];
    for (int t = 0; t < RO * RM; t++) acc[t] = cllm_f8_zero();
    int i = 0;
    for (; i + 8 <= IC; i += 8, xt += RM * 8) {
        cllm_f8 w[CLLM_ROWS];
        for (int r = 0; r < RO; r++)
            w[r] = wf ? cllm_f8_load(wf + r * step * IC + i)
                      : cllm_bf16_load(wb + r * step * IC + i);
        for (int m = 0; m < RM; m++) {
            cllm_f8 xv = cllm_f8_load(xt + m * 8);
            for (int r = 0; r < RO; r++) acc[r * RM + m] = cllm_f8_fma(acc[r * RM + m], xv, w[r]);
        }
    }
    if (i < IC) {
        cllm_f8 w[CLLM_ROWS];
        for (int r = 0; r < RO; r++) {
            uint16_t bt[8] = {0};
            float ft[8] = {0.0f};
            if (wf)
                memcpy(ft, wf + r * step * IC + i, (IC - i) * sizeof(float));
            else
                memcpy(bt, wb + r * step * IC + i, (IC - i) * sizeof(uint16_t));
            w[r] = wf ? cllm_f8_load(ft) : cllm_bf16_load(bt);
        }
        for (int m = 0; m < RM; m++) {
            cllm_f8 xv = cllm_f8_load(xt + m * 8);
            for (int r = 0; r < RO; r++) acc[r * RM + m] = cllm_f8_fma(acc[r * RM + m], xv, w[r]);
        }
    }
    cllm_store_tile(y, ldy, bias, step, acc, RO, RM);
}

/* The operands of a product: Q8 weights and activations when q8 is set, else bf16 weights (w)
 * or float32 ones (wf) and float32 activations x (in tile order, cllm_float_tile_order). */
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

/* The tile of y[m0 + m, o + r step], r < RO, m < RM */
CLLM_INLINE void cllm_tile(const cllm_operands *p, float *y, long ldy, const float *bias,
                           long step, int m0, int o, int RO, int RM) {
    float *ym = y + m0 * ldy + o;
    const float *b = bias ? bias + o : NULL;
    if (p->q8) {
        int nb = p->K / CLLM_QK;
        cllm_q8_tile(ym, ldy, b, step, p->xq + (long)m0 * p->K, p->xs + (long)m0 * nb,
                     p->wq + (long)o * p->K, p->ws + (long)o * nb, nb, RO, RM);
    } else {
        cllm_float_tile(ym, ldy, b, step, p->x + (long)m0 * ((p->IC + 7) / 8) * 8,
                        p->w ? p->w + (long)o * p->IC : NULL,
                        p->wf ? p->wf + (long)o * p->IC : NULL, p->IC, RO, RM);
    }
}

/* One output row o by the activation rows [m0, m0 + RM), RM <= CLLM_MROWS: a constant shape
 * for each count, so that every tile is unrolled. */
CLLM_INLINE void cllm_row_tile(const cllm_operands *p, float *y, long ldy, const float *bias,
                               int m0, int o, int RM) {
    switch (RM) {
        case 1: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 1); break;
        case 2: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 2); break;
        case 3: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 3); break;
        case 4: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 4); break;
        case 5: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 5); break;
        case 6: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 6); break;
        case 7: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, 7); break;
        default: cllm_tile(p, y, ldy, bias, 0, m0, o, 1, CLLM_MROWS); break;
    }
}

/* The loop nest of both products, over the output rows [o0, o1) and the activation rows
 * [0, M). One activation row (a step) is bound by memory: the rows are cut into CLLM_ROWS
 * slices of S rows and taken CLLM_ROWS at a time, one from each slice (k, k + S, k + 2S, ...
 * for k = 0, 1, ...), so that the weights are read as CLLM_ROWS streams far apart, each with
 * its own hardware prefetcher, which draws more from memory than one stream (12-16 GB/s
 * against 8-9 on one core of the AMD EPYC it was measured on, where software prefetching
 * added nothing). Several rows (a batch, a prompt) are bound by arithmetic: each weight row is
 * run over all of them in tiles of CLLM_MROWS while it sits in L1, in order, with the row
 * CLLM_PREFETCH_ROWS ahead fetched meanwhile (the outputs are then written in order too;
 * slices made the batch slower). */
CLLM_INLINE void cllm_matmul_rows(const cllm_operands *p, float *y, long ldy, const float *bias,
                                  int M, int o0, int o1) {
    if (M == 1) {
        int S = (o1 - o0 + CLLM_ROWS - 1) / CLLM_ROWS;
        int full = o1 - o0 - (CLLM_ROWS - 1) * S;      /* the steps with a row in every slice */
        for (int k = 0; k < S; k++) {
            if (k < full)
                cllm_tile(p, y, ldy, bias, S, 0, o0 + k, CLLM_ROWS, 1);
            else
                for (int o = o0 + k; o < o1; o += S) cllm_tile(p, y, ldy, bias, 0, 0, o, 1, 1);
        }
        return;
    }
    const char *w = p->q8 ? (const char *)p->wq : p->w ? (const char *)p->w : (const char *)p->wf;
    long row = p->q8 ? p->K : p->w ? 2L * p->IC : 4L * p->IC;
    for (int o = o0; o < o1; o++) {
        if (o + CLLM_PREFETCH_ROWS < o1)
            for (long b = 0; b < row; b += 64)
                __builtin_prefetch(w + (o + CLLM_PREFETCH_ROWS) * row + b);
        for (int m0 = 0; m0 < M; m0 += CLLM_MROWS)
            cllm_row_tile(p, y, ldy, bias, m0, o, M - m0 < CLLM_MROWS ? M - m0 : CLLM_MROWS);
    }
}

/* y[m * ldy + o] = bias[o] + sum over blocks b of (ws[o, b] xs[m, b]) * (int32 dot product of
 * block b of rows o of wq and m of xq), for o in [o0, o1) and m in [0, M); bias may be NULL.
 * xq and xs hold the activations in tile order (cllm_q8_quantize_activation). */
CLLM_NOINLINE void cllm_q8_matmul(float *y, long ldy, const float *bias, const int8_t *xq,
                                  const float *xs, int M, const int8_t *wq, const float *ws,
                                  int K, int o0, int o1) {
    cllm_operands p = {1, wq, xq, ws, xs, K, NULL, NULL, NULL, 0};
    cllm_matmul_rows(&p, y, ldy, bias, M, o0, o1);
}

/* y[m * ldy + o] = bias[o] + sum_i x[m, i] * float(w[o, i]), o in [o0, o1), m in [0, M), x
 * in tile order (cllm_float_tile_order) */
CLLM_NOINLINE void cllm_bf16_matmul(float *y, long ldy, const float *bias, const float *x,
                                    int M, int IC, const uint16_t *w, int o0, int o1) {
    cllm_operands p = {0, NULL, NULL, NULL, NULL, 0, w, NULL, x, IC};
    cllm_matmul_rows(&p, y, ldy, bias, M, o0, o1);
}

/* The same with float32 weights w (OC, IC): the output head, (V, C) rows by output as it is
 * stored, read without a transposed copy; x in tile order. */
CLLM_NOINLINE void cllm_f32_matmul(float *y, long ldy, const float *bias, const float *x,
                                   int M, int IC, const float *w, int o0, int o1) {
    cllm_operands p = {0, NULL, NULL, NULL, NULL, 0, NULL, w, x, IC};
    cllm_matmul_rows(&p, y, ldy, bias, M, o0, o1);
}

/* ---- float32 matrices in the training layout, W (IC, OC): the layers of a float32 model ----
 *
 * Walking whole rows of W in order reads it as one stream, which the hardware prefetchers
 * serve at full speed (about three times faster here than dot products along the rows of the
 * transposed matrix, and several times faster than columns strips, whose every row is another
 * page); four rows of W share each load and store of y, and rows of x reuse them from L1.
 * The operations are written out rather than left to the compiler's contraction, so that they
 * are the same on every path: for each four rows of W, t = x0 w0 (rounded), then
 * t = fma(x1, w1, t), fma(x2, w2, t), fma(x3, w3, t), and y = t + y; a last row alone,
 * y = fma(x0, w0, y). */

/* y[m, 0:n] += sum over i in [i0, i1) of x[m, i] * w[i, 0:n] for the rows m < M (y's rows ldy
 * apart, x's ldx, w's ldw) */
static inline void cllm_matvec_accumulate(float *y, long ldy, const float *x, long ldx, int M,
                                          const float *w, long ldw, int n, int i0, int i1) {
    int i = i0;
    for (; i + 4 <= i1; i += 4) {
        const float *w0 = w + (long)i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        for (int m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            float x0 = xm[i], x1 = xm[i + 1], x2 = xm[i + 2], x3 = xm[i + 3], *ym = y + m * ldy;
            #pragma omp simd
            for (int j = 0; j < n; j++)
                ym[j] = fmaf(x3, w3[j], fmaf(x2, w2[j], fmaf(x1, w1[j], x0 * w0[j]))) + ym[j];
        }
    }
    for (; i < i1; i++) {
        const float *w0 = w + (long)i * ldw;
        for (int m = 0; m < M; m++) {
            float x0 = x[m * ldx + i], *ym = y + m * ldy;
            #pragma omp simd
            for (int j = 0; j < n; j++) ym[j] = fmaf(x0, w0[j], ym[j]);
        }
    }
}

/* ---- attention ---- */

/* y[0:n] = sum over j < count, in order, of a[j] v[r_j, 0:n], r_j = rows[j] (or j when rows is
 * NULL), v's rows ldv apart: a head's output as the weighted sum of its cached values. Eight
 * lanes at a time stay in registers over all the rows, each step one FMA, as the plain loop
 * y[e] += a[j] v[r_j, e] would do through memory. */
static inline void cllm_weighted_rows(float *y, const float *a, const float *v, long ldv,
                                      const int32_t *rows, int count, int n) {
    int e = 0;
    for (; e + 32 <= n; e += 32) {
        cllm_f8 acc[4] = {cllm_f8_zero(), cllm_f8_zero(), cllm_f8_zero(), cllm_f8_zero()};
        for (int j = 0; j < count; j++) {
            const float *vj = v + (rows ? rows[j] : j) * ldv + e;
            cllm_f8 aj = cllm_f8_set1(a[j]);
            for (int k = 0; k < 4; k++) acc[k] = cllm_f8_fma(acc[k], aj, cllm_f8_load(vj + 8 * k));
        }
        for (int k = 0; k < 4; k++) cllm_f8_store(y + e + 8 * k, acc[k]);
    }
    for (; e + 8 <= n; e += 8) {
        cllm_f8 acc = cllm_f8_zero();
        for (int j = 0; j < count; j++)
            acc = cllm_f8_fma(acc, cllm_f8_set1(a[j]), cllm_f8_load(v + (rows ? rows[j] : j) * ldv + e));
        cllm_f8_store(y + e, acc);
    }
    for (; e < n; e++) {
        float acc = 0.0f;
        for (int j = 0; j < count; j++) acc = fmaf(a[j], v[(rows ? rows[j] : j) * ldv + e], acc);
        y[e] = acc;
    }
}

/* ---- conversions ---- */

/* Plain comparisons, as in vecmath.h; the order makes a NaN 127 rather than undefined. */
static inline float cllm_q8_clamp(float v) {
    v = v < 127.0f ? v : 127.0f;
    return v > -127.0f ? v : -127.0f;
}

/* One block: the n <= 32 values x (zero padded) -> q[0:32], *scale = amax / 127, and
 * q = x / scale rounded to nearest even (nearbyintf in the default rounding mode), so that
 * +-amax becomes +-127. A true division, not a product by 1 / scale: each q is then exactly
 * specified by IEEE arithmetic. A block whose scale is 0 (all zero) has q = 0. One plain C
 * path for weights and activations alike (it costs O(M IC), next to the O(M IC OC) product),
 * so that a quantized matrix is the same on every machine. */
static inline void cllm_q8_quantize_block(int8_t *q, float *scale, const float *x, int n) {
    float v[CLLM_QK] = {0.0f};
    memcpy(v, x, n * sizeof(float));
    float amax = 0.0f;
    #pragma omp simd reduction(max:amax)
    for (int i = 0; i < CLLM_QK; i++) amax = amax > fabsf(v[i]) ? amax : fabsf(v[i]);
    float s = amax / 127.0f;
    *scale = s;
    #pragma omp simd
    for (int i = 0; i < CLLM_QK; i++)
        q[i] = (int8_t)(s != 0.0f ? cllm_q8_clamp(nearbyintf(v[i] / s)) : 0.0f);
}

/* Row m of x (M, IC), block (or chunk) b of nb: where it goes in the tile order of the
 * activations of a product (rows in groups of CLLM_MROWS, within a group block-major):
 * (m0 nb + b RM + m - m0) for the group m0 of RM rows; rows = 1 gives the plain row order
 * (m nb + b). */
static inline long cllm_tile_index(int m, int b, int M, int nb, int rows) {
    int m0 = m / rows * rows, RM = M - m0 < rows ? M - m0 : rows;
    return (long)m0 * nb + (long)b * RM + (m - m0);
}

/* Row m of x (M, IC) -> its chunks of 8 in the tile order that cllm_bf16_matmul and
 * cllm_f32_matmul read, xt (M, IC rounded up to 8), the last chunk zero padded. */
static inline void cllm_float_tile_order(float *xt, const float *x, int M, int IC, int m) {
    int nc = (IC + 7) / 8;
    for (int c = 0; c < nc; c++) {
        int n = IC - 8 * c < 8 ? IC - 8 * c : 8;
        float *chunk = xt + cllm_tile_index(m, c, M, nc, CLLM_MROWS) * 8;
        memcpy(chunk, x + (long)m * IC + 8 * c, n * sizeof(float));
        for (int j = n; j < 8; j++) chunk[j] = 0.0f;
    }
}

/* Row m of x (M, IC) -> its blocks of q, one scale each, K = IC rounded up to 32, block b at
 * cllm_tile_index(m, b, M, K / 32, rows). */
static inline void cllm_q8_quantize_row(int8_t *q, float *scale, const float *x, int M, int IC,
                                        int K, int rows, int m) {
    int nb = K / CLLM_QK;
    for (int b = 0; b < nb; b++) {
        int n = IC - b * CLLM_QK;
        long at = cllm_tile_index(m, b, M, nb, rows);
        cllm_q8_quantize_block(q + at * CLLM_QK, scale + at, x + (long)m * IC + b * CLLM_QK,
                               n > CLLM_QK ? CLLM_QK : n);
    }
}

/* A matrix x (M, IC) -> q (M, K), scale (M, K / 32), rows in order. */
static inline void cllm_q8_quantize_rows(int8_t *q, float *scale, const float *x, int M, int IC,
                                         int K) {
    for (int m = 0; m < M; m++) cllm_q8_quantize_row(q, scale, x, M, IC, K, 1, m);
}

/* Row m of the activations of a product (M rows of IC): its blocks in the tile order that
 * cllm_q8_matmul reads. */
static inline void cllm_q8_quantize_activation(int8_t *q, float *scale, const float *x, int M,
                                               int IC, int K, int m) {
    cllm_q8_quantize_row(q, scale, x, M, IC, K, CLLM_MROWS, m);
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
