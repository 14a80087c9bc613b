/* Causal self-attention of one (sequence, head) for the training forward and backward.
 *
 * Six of its products (scores, the weighted sum of values, and in the backward the gradients
 * of scores, values, queries and keys) are T x T x hd: 128 x 128 x 32 in the seed
 * configuration, where a BLAS call spends as long packing its operands as multiplying, and
 * computes the upper triangle that the causal mask then throws away. Here the head's rows are
 * copied once into padded, contiguous blocks (T and hd rounded up to CLLM_ATT_ALIGN), the
 * products run in register tiles of 4 rows by 16 columns over the lower triangle only, and the
 * probabilities (and their gradient) are zero above the diagonal, so that the products that
 * read them need no mask. Rows of T floats are CLLM_ATT_ALIGN floats longer than T rounded up:
 * at a power-of-two stride (1024 floats at T = 1024) the rows that a tile reads one after the
 * other would all fall in one set of the L1 cache and evict each other.
 *
 * Every loop has a fixed order: the result depends only on the inputs, never on the thread. */
#ifndef CLLM_ATTENTION_H
#define CLLM_ATTENTION_H

#include <string.h>

#include "lanes.h"
#include "vecmath.h"

#define CLLM_ATT_ALIGN 16   /* T and hd padded to a multiple of this (two vectors of 8) */

static inline int cllm_att_pad(int n) { return (n + CLLM_ATT_ALIGN - 1) / CLLM_ATT_ALIGN * CLLM_ATT_ALIGN; }

/* Floats of work one head needs: P and dP (Tp rows of ldt); K^T and V^T (hdp rows of ldt);
 * Q, K, V or dY rows and three outputs (Tp, hdp). */
static inline long cllm_attention_work(int T, int hd) {
    long Tp = cllm_att_pad(T), hdp = cllm_att_pad(hd), ldt = Tp + CLLM_ATT_ALIGN;
    return 2 * Tp * ldt + 2 * hdp * ldt + 6 * Tp * hdp;
}

/* dst (Tp, hdp) <- src (T, hd) rows ld floats apart, zero-padded. */
static inline void cllm_att_rows(float *dst, const float *src, long ld, int T, int hd, int Tp,
                                 int hdp) {
    memset(dst, 0, (size_t)Tp * hdp * sizeof(float));
    for (int t = 0; t < T; t++) memcpy(dst + (long)t * hdp, src + t * ld, hd * sizeof(float));
}

/* dst (hdp, Tp) rows ldt floats apart <- src (T, hd)^T, zero-padded. */
static inline void cllm_att_columns(float *dst, long ldt, const float *src, long ld, int T,
                                    int hd, int hdp) {
    memset(dst, 0, (size_t)hdp * ldt * sizeof(float));
    for (int t = 0; t < T; t++)
        for (int d = 0; d < hd; d++) dst[d * ldt + t] = src[t * ld + d];
}

/* dst (T, hd) rows ld floats apart <- src (Tp, hdp)'s first T rows and hd columns. */
static inline void cllm_att_store(float *dst, long ld, const float *src, int T, int hd, int hdp) {
    for (int t = 0; t < T; t++) memcpy(dst + t * ld, src + (long)t * hdp, hd * sizeof(float));
}

/* s (Tp, Tp) <- alpha * a @ bT over the tiles that hold the lower triangle; a (Tp, hdp),
 * bT (hdp, Tp); s and bT rows ldt floats apart. Entries above the diagonal inside those tiles
 * get values too: callers overwrite them. */
static inline void cllm_att_scores(float *s, const float *a, const float *bT, long ldt, int Tp,
                                   int hdp, float alpha) {
    for (int t0 = 0; t0 < Tp; t0 += 4) {
        for (int j0 = 0; j0 <= t0 + 3; j0 += 16) {
            cllm_f8 acc[4][2];
            for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = cllm_f8_zero();
            for (int d = 0; d < hdp; d++) {
                cllm_f8 b0 = cllm_f8_load(bT + d * ldt + j0);
                cllm_f8 b1 = cllm_f8_load(bT + d * ldt + j0 + 8);
                for (int i = 0; i < 4; i++) {
                    cllm_f8 x = cllm_f8_set1(a[(long)(t0 + i) * hdp + d]);
                    acc[i][0] = cllm_f8_fma(acc[i][0], x, b0);
                    acc[i][1] = cllm_f8_fma(acc[i][1], x, b1);
                }
            }
            for (int i = 0; i < 4; i++) {
                cllm_f8_store(s + (t0 + i) * ldt + j0, cllm_f8_mul(cllm_f8_set1(alpha), acc[i][0]));
                cllm_f8_store(s + (t0 + i) * ldt + j0 + 8,
                              cllm_f8_mul(cllm_f8_set1(alpha), acc[i][1]));
            }
        }
    }
}

