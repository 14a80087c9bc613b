/* Vectorizable float32 row primitives for the Cython core.
 *
 * Cython cannot emit `#pragma omp simd`, and without it GCC keeps float reductions and calls to
 * expf scalar: the softmax over a 30000-token vocabulary would then cost more than the matrix
 * products around it. Every function here is deterministic: its result depends only on its
 * inputs, never on the thread that runs it. */
#ifndef CLLM_VECMATH_H
#define CLLM_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) with Cephes' degree-5 polynomial after reduction by ln 2: relative error below 2e-7
 * over the clamped range, branch-free so that loops over it vectorize. */
/* Plain comparisons, not fminf/fmaxf: those keep IEEE NaN rules and GCC then calls libm
 * instead of emitting one vector instruction. */
static inline float cllm_minf(float a, float b) { return a < b ? a : b; }
static inline float cllm_maxf(float a, float b) { return a > b ? a : b; }

static inline float cllm_expf(float x) {
    x = cllm_minf(cllm_maxf(x, -87.0f), 88.0f);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* tanh through exp: 1 - 2/(exp(2u)+1); saturates cleanly to +-1. */
static inline float cllm_tanhf(float u) {
    return 1.0f - 2.0f / (cllm_expf(2.0f * u) + 1.0f);
}

static inline float cllm_row_max(const float *x, int n) {
    float m = -INFINITY;
    #pragma omp simd reduction(max:m)
    for (int i = 0; i < n; i++) m = cllm_maxf(m, x[i]);
    return m;
}

/* x[i] <- exp(x[i] - shift); returns the sum in float64 (the softmax normaliser). */
static inline double cllm_row_exp_sum(float *x, int n, float shift) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) {
        float e = cllm_expf(x[i] - shift);
        x[i] = e;
        s += e;
    }
    return (double)s;
}

static inline void cllm_row_scale(float *x, int n, float a) {
    #pragma omp simd
    for (int i = 0; i < n; i++) x[i] *= a;
}

/* x[0:n] <- softmax(x[0:n]) in place, n >= 1: exp(x - max) over its float64-normalised sum. */
static inline void cllm_row_softmax(float *x, int n) {
    float mx = cllm_row_max(x, n);
    cllm_row_scale(x, n, (float)(1.0 / cllm_row_exp_sum(x, n, mx)));
}

static inline float cllm_row_dot(const float *x, const float *y, int n) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

static inline float cllm_row_sum(const float *x, int n) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int i = 0; i < n; i++) s += x[i];
    return s;
}

/* Sum of squares in float64, for the global gradient norm. */
static inline double cllm_row_sumsq(const float *x, long n) {
    double s = 0.0;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

/* GELU, tanh approximation: y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
#define CLLM_GELU_K 0.7978845608028654f
static inline void cllm_gelu_forward(float *out, const float *inp, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) {
        float x = inp[i];
        float u = CLLM_GELU_K * (x + 0.044715f * x * x * x);
        out[i] = 0.5f * x * (1.0f + cllm_tanhf(u));
    }
}

/* dinp = dout * gelu'(inp), written over dout. */
static inline void cllm_gelu_backward_inplace(float *dout, const float *inp, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) {
        float x = inp[i];
        float u = CLLM_GELU_K * (x + 0.044715f * x * x * x);
        float t = cllm_tanhf(u);
        float du = CLLM_GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dout[i] *= 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
}

/* y[i] += a * x[i] */
static inline void cllm_row_axpy(float *y, const float *x, int n, float a) {
    #pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static inline void cllm_row_add(float *y, const float *x, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) y[i] += x[i];
}

/* AdamW on one contiguous range; the update of each element depends on that element alone. */
static inline void cllm_adamw_range(float *p, const float *g, float *m, float *v, long n,
                                    float lr, float beta1, float beta2, float eps,
                                    float decay, float grad_scale, float bc1, float bc2) {
    #pragma omp simd
    for (long i = 0; i < n; i++) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1;
        float vhat = vi / bc2;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + decay * p[i]);
    }
}

#endif
