/* Eight float32 lanes (cllm_f8) and their operations: the vector type of the hand-tiled C
 * kernels (quant.h's products of generation, attention.h's tiles of training). AVX2 + FMA
 * registers where the compiler targets them (CLLM_LANES_AVX2), else plain C with the same
 * lanes, sums and roundings (fmaf rounds once like a vector FMA), so both give the same bits. */
#ifndef CLLM_LANES_H
#define CLLM_LANES_H

#include <math.h>
#include <string.h>

/* Functions that must be inlined (their shapes constant, their accumulators in registers) and
 * functions that must not be (their loops allocated apart from the caller's). */
#if defined(__GNUC__)
#define CLLM_INLINE static inline __attribute__((always_inline))
#define CLLM_NOINLINE static __attribute__((noinline, unused))
#else
#define CLLM_INLINE static inline
#define CLLM_NOINLINE static inline
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define CLLM_LANES_AVX2 1
#include <immintrin.h>

typedef __m256 cllm_f8;

static inline cllm_f8 cllm_f8_zero(void) { return _mm256_setzero_ps(); }
CLLM_INLINE cllm_f8 cllm_f8_set1(float v) { return _mm256_set1_ps(v); }
CLLM_INLINE cllm_f8 cllm_f8_load(const float *p) { return _mm256_loadu_ps(p); }
CLLM_INLINE void cllm_f8_store(float *p, cllm_f8 v) { _mm256_storeu_ps(p, v); }

/* acc + a * b */
CLLM_INLINE cllm_f8 cllm_f8_fma(cllm_f8 acc, cllm_f8 a, cllm_f8 b) {
    return _mm256_fmadd_ps(a, b, acc);
}

CLLM_INLINE cllm_f8 cllm_f8_mul(cllm_f8 a, cllm_f8 b) { return _mm256_mul_ps(a, b); }

/* out[r] = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) of a[r], for 4 rows at once. */
CLLM_INLINE void cllm_f8_sum4(float out[4], const cllm_f8 a[4]) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

#else  /* plain C */

typedef struct { float l[8]; } cllm_f8;

static inline cllm_f8 cllm_f8_zero(void) {
    cllm_f8 z = {{0.0f}};
    return z;
}

CLLM_INLINE cllm_f8 cllm_f8_set1(float v) {
    cllm_f8 r;
    for (int j = 0; j < 8; j++) r.l[j] = v;
    return r;
}

CLLM_INLINE cllm_f8 cllm_f8_load(const float *p) {
    cllm_f8 r;
    memcpy(r.l, p, sizeof r.l);
    return r;
}

CLLM_INLINE void cllm_f8_store(float *p, cllm_f8 v) { memcpy(p, v.l, sizeof v.l); }

CLLM_INLINE cllm_f8 cllm_f8_fma(cllm_f8 acc, cllm_f8 a, cllm_f8 b) {
    for (int j = 0; j < 8; j++) acc.l[j] = fmaf(a.l[j], b.l[j], acc.l[j]);
    return acc;
}

CLLM_INLINE cllm_f8 cllm_f8_mul(cllm_f8 a, cllm_f8 b) {
    for (int j = 0; j < 8; j++) a.l[j] *= b.l[j];
    return a;
}

CLLM_INLINE void cllm_f8_sum4(float out[4], const cllm_f8 a[4]) {
    for (int r = 0; r < 4; r++) {
        const float *l = a[r].l;
        out[r] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
}

#endif

#endif