/* y (Tp, hdp) <- p @ x, p (Tp, Tp) rows ldt floats apart and zero above the diagonal,
 * x (Tp, hdp): row t of y sums rows j <= t of x (for a tile of 4 rows, j < min(t0 + 4, T)). */
static inline void cllm_att_mix(float *y, const float *p, long ldt, const float *x, int T,
                                int Tp, int hdp) {
    for (int t0 = 0; t0 < Tp; t0 += 4) {
        int jn = t0 + 4 < T ? t0 + 4 : T;
        for (int d0 = 0; d0 < hdp; d0 += 16) {
            cllm_f8 acc[4][2];
            for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = cllm_f8_zero();
            for (int j = 0; j < jn; j++) {
                cllm_f8 x0 = cllm_f8_load(x + (long)j * hdp + d0);
                cllm_f8 x1 = cllm_f8_load(x + (long)j * hdp + d0 + 8);
                for (int i = 0; i < 4; i++) {
                    cllm_f8 w = cllm_f8_set1(p[(t0 + i) * ldt + j]);
                    acc[i][0] = cllm_f8_fma(acc[i][0], w, x0);
                    acc[i][1] = cllm_f8_fma(acc[i][1], w, x1);
                }
            }
            for (int i = 0; i < 4; i++) {
                cllm_f8_store(y + (long)(t0 + i) * hdp + d0, acc[i][0]);
                cllm_f8_store(y + (long)(t0 + i) * hdp + d0 + 8, acc[i][1]);
            }
        }
    }
}

/* y (Tp, hdp) <- p^T @ x, p (Tp, Tp) rows ldt floats apart and zero above the diagonal,
 * x (Tp, hdp): row j of y sums rows t >= j (t < T) of x. */
static inline void cllm_att_mix_transposed(float *y, const float *p, long ldt, const float *x,
                                           int T, int Tp, int hdp) {
    for (int j0 = 0; j0 < Tp; j0 += 4) {
        for (int d0 = 0; d0 < hdp; d0 += 16) {
            cllm_f8 acc[4][2];
            for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = cllm_f8_zero();
            for (int t = j0; t < T; t++) {
                cllm_f8 x0 = cllm_f8_load(x + (long)t * hdp + d0);
                cllm_f8 x1 = cllm_f8_load(x + (long)t * hdp + d0 + 8);
                for (int i = 0; i < 4; i++) {
                    cllm_f8 w = cllm_f8_set1(p[t * ldt + j0 + i]);
                    acc[i][0] = cllm_f8_fma(acc[i][0], w, x0);
                    acc[i][1] = cllm_f8_fma(acc[i][1], w, x1);
                }
            }
            for (int i = 0; i < 4; i++) {
                cllm_f8_store(y + (long)(j0 + i) * hdp + d0, acc[i][0]);
                cllm_f8_store(y + (long)(j0 + i) * hdp + d0 + 8, acc[i][1]);
            }
        }
    }
}

/* The work's parts. */
typedef struct {
    float *p, *dp, *kT, *vT, *q, *k, *x, *y0, *y1, *y2;
    int Tp, hdp;
    long ldt;    /* floats between rows of p, dp, kT, vT */
} cllm_att_parts;

static inline cllm_att_parts cllm_att_split(float *work, int T, int hd) {
    cllm_att_parts w;
    long Tp = cllm_att_pad(T), hdp = cllm_att_pad(hd), ldt = Tp + CLLM_ATT_ALIGN;
    w.Tp = (int)Tp;
    w.hdp = (int)hdp;
    w.ldt = ldt;
    w.p = work;
    w.dp = w.p + Tp * ldt;
    w.kT = w.dp + Tp * ldt;
    w.vT = w.kT + hdp * ldt;
    w.q = w.vT + hdp * ldt;
    w.k = w.q + Tp * hdp;
    w.x = w.k + Tp * hdp;
    w.y0 = w.x + Tp * hdp;
    w.y1 = w.y0 + Tp * hdp;
    w.y2 = w.y1 + Tp * hdp;
    return w;
}

