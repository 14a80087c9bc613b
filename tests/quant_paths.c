/* The kernels of quant.h on fixed pseudo-random inputs, every output written to stdout.
 * tests/test_quant.py compiles this once for each instruction-set path (plain C, AVX2,
 * AVX-VNNI, AVX-512 VNNI) and requires the same bytes from every path it can run. It also
 * checks here that a product computed over pieces of the output range gives the same bits as
 * one call over the whole range, and exits with 1 if not. */
#include <stdio.h>
#include <stdlib.h>

#include "quant.h"

static uint32_t state = 12345u;

/* uniform in [-2, 2), a multiple of 2^-22 */
static float uniform(void) {
    state = state * 1664525u + 1013904223u;
    return (float)((int32_t)(state >> 8) - (1 << 23)) / (float)(1 << 22);
}

static float *filled(long n, float magnitude) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    for (long i = 0; i < n; i++) p[i] = magnitude * uniform();
    return p;
}

static void put(const void *p, long bytes) { fwrite(p, 1, (size_t)bytes, stdout); }

/* y (M, OC) columns [o0, o1) of the product: q8 when wq is set, bf16 when wb is, else float32
 * (w32); x the float32 activations in tile order. */
static void product(float *y, int o0, int o1, const float *bias, const int8_t *xq,
                    const float *xs, const float *x, int M, const int8_t *wq, const float *ws,
                    const uint16_t *wb, const float *w32, int IC, int K, int OC) {
    if (wq)
        cllm_q8_matmul(y, OC, bias, xq, xs, M, wq, ws, K, o0, o1);
    else if (wb)
        cllm_bf16_matmul(y, OC, bias, x, M, IC, wb, o0, o1);
    else
        cllm_f32_matmul(y, OC, bias, x, M, IC, w32, o0, o1);
}

int main(void) {
    static const int Ms[] = {1, 3, 9}, ICs[] = {1, 31, 33, 100, 384}, OCs[] = {1, 5, 13, 37};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 5; b++)
            for (int c = 0; c < 4; c++) {
                int M = Ms[a], IC = ICs[b], OC = OCs[c], K = (IC + 31) / 32 * 32, nb = K / 32;
                float *x = filled((long)M * IC, 3.0f), *w = filled((long)OC * IC, 0.1f);
                float *bias = filled(OC, 1.0f);
                int8_t *xq = malloc((long)M * K), *wq = malloc((long)OC * K);
                float *xs = malloc((long)M * nb * sizeof(float));
                float *ws = malloc((long)OC * nb * sizeof(float));
                float *y = malloc((long)M * OC * sizeof(float)), *wf = malloc(IC * sizeof(float));
                float *z = malloc((long)M * OC * sizeof(float));
                uint16_t *wb = malloc((long)OC * IC * sizeof(uint16_t));
                float *xt = malloc((long)M * ((IC + 7) / 8 * 8) * sizeof(float));
                for (int m = 0; m < M; m++) {
                    cllm_q8_quantize_activation(xq, xs, x, M, IC, K, m);
                    cllm_float_tile_order(xt, x, M, IC, m);
                }
                cllm_q8_quantize_rows(wq, ws, w, OC, IC, K);
                put(xq, (long)M * K);
                put(xs, (long)M * nb * sizeof(float));
                put(wq, (long)OC * K);
                put(ws, (long)OC * nb * sizeof(float));
                cllm_bf16_round(wb, w, (long)OC * IC);
                static const char *kinds[] = {"q8", "bf16", "f32"};
                for (int kind = 0; kind < 3; kind++) {
                    const int8_t *kq = kind == 0 ? wq : NULL;
                    const uint16_t *kb = kind == 1 ? wb : NULL;
                    if (kb) put(wb, (long)OC * IC * sizeof(uint16_t));
                    for (int with_bias = 0; with_bias < 2; with_bias++) {
                        const float *b = with_bias ? bias : NULL;
                        product(y, 0, OC, b, xq, xs, xt, M, kq, ws, kb, w, IC, K, OC);
                        put(y, (long)M * OC * sizeof(float));
                        /* the same bits computed over pieces of the output range */
                        for (int piece = 1; piece <= 7; piece += 3) {
                            for (int o = 0; o < OC; o += piece)
                                product(z, o, o + piece < OC ? o + piece : OC, b, xq, xs, xt, M,
                                        kq, ws, kb, w, IC, K, OC);
                            if (memcmp(y, z, (size_t)M * OC * sizeof(float)) != 0)
                                return fprintf(stderr, "%s by pieces of %d differs\n",
                                               kinds[kind], piece), 1;
                        }
                    }
                }
                cllm_q8_dequantize_row(wf, wq + (long)(OC - 1) * K, ws + (long)(OC - 1) * nb, IC);
                put(wf, IC * sizeof(float));
                cllm_bf16_to_float(wf, wb, IC);
                put(wf, IC * sizeof(float));
                free(x), free(w), free(bias), free(xq), free(wq), free(xs), free(ws), free(y);
                free(z), free(wf), free(wb), free(xt);
            }
    return 0;
}