/* w.p <- the causal softmax of q k^T / sqrt(hd) (rows t < T; zero above the diagonal and on
 * padded rows), with w.q and w.kT filled from q, k (T, hd) rows ld floats apart. */
static inline void cllm_att_probs(cllm_att_parts *w, const float *q, const float *k, long ld,
                                  int T, int hd) {
    cllm_att_rows(w->q, q, ld, T, hd, w->Tp, w->hdp);
    cllm_att_columns(w->kT, w->ldt, k, ld, T, hd, w->hdp);
    cllm_att_scores(w->p, w->q, w->kT, w->ldt, w->Tp, w->hdp, 1.0f / sqrtf((float)hd));
    for (int t = 0; t < w->Tp; t++) {
        float *row = w->p + t * w->ldt;
        int n = t < T ? t + 1 : 0;
        if (n) cllm_row_softmax(row, n);
        memset(row + n, 0, (size_t)(w->Tp - n) * sizeof(float));
    }
}

/* att (T, T) <- the probabilities of one head (zero above the diagonal); for the tests. */
static inline void cllm_attention_probs(float *att, const float *q, const float *k, long ld,
                                        int T, int hd, float *work) {
    cllm_att_parts w = cllm_att_split(work, T, hd);
    cllm_att_probs(&w, q, k, ld, T, hd);
    for (int t = 0; t < T; t++) memcpy(att + (long)t * T, w.p + t * w.ldt, T * sizeof(float));
}

/* out (T, hd) rows ldo floats apart <- softmax(q k^T / sqrt(hd), causal) @ v; q, k, v (T, hd)
 * rows ld floats apart. */
static inline void cllm_attention_forward(float *out, long ldo, const float *q, const float *k,
                                          const float *v, long ld, int T, int hd, float *work) {
    cllm_att_parts w = cllm_att_split(work, T, hd);
    cllm_att_probs(&w, q, k, ld, T, hd);
    cllm_att_rows(w.x, v, ld, T, hd, w.Tp, w.hdp);
    cllm_att_mix(w.y0, w.p, w.ldt, w.x, T, w.Tp, w.hdp);
    cllm_att_store(out, ldo, w.y0, T, hd, w.hdp);
}

/* dq, dk, dv (T, hd) rows ld floats apart, overwritten, from dy (T, hd) rows ldy floats apart:
 * the gradient of cllm_attention_forward, its probabilities recomputed. */
static inline void cllm_attention_backward(float *dq, float *dk, float *dv, const float *dy,
                                           long ldy, const float *q, const float *k,
                                           const float *v, long ld, int T, int hd,
                                           float *work) {
    cllm_att_parts w = cllm_att_split(work, T, hd);
    float scale = 1.0f / sqrtf((float)hd);
    cllm_att_probs(&w, q, k, ld, T, hd);
    cllm_att_rows(w.k, k, ld, T, hd, w.Tp, w.hdp);
    cllm_att_rows(w.x, dy, ldy, T, hd, w.Tp, w.hdp);
    cllm_att_columns(w.vT, w.ldt, v, ld, T, hd, w.hdp);
    /* dp = dy @ v^T ; dv = p^T @ dy */
    cllm_att_scores(w.dp, w.x, w.vT, w.ldt, w.Tp, w.hdp, 1.0f);
    cllm_att_mix_transposed(w.y2, w.p, w.ldt, w.x, T, w.Tp, w.hdp);
    /* softmax backward, scaled: dscore = scale * p * (dp - sum(p * dp)), zero above the
     * diagonal */
    for (int t = 0; t < w.Tp; t++) {
        float *drow = w.dp + t * w.ldt;
        const float *prow = w.p + t * w.ldt;
        int n = t < T ? t + 1 : 0;
        float s = cllm_row_dot(prow, drow, n);
        for (int j = 0; j < n; j++) drow[j] = scale * prow[j] * (drow[j] - s);
        memset(drow + n, 0, (size_t)(w.Tp - n) * sizeof(float));
    }
    /* dq = dscore @ k ; dk = dscore^T @ q */
    cllm_att_mix(w.y0, w.dp, w.ldt, w.k, T, w.Tp, w.hdp);
    cllm_att_mix_transposed(w.y1, w.dp, w.ldt, w.q, T, w.Tp, w.hdp);
    cllm_att_store(dq, ld, w.y0, T, hd, w.hdp);
    cllm_att_store(dk, ld, w.y1, T, hd, w.hdp);
    cllm_att_store(dv, ld, w.y2, T, hd, w.hdp);
}

#endif
