# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compute core: GPT-2 forward and backward run by S "kissing spheres" on OS threads.

Layout follows llm.c's train_gpt2.c: one forward and one backward function per layer kind, all
parameters in one flat float32 buffer addressed through offsets. Matrices are row-major; BLAS
(column-major) is reached through `matmul`, which swaps the operands.

Notation: N rows (= sequences of a sphere x T), C width, F inner width, V vocabulary, H heads,
hd = C / H, T sequence length.

The crystalline switches (CRYSTALLINE.md sections 3 to 5) are branches at the call sites of
their own layer functions: angular rotation of q and k, Ulam sparse attention, the crystalline
loss. Off, they cost one test per layer.

The owner of the model's state is the Transformer class: built once from a ModelConfig and
the flat parameter buffer, it holds everything a forward, backward, optimizer step or decoder
needs, with typed fields, and its methods are those operations.

Determinism: a sphere's work is done entirely by one thread with single-threaded BLAS, into
buffers of that sphere, so its result does not depend on which thread ran it or how many
threads there are; the gradient adds the sphere gradients in the fixed order 0..S-1.
"""
import math

import numpy as np
cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
cimport openmp
from posix.unistd cimport usleep
from libc.math cimport sqrtf, sqrt, log
from libc.string cimport memset, memcpy
from libc.stdint cimport int8_t, int32_t, int64_t, uint16_t, uint32_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from scipy.linalg.cython_blas cimport sgemm

cnp.import_array()

cdef extern from "vecmath.h" nogil:
    float cllm_row_max(const float *x, int n)
    double cllm_row_exp_sum(float *x, int n, float shift)
    void cllm_row_scale(float *x, int n, float a)
    void cllm_row_softmax(float *x, int n)
    float cllm_row_dot(const float *x, const float *y, int n)
    float cllm_row_sum(const float *x, int n)
    double cllm_row_sumsq(const float *x, long n)
    void cllm_gelu_forward(float *out, const float *inp, int n)
    void cllm_gelu_backward_inplace(float *dout, const float *inp, int n)
    void cllm_row_axpy(float *y, const float *x, int n, float a)
    void cllm_row_add(float *y, const float *x, long n)
    void cllm_adamw_range(float *p, const float *g, float *m, float *v, long n, float lr,
                          float beta1, float beta2, float eps, float decay, float grad_scale,
                          float bc1, float bc2)

cdef extern from "attention.h" nogil:
    long cllm_attention_work(int T, int hd)
    void cllm_attention_probs(float *att, const float *q, const float *k, long ld, int T, int hd,
                              float *work)
    void cllm_attention_forward(float *out, long ldo, const float *q, const float *k,
                                const float *v, long ld, int T, int hd, float *work)
    void cllm_attention_backward(float *dq, float *dk, float *dv, const float *dy, long ldy,
                                 const float *q, const float *k, const float *v, long ld, int T,
                                 int hd, float *work)

cdef extern from "quant.h" nogil:
    enum: CLLM_QK
    void cllm_q8_quantize_rows(int8_t *q, float *scale, const float *x, int M, int IC, int K)
    void cllm_q8_quantize_activation(int8_t *q, float *scale, const float *x, int M, int IC,
                                     int K, int m)
    void cllm_float_tile_order(float *xt, const float *x, int M, int IC, int m)
    void cllm_q8_matmul(float *y, long ldy, const float *bias, const int8_t *xq, const float *xs,
                        int M, const int8_t *wq, const float *ws, int K, int o0, int o1)
    void cllm_bf16_round(uint16_t *out, const float *x, long n)
    void cllm_f32_matmul(float *y, long ldy, const float *bias, const float *x, int M, int IC,
                         const float *w, int o0, int o1)
    void cllm_bf16_matmul(float *y, long ldy, const float *bias, const float *x, int M, int IC,
                          const uint16_t *w, int o0, int o1)
    void cllm_q8_dequantize_row(float *out, const int8_t *q, const float *scale, int IC)
    void cllm_matvec_accumulate(float *y, long ldy, const float *x, long ldx, int M,
                                const float *w, long ldw, int n, int i0, int i1)
    void cllm_weighted_rows(float *y, const float *a, const float *v, long ldv,
                            const int32_t *rows, int count, int n)
    void cllm_bf16_to_float(float *out, const uint16_t *w, long n)

# Per-layer tensors, indices into a row of the owner's layer-offset table; LAYER_TENSOR_NAMES
# gives their names in the same order, and the table is built (and checked) from those names.
cdef enum:
    LN1_W, LN1_B, QKV_W, QKV_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, FCPROJ_W, FCPROJ_B
    N_LAYER_TENSORS

LAYER_TENSOR_NAMES = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                      "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                      "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")

# What a sphere step computes.
cpdef enum Mode:
    MODE_LOGITS = 0   # forward only, logits copied out
    MODE_LOSS = 1     # forward and loss
    MODE_GRADS = 2    # forward, loss and backward


cdef struct Dims:
    int V, C, F, L, H, n_ctx, tied
    Py_ssize_t wte, wpe, lnf_w, lnf_b, head   # head = wte when tied, else lm_head.weight
    const Py_ssize_t *layer                   # (L, N_LAYER_TENSORS) offsets
    bint angular                # position="angular": no wpe; q, k rotated in every layer
    const float *rot_cos        # (n_ctx, H, hd/2) cos theta(p, h, i)
    const float *rot_sin        # (n_ctx, H, hd/2) sin theta(p, h, i)
    bint ulam                   # attention="ulam": sparse attention over neighbour lists
    const int32_t *ulam_start   # (n_ctx + 1) query p attends to keys
    const int32_t *ulam_keys    #   ulam_keys[ulam_start[p]:ulam_start[p + 1]], ascending
    bint crystalline            # loss="crystalline"
    float alpha                 # its weight
    const float *q_rows         # (U, V) q_y of the distinct targets of the batch being run
    const int32_t *q_row_of     # (V) row of target y in q_rows (-1: not a target)


cdef struct Acts:
    # Saved activations of up to nb sequences of length T (N = nb * T rows). The outputs of
    # the layer LayerNorms and of GELU, and the attention probabilities, are not kept: the
    # backward recomputes them (the same bits) from the inputs, which are.
    float *x0         # (N, C) token + position embedding: the residual entering layer 0
    float *ln1_mean   # (L, N)
    float *ln1_rstd   # (L, N)
    float *qkv        # (L, N, 3C)
    float *atty       # (L, N, C) attention output before the projection
    float *res2       # (L, N, C) residual after attention
    float *ln2_mean   # (L, N)
    float *ln2_rstd   # (L, N)
    float *fch        # (L, N, F) before GELU
    float *res3       # (L, N, C) residual after the MLP: the layer's output
    float *lnf        # (N, C)
    float *lnf_mean   # (N)
    float *lnf_rstd   # (N)
    float *dln        # (N, C) gradient of a LayerNorm output
    # The logits (N, V), then d loss / d logits, share one region with the scratch rows that
    # are dead while they live: those of one layer's forward (before the head) and those of
    # the backward (after it).
    float *logits
    float *ln         # (N, C) one LayerNorm's output
    float *gelu       # (N, F) one GELU's output
    float *att        # one head's attention work (attention.h; Ulam: one query's probabilities)
    float *dres       # (N, C) gradient of the residual stream
    float *datty      # (N, C)
    float *dqkv       # (N, 3C)
    float *dfch       # (N, F)
    float *datt       # Ulam: the gradient of one query's probabilities


# ----------------------------------------------------------------------------------------------
# matrix product

cdef inline void matmul(bint trans_a, bint trans_b, int M, int N, int K, float alpha,
                        const float *A, int lda, const float *B, int ldb, float beta,
                        float *Cm, int ldc) noexcept nogil:
    """Row-major Cm (M, N) = alpha * op(A) @ op(B) + beta * Cm.

    A row-major matrix is the transpose of a column-major one, so this is the column-major
    product Cm^T = op(B)^T @ op(A)^T: BLAS gets the operands swapped."""
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    sgemm(&ta, &tb, &N, &M, &K, &alpha, <float *>B, &ldb, <float *>A, &lda, &beta, Cm, &ldc)


# ----------------------------------------------------------------------------------------------
# encoder: x0 = wte[idx] + wpe[pos]; wpe is NULL with angular positions (x0 = wte[idx])

cdef void encoder_forward(float *out, const int64_t *idx, const float *wte, const float *wpe,
                          int nb, int T, int C) noexcept nogil:
    # out (nb*T, C), idx (nb*T), wte (V, C), wpe (n_ctx, C) or NULL
    cdef int n, t, c
    cdef const float *tok
    cdef const float *pos
    for n in range(nb * T):
        t = n % T
        tok = wte + idx[n] * C
        if wpe == NULL:
            memcpy(out + n * C, tok, C * sizeof(float))
            continue
        pos = wpe + t * C
        for c in range(C):
            out[n * C + c] = tok[c] + pos[c]


cdef void encoder_backward(float *dwte, float *dwpe, const float *dout, const int64_t *idx,
                           int nb, int T, int C) noexcept nogil:
    # dwte (V, C) and dwpe (n_ctx, C) or NULL accumulate dout (nb*T, C), rows in order
    cdef int n
    for n in range(nb * T):
        cllm_row_add(dwte + idx[n] * C, dout + n * C, C)
        if dwpe != NULL:
            cllm_row_add(dwpe + (n % T) * C, dout + n * C, C)


# ----------------------------------------------------------------------------------------------
# angular positions: pair (2i, 2i+1) of head h of q and of k at position p turned by
# theta(p, h, i). A row's C/2 pairs line up with the (H, hd/2) table row of its position.

cdef inline void rotate_pair(float *x, float c, float s) noexcept nogil:
    cdef float x0 = x[0], x1 = x[1]
    x[0] = x0 * c - x1 * s
    x[1] = x0 * s + x1 * c


cdef inline void rotate_qk(float *qk, const float *cos, const float *sin, int C,
                           float direction) noexcept nogil:
    # qk (2C): q then k of one position; cos, sin (C/2); direction -1 turns back (transposes)
    cdef int j
    for j in range(C // 2):
        rotate_pair(qk + 2 * j, cos[j], direction * sin[j])
        rotate_pair(qk + C + 2 * j, cos[j], direction * sin[j])


cdef void angular_forward(float *qkv, const float *cos, const float *sin,
                          int nb, int T, int C) noexcept nogil:
    # qkv (nb*T, 3C): q and k rotated in place; cos, sin (n_ctx, C/2)
    cdef int n
    for n in range(nb * T):
        rotate_qk(qkv + <Py_ssize_t>n * 3 * C, cos + (n % T) * (C // 2),
                  sin + (n % T) * (C // 2), C, 1.0)


cdef void angular_backward(float *dqkv, const float *cos, const float *sin,
                           int nb, int T, int C) noexcept nogil:
    # dqkv (nb*T, 3C): the gradient of rotated q, k becomes that of q, k (inverse rotation)
    cdef int n
    for n in range(nb * T):
        rotate_qk(dqkv + <Py_ssize_t>n * 3 * C, cos + (n % T) * (C // 2),
                  sin + (n % T) * (C // 2), C, -1.0)


# ----------------------------------------------------------------------------------------------
# LayerNorm

cdef void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                            const float *w, const float *b, int N, int C) noexcept nogil:
    # out (N, C), mean (N), rstd (N), inp (N, C), w (C), b (C)
    cdef int n, c
    cdef float m, v, s
    cdef const float *x
    cdef float *y
    for n in range(N):
        x = inp + n * C
        y = out + n * C
        m = cllm_row_sum(x, C) / C
        for c in range(C):
            y[c] = x[c] - m          # centered input, normalised below
        v = cllm_row_dot(y, y, C) / C
        s = 1.0 / sqrtf(v + 1e-5)
        for c in range(C):
            y[c] = y[c] * s * w[c] + b[c]
        mean[n] = m
        rstd[n] = s


cdef void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                             const float *inp, const float *w, const float *mean,
                             const float *rstd, float *scratch, int N, int C) noexcept nogil:
    # dinp (N, C) accumulates; dw, db (C) are overwritten; dout, inp (N, C); scratch (C)
    cdef int n, c
    cdef float m, s, dnorm_mean, dnorm_norm_mean
    cdef const float *x
    cdef const float *dy
    cdef float *dx
    memset(dw, 0, C * sizeof(float))
    memset(db, 0, C * sizeof(float))
    for n in range(N):
        x = inp + n * C
        dy = dout + n * C
        dx = dinp + n * C
        m = mean[n]
        s = rstd[n]
        # scratch = normalised input; the gradient of the normalised input is dy * w
        for c in range(C):
            scratch[c] = (x[c] - m) * s
        dnorm_mean = 0.0
        dnorm_norm_mean = 0.0
        for c in range(C):
            dnorm_mean = dnorm_mean + dy[c] * w[c]
            dnorm_norm_mean = dnorm_norm_mean + dy[c] * w[c] * scratch[c]
        dnorm_mean = dnorm_mean / C
        dnorm_norm_mean = dnorm_norm_mean / C
        for c in range(C):
            db[c] += dy[c]
            dw[c] += dy[c] * scratch[c]
            dx[c] += (dy[c] * w[c] - dnorm_mean - scratch[c] * dnorm_norm_mean) * s


# ----------------------------------------------------------------------------------------------
# linear layer (Hugging Face Conv1D layout: out = inp @ w + b, w of shape (IC, OC))

cdef void linear_forward(float *out, const float *inp, const float *w, const float *b,
                         int N, int IC, int OC) noexcept nogil:
    # out (N, OC), inp (N, IC), w (IC, OC), b (OC)
    cdef int n
    for n in range(N):
        memcpy(out + n * OC, b, OC * sizeof(float))
    matmul(False, False, N, OC, IC, 1.0, inp, IC, w, OC, 1.0, out, OC)


cdef void linear_backward(float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, int N, int IC, int OC) noexcept nogil:
    # dinp (N, IC) overwritten, dw (IC, OC) and db (OC) overwritten; dout (N, OC)
    cdef int n
    matmul(False, True, N, IC, OC, 1.0, dout, OC, w, OC, 0.0, dinp, IC)
    matmul(True, False, IC, OC, N, 1.0, inp, IC, dout, OC, 0.0, dw, OC)
    memset(db, 0, OC * sizeof(float))
    for n in range(N):
        cllm_row_add(db, dout + n * OC, OC)


# ----------------------------------------------------------------------------------------------
# causal self-attention, one sequence at a time, one head at a time

# The attention probabilities are not kept for the backward: it recomputes them per (sequence,
# head), the same operations giving the same bits, which costs a seventh product (and a softmax)
# besides the six and saves L x nb x H x T x T floats a thread (as much memory as the stored MLP
# activations). A head's products are attention.h's: lower triangle only, no BLAS packing.

cdef void attention_forward(float *out, float *work, const float *qkv,
                            int nb, int T, int C, int H) noexcept nogil:
    # out (nb*T, C), work (cllm_attention_work(T, hd)) scratch, qkv (nb*T, 3C)
    cdef int hd = C // H
    cdef int b, h
    cdef const float *q
    for b in range(nb):
        for h in range(H):
            q = qkv + b * T * 3 * C + h * hd
            cllm_attention_forward(out + b * T * C + h * hd, C, q, q + C, q + 2 * C, 3 * C, T,
                                   hd, work)


cdef void attention_backward(float *dqkv, float *work, const float *dout, const float *qkv,
                             int nb, int T, int C, int H) noexcept nogil:
    # dqkv (nb*T, 3C) overwritten, work (cllm_attention_work(T, hd)) scratch, dout (nb*T, C)
    cdef int hd = C // H
    cdef int b, h
    cdef const float *q
    cdef float *dq
    for b in range(nb):
        for h in range(H):
            q = qkv + b * T * 3 * C + h * hd
            dq = dqkv + b * T * 3 * C + h * hd
            cllm_attention_backward(dq, dq + C, dq + 2 * C, dout + b * T * C + h * hd, C, q,
                                    q + C, q + 2 * C, 3 * C, T, hd, work)


# ----------------------------------------------------------------------------------------------
# Ulam spiral attention: query t attends to keys[start[t]:start[t+1]] only (positions <= t
# near it on the spiral), so the cost is O(T (2r+1)^2 hd) rather than O(T^2 hd). As for dense
# attention, the backward recomputes the probabilities.

cdef void ulam_probs(float *a, const float *seq, int t, const int32_t *key, int n, int C,
                     int hd, int h) noexcept nogil:
    # a (n) <- softmax over the keys key[0..n) of query t, head h: q_t . k_j / sqrt(hd);
    # seq (T, 3C) one sequence's qkv
    cdef int j
    cdef float scale = 1.0 / sqrtf(hd)
    cdef const float *q = seq + t * 3 * C + h * hd
    for j in range(n):
        a[j] = scale * cllm_row_dot(q, seq + key[j] * 3 * C + C + h * hd, hd)
    cllm_row_softmax(a, n)


cdef void ulam_attention_forward(float *out, float *a, const float *qkv, const int32_t *start,
                                 const int32_t *keys, int nb, int T, int C,
                                 int H) noexcept nogil:
    # out (nb*T, C), a (most keys of a query) scratch, qkv (nb*T, 3C)
    cdef int hd = C // H
    cdef int b, h, t, j, n
    cdef const float *seq
    cdef const int32_t *key
    cdef float *y
    for b in range(nb):
        seq = qkv + <Py_ssize_t>b * T * 3 * C
        for h in range(H):
            for t in range(T):
                key = keys + start[t]
                n = start[t + 1] - start[t]
                ulam_probs(a, seq, t, key, n, C, hd, h)
                y = out + (<Py_ssize_t>b * T + t) * C + h * hd
                memset(y, 0, hd * sizeof(float))
                for j in range(n):
                    cllm_row_axpy(y, seq + key[j] * 3 * C + 2 * C + h * hd, hd, a[j])


cdef void ulam_attention_backward(float *dqkv, float *datt, float *a, const float *dout,
                                  const float *qkv, const int32_t *start, const int32_t *keys,
                                  int nb, int T, int C, int H) noexcept nogil:
    # dqkv (nb*T, 3C) overwritten, datt and a (most keys of a query) scratch, dout (nb*T, C)
    cdef int hd = C // H
    cdef int b, h, t, j, n
    cdef float scale = 1.0 / sqrtf(hd)
    cdef float s
    cdef const float *seq
    cdef const float *q
    cdef const float *dy
    cdef const int32_t *key
    cdef float *dseq
    memset(dqkv, 0, <Py_ssize_t>nb * T * 3 * C * sizeof(float))
    for b in range(nb):
        seq = qkv + <Py_ssize_t>b * T * 3 * C
        dseq = dqkv + <Py_ssize_t>b * T * 3 * C
        for h in range(H):
            for t in range(T):
                q = seq + t * 3 * C + h * hd
                dy = dout + (<Py_ssize_t>b * T + t) * C + h * hd
                key = keys + start[t]
                n = start[t + 1] - start[t]
                ulam_probs(a, seq, t, key, n, C, hd, h)
                # datt_j = dy . v_j ; dv_j += a_j dy
                for j in range(n):
                    datt[j] = cllm_row_dot(dy, seq + key[j] * 3 * C + 2 * C + h * hd, hd)
                    cllm_row_axpy(dseq + key[j] * 3 * C + 2 * C + h * hd, dy, hd, a[j])
                # softmax backward, scaled: dscore_j = scale a_j (datt_j - sum(a datt));
                # dq += dscore_j k_j ; dk_j += dscore_j q
                s = cllm_row_dot(a, datt, n)
                for j in range(n):
                    datt[j] = scale * a[j] * (datt[j] - s)
                    cllm_row_axpy(dseq + t * 3 * C + h * hd, seq + key[j] * 3 * C + C + h * hd,
                                  hd, datt[j])
                    cllm_row_axpy(dseq + key[j] * 3 * C + C + h * hd, q, hd, datt[j])


# ----------------------------------------------------------------------------------------------
# crystalline loss: cross-entropy mixed with a structured target q_y over the vocabulary,
#   s(a, b) = 0.7 gcd(a, b) / max(a, b) + 0.3 / (1 + ||u(a) - u(b)||_2),  a = v + 1, b = y + 1
#   q_y(v) = s(v + 1, y + 1) / sum over w of s(w + 1, y + 1)

cdef inline uint32_t euclid_gcd(uint32_t a, uint32_t b) noexcept nogil:
    cdef uint32_t r
    while b:
        r = a % b
        a = b
        b = r
    return a


cdef void crystalline_target_row(float *q, int y, int V, const int32_t *ulam_xy) noexcept nogil:
    # q (V) <- q_y; ulam_xy (V, 2) the spiral points u(1) .. u(V)
    cdef uint32_t a, b = y + 1
    cdef int v
    cdef double dx, dy, s, total = 0.0
    # first q[v] = gcd(v + 1, b), exact in float32: Euclid for a <= b, and above b the
    # subtractive step gcd(a, b) = gcd(a - b, b) reuses an earlier entry
    for v in range(V):
        a = v + 1
        q[v] = <float>(euclid_gcd(a, b) if a <= b else <uint32_t>q[v - b])
    for v in range(V):
        a = v + 1
        dx = ulam_xy[2 * v] - ulam_xy[2 * y]
        dy = ulam_xy[2 * v + 1] - ulam_xy[2 * y + 1]
        s = 0.7 * q[v] / (a if a > b else b) + 0.3 / (1.0 + sqrt(dx * dx + dy * dy))
        q[v] = <float>s
        total += s
    cllm_row_scale(q, V, <float>(1.0 / total))


cdef void crossentropy_forward_backward(float *logits, double *loss, double *ce,
                                        const int64_t *targets, int N, int V,
                                        const float *q_rows, const int32_t *q_row_of,
                                        float alpha, float dscale, bint backward) noexcept nogil:
    """Add to *loss the training loss of each row with target != -1, in row order, and to *ce
    its plain cross-entropy. Without q_rows (NULL) the loss is plain cross-entropy -log p_y; with them it is the
    crystalline loss (1 - alpha) (-log p_y) + alpha (-sum_v q_y(v) log p_v).

    With `backward`, logits (N, V) are replaced by
    d loss / d logits = dscale * (p - (1 - alpha) onehot(y) - alpha q_y), zero on ignored rows
    (alpha is 0 without q_rows)."""
    cdef int n, v
    cdef int64_t y
    cdef float mx, target_logit
    cdef double z, logz, row_ce, qdot
    cdef float *row
    cdef const float *q = NULL
    if q_rows == NULL:
        alpha = 0.0
    for n in range(N):
        row = logits + <Py_ssize_t>n * V
        y = targets[n]
        if y < 0:
            if backward:
                memset(row, 0, V * sizeof(float))
            continue
        mx = cllm_row_max(row, V)
        target_logit = row[y]
        qdot = 0.0   # sum_v q_y(v) (logit_v - mx), before exp overwrites the row
        if q_rows != NULL:
            q = q_rows + <Py_ssize_t>q_row_of[y] * V
            for v in range(V):
                qdot = qdot + q[v] * (row[v] - mx)
        z = cllm_row_exp_sum(row, V, mx)
        logz = log(z)
        row_ce = logz - (target_logit - mx)
        ce[0] += row_ce
        loss[0] += (1.0 - alpha) * row_ce + alpha * (logz - qdot)
        if backward:
            cllm_row_scale(row, V, <float>(dscale / z))
            if q_rows != NULL:
                cllm_row_axpy(row, q, V, -dscale * alpha)
            row[y] -= dscale * (1.0 - alpha)


def crystalline_targets(const int64_t[:, ::1] targets, const int32_t[:, ::1] ulam_xy,
                        int threads):
    """(q_rows (U, V) float32, q_row_of (V) int32): q_y of each distinct target y of a batch,
    rows computed in parallel, each by one thread; ulam_xy (V, 2) the points u(1) .. u(V)."""
    cdef int V = ulam_xy.shape[0], i
    cdef const int32_t[::1] ys = np.unique(np.asarray(targets)[np.asarray(targets) >= 0]
                                           ).astype(np.int32)
    cdef int U = ys.shape[0]
    row_of = np.full(V, -1, np.int32)
    row_of[np.asarray(ys)] = np.arange(U, dtype=np.int32)
    cdef float[:, ::1] q_rows = np.empty((max(U, 1), V), np.float32)
    for i in prange(U, nogil=True, num_threads=threads, schedule="dynamic"):
        crystalline_target_row(&q_rows[i, 0], ys[i], V, &ulam_xy[0, 0])
    return np.asarray(q_rows), row_of


# ----------------------------------------------------------------------------------------------
# one sphere: forward (and backward) over its sequences

# Logits (rows x V floats) computed at once: the head and the loss run over blocks of rows of
# at most this many logits (64 MiB). Each block's three products read (and BLAS packs) the
# whole (V, C) head and dhead again, so fewer blocks are faster; smaller ones save memory. The
# seed configuration's sphere (384 rows x 30000) is one block.
cdef enum:
    LOGIT_BLOCK = 1 << 24


cdef inline int logit_rows(int N, int V) noexcept nogil:
    """Rows per block of the head: N split into the fewest near-equal blocks of at most
    LOGIT_BLOCK logits (at least one row each). Never more than logit_capacity(N, V)."""
    cdef Py_ssize_t blocks = (<Py_ssize_t>N * V + LOGIT_BLOCK - 1) // LOGIT_BLOCK
    return max(1, <int>((N + blocks - 1) // blocks))


cdef inline int logit_capacity(int N, int V) noexcept nogil:
    """Rows of logits a workspace for up to N rows holds: the most that logit_rows(n, V)
    gives for any n <= N (a block has at most N rows, and at most LOGIT_BLOCK / V rounded
    up)."""
    return max(1, min(N, (LOGIT_BLOCK + V - 1) // V))


cdef double sphere_step(const Dims *d, const float *params, float *grads, Acts *a,
                        const int64_t *idx, const int64_t *targets, float *logits_out,
                        int nb, int T, int mode, float dscale, double *ce) noexcept nogil:
    """Run nb sequences (idx, targets: (nb*T)) as one block of N = nb*T rows.

    Returns the summed training loss (MODE_LOSS, MODE_GRADS) and leaves the summed plain
    cross-entropy in *ce; in MODE_GRADS overwrites this sphere's gradient buffer `grads`; in
    MODE_LOGITS copies the logits to logits_out (nb*T, V)."""
    cdef int C = d.C, F = d.F, V = d.V, H = d.H, L = d.L
    cdef int N = nb * T
    cdef Py_ssize_t NC = <Py_ssize_t>N * C, NF = <Py_ssize_t>N * F
    cdef int l
    cdef const Py_ssize_t *o
    cdef const float *res_in
    cdef double loss = 0.0

    encoder_forward(a.x0, idx, params + d.wte,
                    <const float *>NULL if d.angular else params + d.wpe, nb, T, C)
    res_in = a.x0
    for l in range(L):
        o = d.layer + l * N_LAYER_TENSORS
        layernorm_forward(a.ln, a.ln1_mean + l * N, a.ln1_rstd + l * N, res_in,
                          params + o[LN1_W], params + o[LN1_B], N, C)
        linear_forward(a.qkv + 3 * l * NC, a.ln, params + o[QKV_W], params + o[QKV_B],
                       N, C, 3 * C)
        if d.angular:
            angular_forward(a.qkv + 3 * l * NC, d.rot_cos, d.rot_sin, nb, T, C)
        if d.ulam:
            ulam_attention_forward(a.atty + l * NC, a.att, a.qkv + 3 * l * NC, d.ulam_start,
                                   d.ulam_keys, nb, T, C, H)
        else:
            attention_forward(a.atty + l * NC, a.att, a.qkv + 3 * l * NC, nb, T, C, H)
        linear_forward(a.res2 + l * NC, a.atty + l * NC, params + o[PROJ_W], params + o[PROJ_B],
                       N, C, C)
        cllm_row_add(a.res2 + l * NC, res_in, NC)
        layernorm_forward(a.ln, a.ln2_mean + l * N, a.ln2_rstd + l * N,
                          a.res2 + l * NC, params + o[LN2_W], params + o[LN2_B], N, C)
        linear_forward(a.fch + l * NF, a.ln, params + o[FC_W], params + o[FC_B], N, C, F)
        cllm_gelu_forward(a.gelu, a.fch + l * NF, NF)
        linear_forward(a.res3 + l * NC, a.gelu, params + o[FCPROJ_W], params + o[FCPROJ_B],
                       N, F, C)
        cllm_row_add(a.res3 + l * NC, a.res2 + l * NC, NC)
        res_in = a.res3 + l * NC
    layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, res_in, params + d.lnf_w, params + d.lnf_b,
                      N, C)
    if mode == MODE_LOGITS:
        # logits (N, V) = lnf (N, C) @ head^T, head (V, C)
        matmul(False, True, N, V, C, 1.0, a.lnf, C, params + d.head, C, 0.0, logits_out, V)
        return 0.0
    # The head, the loss and the head's backward, a block of rows at a time, so that the
    # (N, V) logits never exist whole: per block, logits (n, V) = lnf @ head^T, replaced by
    # d loss / d logits; dhead (V, C) += dlogits^T @ lnf ; dlnf (n, C) = dlogits @ head
    cdef int rows = logit_rows(N, V), r0 = 0, n
    ce[0] = 0.0
    while r0 < N:
        n = min(rows, N - r0)
        matmul(False, True, n, V, C, 1.0, a.lnf + r0 * C, C, params + d.head, C, 0.0,
               a.logits, V)
        crossentropy_forward_backward(a.logits, &loss, ce, targets + r0, n, V,
                                      d.q_rows if d.crystalline else NULL, d.q_row_of,
                                      d.alpha, dscale, mode == MODE_GRADS)
        if mode == MODE_GRADS:
            matmul(True, False, V, C, n, 1.0, a.logits, V, a.lnf + r0 * C, C,
                   0.0 if r0 == 0 else 1.0, grads + d.head, C)
            matmul(False, False, n, C, V, 1.0, a.logits, V, params + d.head, C, 0.0,
                   a.dln + r0 * C, C)
        r0 += n
    if mode == MODE_LOSS:
        return loss

    # ---- backward ----
    cdef float *dres = a.dres
    cdef const float *res_prev
    if not d.tied:
        memset(grads + d.wte, 0, <Py_ssize_t>V * C * sizeof(float))
    memset(dres, 0, NC * sizeof(float))
    layernorm_backward(dres, grads + d.lnf_w, grads + d.lnf_b, a.dln, res_in,
                       params + d.lnf_w, a.lnf_mean, a.lnf_rstd, a.datty, N, C)
    for l in range(L - 1, -1, -1):
        o = d.layer + l * N_LAYER_TENSORS
        res_prev = a.x0 if l == 0 else a.res3 + (l - 1) * NC
        # MLP: res3 = res2 + gelu(ln2 @ Wfc + bfc) @ Wfcproj + bfcproj
        cllm_gelu_forward(a.gelu, a.fch + l * NF, NF)
        linear_backward(a.dfch, grads + o[FCPROJ_W], grads + o[FCPROJ_B], dres, a.gelu,
                        params + o[FCPROJ_W], N, F, C)
        cllm_gelu_backward_inplace(a.dfch, a.fch + l * NF, NF)
        layernorm_forward(a.ln, a.ln2_mean + l * N, a.ln2_rstd + l * N, a.res2 + l * NC,
                          params + o[LN2_W], params + o[LN2_B], N, C)
        linear_backward(a.dln, grads + o[FC_W], grads + o[FC_B], a.dfch, a.ln,
                        params + o[FC_W], N, C, F)
        layernorm_backward(dres, grads + o[LN2_W], grads + o[LN2_B], a.dln, a.res2 + l * NC,
                           params + o[LN2_W], a.ln2_mean + l * N, a.ln2_rstd + l * N,
                           a.datty, N, C)
        # attention: res2 = res_prev + attn(ln1 @ Wqkv + bqkv) @ Wproj + bproj
        linear_backward(a.datty, grads + o[PROJ_W], grads + o[PROJ_B], dres, a.atty + l * NC,
                        params + o[PROJ_W], N, C, C)
        if d.ulam:
            ulam_attention_backward(a.dqkv, a.datt, a.att, a.datty, a.qkv + 3 * l * NC,
                                    d.ulam_start, d.ulam_keys, nb, T, C, H)
        else:
            attention_backward(a.dqkv, a.att, a.datty, a.qkv + 3 * l * NC, nb, T, C, H)
        if d.angular:
            angular_backward(a.dqkv, d.rot_cos, d.rot_sin, nb, T, C)
        layernorm_forward(a.ln, a.ln1_mean + l * N, a.ln1_rstd + l * N, res_prev,
                          params + o[LN1_W], params + o[LN1_B], N, C)
        linear_backward(a.dln, grads + o[QKV_W], grads + o[QKV_B], a.dqkv, a.ln,
                        params + o[QKV_W], N, C, 3 * C)
        layernorm_backward(dres, grads + o[LN1_W], grads + o[LN1_B], a.dln, res_prev,
                           params + o[LN1_W], a.ln1_mean + l * N, a.ln1_rstd + l * N,
                           a.datty, N, C)
    if not d.angular:
        memset(grads + d.wpe, 0, <Py_ssize_t>d.n_ctx * C * sizeof(float))
    encoder_backward(grads + d.wte, NULL if d.angular else grads + d.wpe, dres, idx, nb, T, C)
    return loss


# ----------------------------------------------------------------------------------------------
# workspaces

cdef class Workspace:
    """Activation buffers of one OS thread for sphere blocks of up to nb sequences of length T;
    with `backward`, the gradient scratch too. Made by new_workspace."""
    cdef int nb, T
    cdef bint backward
    cdef object buffer
    cdef Acts acts


cdef Workspace new_workspace(const Dims *d, int nb, int T, bint backward):
    cdef Py_ssize_t V = d.V, C = d.C, F = d.F, L = d.L, H = d.H
    cdef Py_ssize_t N = <Py_ssize_t>nb * T
    cdef Workspace ws = Workspace.__new__(Workspace)
    cdef float[::1] buf
    cdef float *p0
    cdef Acts *a = &ws.acts
    ws.nb, ws.T, ws.backward = nb, T, backward
    # attention scratch: the work of one (sequence, head) (attention.h), or for Ulam the
    # probabilities of one query's allowed pairs and, in the backward, their gradient
    cdef Py_ssize_t att = cllm_attention_work(T, C // H), datt = 0, t
    if d.ulam:
        att = 0
        for t in range(T):
            att = max(att, d.ulam_start[t + 1] - d.ulam_start[t])
        datt = att
    sizes = dict(x0=N * C, ln1_mean=L * N, ln1_rstd=L * N, qkv=L * N * 3 * C,
                 atty=L * N * C, res2=L * N * C, ln2_mean=L * N, ln2_rstd=L * N, fch=L * N * F,
                 res3=L * N * C, lnf=N * C, lnf_mean=N, lnf_rstd=N,
                 dln=N * C if backward else 0, region=0)
    scratch = dict(ln=N * C, gelu=N * F, att=att)
    if backward:
        scratch.update(dres=N * C, datty=N * C, dqkv=N * 3 * C, dfch=N * F, datt=datt)
    # every buffer starts on a 64-byte boundary (16 floats)
    at = {}
    pos = 0
    for name, n in scratch.items():
        at[name] = pos
        pos += -(-n // 16) * 16
    sizes["region"] = max(<Py_ssize_t>logit_capacity(N, V) * V, pos)
    pos = 0
    for name, n in sizes.items():
        at[name if name != "region" else "logits"] = pos
        pos += -(-n // 16) * 16
    ws.buffer = np.zeros(pos + 16, np.float32)
    buf = ws.buffer
    p0 = &buf[0]
    p0 += (16 - (<size_t>p0 // 4) % 16) % 16
    a.x0 = p0 + <Py_ssize_t>at["x0"]
    a.ln1_mean = p0 + <Py_ssize_t>at["ln1_mean"]
    a.ln1_rstd = p0 + <Py_ssize_t>at["ln1_rstd"]
    a.qkv = p0 + <Py_ssize_t>at["qkv"]
    a.atty = p0 + <Py_ssize_t>at["atty"]
    a.res2 = p0 + <Py_ssize_t>at["res2"]
    a.ln2_mean = p0 + <Py_ssize_t>at["ln2_mean"]
    a.ln2_rstd = p0 + <Py_ssize_t>at["ln2_rstd"]
    a.fch = p0 + <Py_ssize_t>at["fch"]
    a.res3 = p0 + <Py_ssize_t>at["res3"]
    a.lnf = p0 + <Py_ssize_t>at["lnf"]
    a.lnf_mean = p0 + <Py_ssize_t>at["lnf_mean"]
    a.lnf_rstd = p0 + <Py_ssize_t>at["lnf_rstd"]
    a.dln = p0 + <Py_ssize_t>at["dln"]
    a.logits = p0 + <Py_ssize_t>at["logits"]
    a.ln = a.logits + <Py_ssize_t>at["ln"]
    a.gelu = a.logits + <Py_ssize_t>at["gelu"]
    a.att = a.logits + <Py_ssize_t>at["att"]
    a.dres = a.logits + <Py_ssize_t>at.get("dres", 0)
    a.datty = a.logits + <Py_ssize_t>at.get("datty", 0)
    a.dqkv = a.logits + <Py_ssize_t>at.get("dqkv", 0)
    a.dfch = a.logits + <Py_ssize_t>at.get("dfch", 0)
    a.datt = a.logits + <Py_ssize_t>at.get("datt", 0)
    return ws


# ----------------------------------------------------------------------------------------------
# the gradient's ordered sum

# The gradient is the left-to-right sum over spheres of the sphere gradients (CRYSTALLINE.md
# section 1). Spheres are handed out in order to whichever thread is free, each computed into a
# slot (sphere 0 straight into the result); a finished sphere is added to the result as soon as
# every sphere before it has been, by the thread that finds it next in line. A thread is
# handed a sphere only with a free slot, so memory stays at one slot per thread plus the result
# whatever the sphere count, and a slow thread (a core shared with another process) holds up
# no one until the slots run out, where a barrier per round of spheres would stop everyone.
cdef struct OrderedSum:
    float *result            # (P) sphere 0's gradient, then the running sum
    float *slots             # (n_slots, P)
    Py_ssize_t P
    int spheres
    int next_sphere          # the next sphere to hand out
    int next_add             # the next sphere to add to the result (all before it are in)
    int adding               # whether a thread is adding finished spheres now
    int n_free
    int *free_slots          # (n_slots) a stack of the free slot numbers
    int *slot_of             # (spheres) the slot of each sphere handed out
    char *finished           # (spheres) whether its gradient is computed
    openmp.omp_lock_t lock


cdef int take_sphere(OrderedSum *r) noexcept nogil:
    """The next sphere, with a slot for its gradient unless it is sphere 0 (waiting for a free
    slot); -1 when every sphere has been handed out."""
    cdef int s
    while True:
        openmp.omp_set_lock(&r.lock)
        s = r.next_sphere
        if s >= r.spheres:
            openmp.omp_unset_lock(&r.lock)
            return -1
        if s == 0 or r.n_free > 0:
            r.next_sphere += 1
            if s > 0:
                r.n_free -= 1
                r.slot_of[s] = r.free_slots[r.n_free]
            openmp.omp_unset_lock(&r.lock)
            return s
        openmp.omp_unset_lock(&r.lock)
        usleep(200)    # every slot holds a sphere waiting for an earlier one: rare and short


cdef inline float *sphere_gradient(const OrderedSum *r, int s) noexcept nogil:
    """Where sphere s (taken by this thread) writes its gradient: the result for sphere 0."""
    return r.result if s == 0 else r.slots + r.slot_of[s] * r.P


cdef void finish_sphere(OrderedSum *r, int s) noexcept nogil:
    """Mark sphere s computed and, unless another thread is doing it, add to the result every
    finished sphere that is next in line, freeing its slot."""
    cdef int slot
    openmp.omp_set_lock(&r.lock)
    r.finished[s] = 1
    if not r.adding:
        r.adding = 1
        while r.next_add < r.spheres and r.finished[r.next_add]:
            if r.next_add > 0:
                slot = r.slot_of[r.next_add]
                openmp.omp_unset_lock(&r.lock)
                cllm_row_add(r.result, r.slots + slot * r.P, r.P)
                openmp.omp_set_lock(&r.lock)
                r.free_slots[r.n_free] = slot
                r.n_free += 1
            r.next_add += 1
        r.adding = 0
    openmp.omp_unset_lock(&r.lock)


# ----------------------------------------------------------------------------------------------
# the owner of the model's state

# Most OS threads one call runs on (the size of the per-thread workspace table).
cdef enum:
    MAX_THREADS = 1024
    CACHED_SHAPES = 4     # workspace sets kept: a run uses a few batch shapes (train, eval, last)

# Elements per unit of parallel optimizer work (norm, AdamW): fixed, so that sums and the split
# of the work never depend on the thread count.
cdef enum:
    CHUNK = 65536


cdef class Weights    # the matrices as generation reads them (below)


cdef class Transformer:
    """A GPT-2 with the crystalline switches, as the core runs it: built once from a ModelConfig
    and the flat float32 parameter buffer, it holds the dimensions, the crystalline tables, the
    layer-offset table, the thread workspaces and the gradient buffers, and its methods are the
    model's operations.

    Spheres (CRYSTALLINE.md section 1): sequence b of a batch belongs to sphere b mod S; a sphere
    is run start to end by one thread with single-threaded BLAS, so its result does not depend
    on the thread. The gradient is the left-to-right sum over spheres 0..S-1 of the sphere
    gradients, added as the spheres finish (OrderedSum): memory for one gradient per thread plus
    the result, whatever S, and the same sums, bit for bit, for every thread count."""
    cdef Dims d
    cdef readonly object config
    cdef readonly object params                 # (P) float32 flat buffer (read-only if mapped)
    cdef const float *p
    cdef Py_ssize_t P
    cdef Py_ssize_t[:, ::1] layer_offsets       # (L, N_LAYER_TENSORS)
    cdef float[:, ::1] rot_cos, rot_sin         # (n_ctx, C/2)
    cdef int32_t[::1] ulam_start, ulam_keys
    cdef int32_t[:, ::1] ulam_xy                # (V, 2)
    cdef Py_ssize_t[:, ::1] adamw_ranges        # (R, 3) start, stop, decay flag
    cdef float[::1] grad_buf                    # (P) the reduced gradient
    cdef float[:, ::1] sphere_grads             # (threads, P) slots of spheres being summed
    cdef list workspace_sets                    # [(nb, T, backward, [Workspace per thread])]
    cdef readonly Weights quantized             # bf16 or int8 matrices for generation, or None

    def __init__(self, config, params):
        from .crystal import angular_tables, ulam_neighbours, ulam_points
        layout, size = config.layout()
        params = np.asarray(params)
        if params.dtype != np.float32 or params.shape != (size,) \
                or not params.flags.c_contiguous:
            raise ValueError(f"the flat parameter buffer must be contiguous float32 of shape "
                             f"({size},), got {params.dtype} {params.shape}")
        cdef const float[::1] view = params
        cdef Dims *d = &self.d
        self.config, self.params, self.p, self.P = config, params, &view[0], size
        d.V, d.C, d.F, d.L, d.H = (config.vocab_size, config.n_embd, config.n_inner,
                                   config.n_layer, config.n_head)
        d.n_ctx, d.tied = config.n_ctx, config.tie_embeddings
        offset = {name: off for name, (off, _) in layout.items()}
        d.wte, d.lnf_w, d.lnf_b = offset["wte"], offset["ln_f.weight"], offset["ln_f.bias"]
        d.wpe = offset.get("wpe", -1)
        d.head = offset["wte" if config.tie_embeddings else "lm_head.weight"]
        layer_names = {name for name in layout if name.startswith("h.")}
        table = [[offset.get(f"h.{l}.{t}", -1) for t in LAYER_TENSOR_NAMES]
                 for l in range(config.n_layer)]
        if sum(map(len, table)) != len(layer_names) or -1 in np.ravel(table):
            raise ValueError(f"the layer tensors of the configuration do not match the core's "
                             f"LAYER_TENSOR_NAMES {LAYER_TENSOR_NAMES}")
        self.layer_offsets = np.array(table, dtype=np.intp).reshape(config.n_layer,
                                                                     N_LAYER_TENSORS)
        d.layer = &self.layer_offsets[0, 0]
        d.angular = config.position == "angular"
        d.ulam = config.attention == "ulam"
        d.crystalline = config.loss == "crystalline"
        d.alpha = config.crystalline_alpha
        d.rot_cos = d.rot_sin = NULL
        d.ulam_start = d.ulam_keys = NULL
        d.q_rows, d.q_row_of = NULL, NULL
        if d.angular:
            cos, sin = angular_tables(config.n_ctx, config.n_head, config.head_dim)
            self.rot_cos = cos.reshape(config.n_ctx, d.C // 2).astype(np.float32)
            self.rot_sin = sin.reshape(config.n_ctx, d.C // 2).astype(np.float32)
            d.rot_cos, d.rot_sin = &self.rot_cos[0, 0], &self.rot_sin[0, 0]
        if d.ulam:
            self.ulam_start, self.ulam_keys = ulam_neighbours(config.n_ctx, config.ulam_radius)
            d.ulam_start, d.ulam_keys = &self.ulam_start[0], &self.ulam_keys[0]
        if d.crystalline:
            self.ulam_xy = ulam_points(config.vocab_size)
        # AdamW work units: CHUNK-long pieces of each tensor, decayed where it is 2-D
        rows = [(start, min(start + CHUNK, off + math.prod(shape)), int(len(shape) >= 2))
                for name, (off, shape) in layout.items()
                for start in range(off, off + math.prod(shape), CHUNK)]
        self.adamw_ranges = np.array(rows, dtype=np.intp).reshape(-1, 3)
        self.grad_buf = np.zeros(size, np.float32)
        self.sphere_grads = np.zeros((0, size), np.float32)
        self.workspace_sets = []
        self.quantized = None

    @property
    def grad(self):
        """(P) the gradient of the last loss_and_grads, overwritten by the next."""
        return np.asarray(self.grad_buf)

    cdef list workspaces(self, int nb, int T, int threads, bint backward):
        """`threads` workspaces for sphere blocks of nb sequences of length T: a cached set
        that fits (a backward set serves forward passes too), else a new one."""
        cdef Workspace ws
        for entry in self.workspace_sets:
            if entry[0] >= nb and entry[1] == T and (entry[2] or not backward) \
                    and len(entry[3]) >= threads:
                return entry[3]
        if len(self.workspace_sets) >= CACHED_SHAPES:
            self.workspace_sets.pop(0)
        spaces = [new_workspace(&self.d, nb, T, backward) for _ in range(threads)]
        self.workspace_sets.append((nb, T, backward, spaces))
        return spaces

    cdef tuple run(self, const int64_t[:, ::1] idx, const int64_t[:, ::1] targets,
                   float[:, :, ::1] logits_out, int spheres, int threads, int mode,
                   int first=0, int last=-1, float[:, ::1] keep=None):
        """The spheres of a batch: (losses, n_targets), losses (S, 2) float64 holding each
        sphere's summed training loss and plain cross-entropy, n_targets the batch's targets
        that are not -1. MODE_GRADS leaves the gradient (their left-to-right sum) in grad_buf;
        MODE_LOGITS writes logits_out (B, T, V).

        With `keep` (MODE_GRADS only), only spheres first..last-1 run (a process's block at
        the recursive level), sphere s writing its own gradient to keep[s - first], unsummed."""
        from .threads import blas_single_threaded
        cdef Dims d = self.d          # a copy: this batch's crystalline rows go into it
        if self.quantized is not None:
            raise ValueError(f"this model's matrices are {self.quantized.format}, for generation "
                             f"only: the training forward and backward need float32 weights")
        cdef int B = idx.shape[0], T = idx.shape[1]
        cdef int active = min(spheres, B)
        if keep is not None:
            first, last = max(0, first), min(last, active)
        else:
            first, last = 0, active
        cdef int nbmax = (B + spheres - 1) // spheres
        cdef int s, j, r, b, k, w0, seg, nseg, tid
        cdef Py_ssize_t n_targets = 0, lo, hi, n
        threads = max(1, min(threads, max(1, last - first), MAX_THREADS))
        if mode != MODE_LOGITS:
            for b in range(B):
                for j in range(T):
                    n_targets += targets[b, j] >= 0
            if n_targets == 0:
                raise ValueError("targets has no token to predict: every entry is -1")
        cdef const float[:, ::1] q_rows
        cdef const int32_t[::1] q_row_of
        if d.crystalline and mode != MODE_LOGITS:
            q_rows, q_row_of = crystalline_targets(targets, self.ulam_xy, threads)
            d.q_rows, d.q_row_of = &q_rows[0, 0], &q_row_of[0]
        cdef Workspace ws
        cdef Acts *acts_of_thread[MAX_THREADS]
        spaces = self.workspaces(nbmax, T, threads, mode == MODE_GRADS)
        for j in range(threads):
            ws = spaces[j]
            acts_of_thread[j] = &ws.acts
        if mode == MODE_GRADS and keep is None and self.sphere_grads.shape[0] < threads:
            self.sphere_grads = None     # drop the smaller set before allocating the larger
            self.sphere_grads = np.empty((threads, self.P), np.float32)
        cdef double[:, ::1] losses = np.zeros((spheres, 2), dtype=np.float64)
        # a sphere's sequences are gathered contiguously: (S, nbmax, T) blocks
        cdef int64_t[:, ::1] sphere_idx = np.empty((spheres, nbmax * T), dtype=np.int64)
        cdef int64_t[:, ::1] sphere_tgt = np.empty((spheres, nbmax * T), dtype=np.int64)
        cdef int[::1] sphere_nb = np.zeros(spheres, dtype=np.int32)
        for b in range(B):
            s = b % spheres
            j = b // spheres
            sphere_idx[s, j * T:(j + 1) * T] = idx[b]
            if mode != MODE_LOGITS:
                sphere_tgt[s, j * T:(j + 1) * T] = targets[b]
            sphere_nb[s] += 1
        # logits come out per sphere in (S, nbmax*T, V) then go back to batch order
        cdef float[:, :, ::1] sphere_logits = np.empty((1, 1, 1), dtype=np.float32)
        if mode == MODE_LOGITS:
            sphere_logits = np.empty((active, nbmax * T, d.V), dtype=np.float32)
        cdef float dscale = (1.0 / n_targets) if n_targets > 0 else 0.0
        cdef float *grads = NULL
        cdef OrderedSum order
        cdef int[::1] order_free = np.arange(threads, dtype=np.intc)
        cdef int[::1] order_slot_of = np.full(active, -1, dtype=np.intc)
        cdef char[::1] order_finished = np.zeros(active, dtype=np.byte)
        if mode == MODE_GRADS and keep is None:
            memset(&order, 0, sizeof(OrderedSum))
            order.result, order.slots = &self.grad_buf[0], &self.sphere_grads[0, 0]
            order.P, order.spheres, order.n_free = self.P, active, threads
            order.free_slots, order.slot_of = &order_free[0], &order_slot_of[0]
            order.finished = &order_finished[0]
            openmp.omp_init_lock(&order.lock)
        with blas_single_threaded():
            if mode != MODE_GRADS or keep is not None:
                for s in prange(first, last, nogil=True, num_threads=threads,
                                schedule="dynamic", chunksize=1):
                    tid = threadid()
                    losses[s, 0] = sphere_step(
                        &d, self.p, &keep[s - first, 0] if keep is not None else NULL,
                        acts_of_thread[tid], &sphere_idx[s, 0], &sphere_tgt[s, 0],
                        &sphere_logits[s, 0, 0] if mode == MODE_LOGITS else NULL,
                        sphere_nb[s], T, mode, dscale, &losses[s, 1])
            else:
                with nogil, parallel(num_threads=threads):
                    s = take_sphere(&order)
                    while s >= 0:
                        grads = sphere_gradient(&order, s)
                        losses[s, 0] = sphere_step(
                            &d, self.p, grads, acts_of_thread[threadid()], &sphere_idx[s, 0],
                            &sphere_tgt[s, 0], NULL, sphere_nb[s], T, mode, dscale,
                            &losses[s, 1])
                        finish_sphere(&order, s)
                        s = take_sphere(&order)
                openmp.omp_destroy_lock(&order.lock)
                if order.next_add != active:
                    raise RuntimeError("the ordered gradient sum missed a sphere")
        if mode == MODE_LOGITS:
            for b in range(B):
                s = b % spheres
                j = b // spheres
                logits_out[b] = sphere_logits[s, j * T:(j + 1) * T]
        return np.asarray(losses), n_targets

    def forward(self, const int64_t[:, ::1] idx, float[:, :, ::1] logits, int spheres,
                int threads):
        """logits (B, T, V) <- the logits of token ids idx (B, T)."""
        self.run(idx, idx, logits, spheres, threads, MODE_LOGITS)

    def loss(self, const int64_t[:, ::1] idx, const int64_t[:, ::1] targets, int spheres,
             int threads):
        """(mean training loss, mean plain cross-entropy) over the targets that are not -1;
        the two agree unless loss="crystalline"."""
        return mean_losses(*self.run(idx, targets, None, spheres, threads, MODE_LOSS))

    def loss_and_grads(self, const int64_t[:, ::1] idx, const int64_t[:, ::1] targets,
                       int spheres, int threads):
        """As loss, and the training loss's gradient left in `grad`."""
        return mean_losses(*self.run(idx, targets, None, spheres, threads, MODE_GRADS))

    def sphere_losses_and_grads(self, const int64_t[:, ::1] idx,
                                const int64_t[:, ::1] targets, int spheres, int first,
                                int last, int threads, float[:, ::1] keep):
        """Spheres first..last-1 of the S of a batch, a process's block at the recursive
        level: sphere s writes its gradient to keep[s - first]. Returns (losses, n_targets):
        losses (S, 2) float64 with the summed training loss and plain cross-entropy of those
        spheres in their rows (zero elsewhere), n_targets those of the whole batch. Spheres
        holding no sequence (s >= B) do not run and leave their keep rows as they were."""
        if keep.shape[0] < last - first or keep.shape[1] != self.P:
            raise ValueError(f"keep must have shape ({last - first}, {self.P})")
        return self.run(idx, targets, None, spheres, threads, MODE_GRADS, first, last, keep)

    def grad_norm(self, int threads):
        """Global L2 norm of `grad`."""
        return grad_norm(self.grad_buf, threads)

    def adamw_step(self, const float[::1] grads, float[::1] m, float[::1] v, float lr,
                   float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                   int step, int threads):
        """One AdamW step (number `step`, from 1) of the parameters with the gradient `grads`
        (P) times grad_scale (< 1 clips), weight decay on the 2-D tensors; m, v (P) are the
        moments."""
        adamw_update(self.params, grads, m, v, self.adamw_ranges, lr, beta1, beta2, eps,
                     weight_decay, grad_scale, step, threads)

    def use_weights(self, str format, list matrices):
        """Generate from these matrices (see Weights) instead of the float32 parameters: the
        model becomes inference-only, its flat buffer holding the small tensors alone."""
        self.quantized = Weights(self, format, matrices)

    @property
    def weight_format(self):
        return "float32" if self.quantized is None else self.quantized.format

    def decoder(self, int threads, int batch=1):
        """A fresh generation state (key/value caches of `batch` sequences) over these
        parameters."""
        cdef Weights weights = self.quantized
        if weights is None:
            views = self.config.views(self.params)
            head = views["wte" if self.config.tie_embeddings else "lm_head.weight"]
            weights = Weights(self, "float32",
                              [views[f"h.{l}.{name}"] for l in range(self.d.L)
                               for name in DECODER_MATRICES]
                              + [head, views["wte"]])
        return Decoder(self, weights, batch, threads)


def mean_losses(const double[:, ::1] losses, Py_ssize_t n_targets):
    """(mean training loss, mean plain cross-entropy): the spheres' sums added in sphere order
    (left to right, as CRYSTALLINE.md section 1 defines), over the number of target tokens."""
    cdef double total = 0.0, ce = 0.0
    cdef Py_ssize_t s
    for s in range(losses.shape[0]):
        total += losses[s, 0]
        ce += losses[s, 1]
    return (total / n_targets, ce / n_targets) if n_targets else (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# optimizer

def grad_norm(const float[::1] grads, int threads):
    """Global L2 norm, summed in float64 over fixed chunks and then in chunk order."""
    cdef Py_ssize_t P = grads.shape[0]
    cdef Py_ssize_t nchunks = (P + CHUNK - 1) // CHUNK, c, lo, hi
    cdef double[::1] partial = np.zeros(nchunks, dtype=np.float64)
    for c in prange(nchunks, nogil=True, num_threads=threads, schedule="static"):
        lo = c * CHUNK
        hi = min(lo + CHUNK, P)
        partial[c] = cllm_row_sumsq(&grads[lo], hi - lo)
    cdef double total = 0.0
    for c in range(nchunks):
        total += partial[c]
    return sqrt(total)


cdef void adamw_update(float[::1] params, const float[::1] grads, float[::1] m, float[::1] v,
                       const Py_ssize_t[:, ::1] ranges, float lr, float beta1, float beta2,
                       float eps, float weight_decay, float grad_scale, int step,
                       int threads) except *:
    """One AdamW step over the flat buffer, fused: gradient scaling (clipping), moment updates,
    bias correction, decoupled weight decay on the ranges whose flag is 1.

    ranges: (R, 3) rows of (start, stop, decay flag) covering the parameters, each at most
    CHUNK long so that threads share the work evenly."""
    cdef Py_ssize_t R = ranges.shape[0], i
    cdef float bc1 = 1.0 - beta1 ** step, bc2 = 1.0 - beta2 ** step
    if not (grads.shape[0] == m.shape[0] == v.shape[0] == params.shape[0]):
        raise ValueError("AdamW: gradient and moments must have the parameters' length")
    for i in prange(R, nogil=True, num_threads=threads, schedule="static"):
        cllm_adamw_range(&params[ranges[i, 0]], &grads[ranges[i, 0]], &m[ranges[i, 0]],
                         &v[ranges[i, 0]], ranges[i, 1] - ranges[i, 0], lr, beta1, beta2, eps,
                         weight_decay if ranges[i, 2] else 0.0, grad_scale, bc1, bc2)


# ----------------------------------------------------------------------------------------------
# Each layer on its own, for the tests that check it against a float64 reference.

def layer_layernorm(const float[:, ::1] inp, const float[::1] w, const float[::1] b):
    """-> out (N, C), mean (N), rstd (N)"""
    cdef int N = inp.shape[0], C = inp.shape[1]
    cdef float[:, ::1] out = np.empty((N, C), np.float32)
    cdef float[::1] mean = np.empty(N, np.float32), rstd = np.empty(N, np.float32)
    layernorm_forward(&out[0, 0], &mean[0], &rstd[0], &inp[0, 0], &w[0], &b[0], N, C)
    return np.asarray(out), np.asarray(mean), np.asarray(rstd)


def layer_layernorm_backward(const float[:, ::1] dout, const float[:, ::1] inp,
                             const float[::1] w, const float[::1] mean, const float[::1] rstd):
    """-> dinp (N, C), dw (C), db (C)"""
    cdef int N = inp.shape[0], C = inp.shape[1]
    cdef float[:, ::1] dinp = np.zeros((N, C), np.float32)
    cdef float[::1] dw = np.empty(C, np.float32), db = np.empty(C, np.float32)
    cdef float[::1] scratch = np.empty(C, np.float32)
    layernorm_backward(&dinp[0, 0], &dw[0], &db[0], &dout[0, 0], &inp[0, 0], &w[0], &mean[0],
                       &rstd[0], &scratch[0], N, C)
    return np.asarray(dinp), np.asarray(dw), np.asarray(db)


def layer_linear(const float[:, ::1] inp, const float[:, ::1] w, const float[::1] b):
    """-> out (N, OC) = inp (N, IC) @ w (IC, OC) + b"""
    cdef int N = inp.shape[0], IC = inp.shape[1], OC = w.shape[1]
    cdef float[:, ::1] out = np.empty((N, OC), np.float32)
    linear_forward(&out[0, 0], &inp[0, 0], &w[0, 0], &b[0], N, IC, OC)
    return np.asarray(out)


def layer_linear_backward(const float[:, ::1] dout, const float[:, ::1] inp,
                          const float[:, ::1] w):
    """-> dinp (N, IC), dw (IC, OC), db (OC)"""
    cdef int N = inp.shape[0], IC = inp.shape[1], OC = w.shape[1]
    cdef float[:, ::1] dinp = np.empty((N, IC), np.float32)
    cdef float[:, ::1] dw = np.empty((IC, OC), np.float32)
    cdef float[::1] db = np.empty(OC, np.float32)
    linear_backward(&dinp[0, 0], &dw[0, 0], &db[0], &dout[0, 0], &inp[0, 0], &w[0, 0], N, IC, OC)
    return np.asarray(dinp), np.asarray(dw), np.asarray(db)


def layer_gelu(const float[::1] inp):
    cdef float[::1] out = np.empty(inp.shape[0], np.float32)
    cllm_gelu_forward(&out[0], &inp[0], inp.shape[0])
    return np.asarray(out)


def layer_gelu_backward(const float[::1] dout, const float[::1] inp):
    cdef float[::1] dinp = np.array(dout, np.float32)
    cllm_gelu_backward_inplace(&dinp[0], &inp[0], inp.shape[0])
    return np.asarray(dinp)


def layer_attention(const float[:, :, ::1] qkv, int n_head):
    """qkv (nb, T, 3C) -> out (nb, T, C), att (nb, H, T, T) the probabilities"""
    cdef int nb = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3, hd = C // n_head, b, h
    cdef float[:, :, ::1] out = np.empty((nb, T, C), np.float32)
    cdef float[:, :, :, ::1] att = np.empty((nb, n_head, T, T), np.float32)
    cdef float[::1] work = np.empty(cllm_attention_work(T, hd), np.float32)
    attention_forward(&out[0, 0, 0], &work[0], &qkv[0, 0, 0], nb, T, C, n_head)
    for b in range(nb):
        for h in range(n_head):
            cllm_attention_probs(&att[b, h, 0, 0], &qkv[b, 0, h * hd], &qkv[b, 0, C + h * hd],
                                 3 * C, T, hd, &work[0])
    return np.asarray(out), np.asarray(att)


def layer_attention_backward(const float[:, :, ::1] dout, const float[:, :, ::1] qkv,
                             int n_head):
    """-> dqkv (nb, T, 3C)"""
    cdef int nb = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3
    cdef float[:, :, ::1] dqkv = np.empty((nb, T, 3 * C), np.float32)
    cdef float[::1] work = np.empty(cllm_attention_work(T, C // n_head), np.float32)
    attention_backward(&dqkv[0, 0, 0], &work[0], &dout[0, 0, 0], &qkv[0, 0, 0], nb, T, C, n_head)
    return np.asarray(dqkv)


def layer_crossentropy(const float[:, ::1] logits, const int64_t[::1] targets, float dscale):
    """-> (summed loss over targets != -1, dlogits = dscale * (softmax - onehot))"""
    cdef float[:, ::1] work = np.array(logits, np.float32)
    cdef double loss = 0.0, ce = 0.0
    crossentropy_forward_backward(&work[0, 0], &loss, &ce, &targets[0], work.shape[0],
                                  work.shape[1], NULL, NULL, 0.0, dscale, True)
    return loss, np.asarray(work)


def layer_angular(const float[:, :, ::1] qkv, const float[:, ::1] cos, const float[:, ::1] sin):
    """qkv (nb, T, 3C) -> a copy with q and k rotated; cos, sin (n_ctx, C/2)"""
    cdef float[:, :, ::1] out = np.array(qkv, np.float32)
    angular_forward(&out[0, 0, 0], &cos[0, 0], &sin[0, 0], out.shape[0], out.shape[1],
                    out.shape[2] // 3)
    return np.asarray(out)


def layer_angular_backward(const float[:, :, ::1] dqkv, const float[:, ::1] cos,
                           const float[:, ::1] sin):
    """dqkv (nb, T, 3C) of the rotated q, k -> that of q, k"""
    cdef float[:, :, ::1] out = np.array(dqkv, np.float32)
    angular_backward(&out[0, 0, 0], &cos[0, 0], &sin[0, 0], out.shape[0], out.shape[1],
                     out.shape[2] // 3)
    return np.asarray(out)


def layer_ulam_attention(const float[:, :, ::1] qkv, int n_head, const int32_t[::1] start,
                         const int32_t[::1] keys):
    """qkv (nb, T, 3C) -> out (nb, T, C), att (nb, H, start[T]) the probabilities of the
    allowed pairs"""
    cdef int nb = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3, b, h, t
    cdef float[:, :, ::1] out = np.empty((nb, T, C), np.float32)
    cdef float[:, :, ::1] att = np.empty((nb, n_head, start[T]), np.float32)
    ulam_attention_forward(&out[0, 0, 0], &att[0, 0, 0], &qkv[0, 0, 0], &start[0], &keys[0],
                           nb, T, C, n_head)
    for b in range(nb):
        for h in range(n_head):
            for t in range(T):
                ulam_probs(&att[b, h, start[t]], &qkv[b, 0, 0], t, &keys[start[t]],
                           start[t + 1] - start[t], C, C // n_head, h)
    return np.asarray(out), np.asarray(att)


def layer_ulam_attention_backward(const float[:, :, ::1] dout, const float[:, :, ::1] qkv,
                                  int n_head, const int32_t[::1] start,
                                  const int32_t[::1] keys):
    """-> dqkv (nb, T, 3C)"""
    cdef int nb = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3
    cdef float[::1] datt = np.empty(T, np.float32), att = np.empty(T, np.float32)
    cdef float[:, :, ::1] dqkv = np.empty((nb, T, 3 * C), np.float32)
    ulam_attention_backward(&dqkv[0, 0, 0], &datt[0], &att[0], &dout[0, 0, 0], &qkv[0, 0, 0],
                            &start[0], &keys[0], nb, T, C, n_head)
    return np.asarray(dqkv)


def layer_crystalline(const float[:, ::1] logits, const int64_t[::1] targets,
                      const int32_t[:, ::1] ulam_xy, float alpha, float dscale):
    """-> (summed crystalline loss, summed plain cross-entropy, its dlogits times dscale) over
    the targets != -1; ulam_xy (V, 2) the points u(1) .. u(V)"""
    cdef float[:, ::1] work = np.array(logits, np.float32)
    cdef const float[:, ::1] q_rows
    cdef const int32_t[::1] q_row_of
    cdef double loss = 0.0, ce = 0.0
    q_rows, q_row_of = crystalline_targets(np.asarray(targets)[None, :], ulam_xy, 1)
    crossentropy_forward_backward(&work[0, 0], &loss, &ce, &targets[0], work.shape[0],
                                  work.shape[1], &q_rows[0, 0], &q_row_of[0], alpha, dscale,
                                  True)
    return loss, ce, np.asarray(work)


# ----------------------------------------------------------------------------------------------
# int8 (Q8) and bfloat16 matrix products for generation (quant.h): W stored by output row,
# (OC, IC), y = x @ W.T + bias

cdef enum:
    FORMAT_F32 = 0
    FORMAT_BF16 = 1
    FORMAT_INT8 = 2


cdef struct Matrix:
    # One matrix as generation reads it: y (M, OC) = x (M, IC) @ W + bias, in one format.
    int format, IC, OC
    int K                     # int8: IC rounded up to a multiple of CLLM_QK
    const float *f32          # float32: (IC, OC), the training layout
    const float *f32_rows     # float32 rows by output, (OC, IC): the head as it is stored
    const uint16_t *bf16      # bf16: (OC, IC), rows by output
    const int8_t *q8          # int8: (OC, K), rows by output
    const float *scale        # int8: (OC, K / CLLM_QK), one scale per block of CLLM_QK weights
    const float *bias         # (OC) or NULL


# Units of parallel work of a product: OC cut into this many blocks of rows, whatever the
# thread count. Each output is computed whole by one call, so the split only sets the speed:
# a block is read as 4 streams (quant.h), which want long blocks, and 8 keeps 1, 2, 4 and 8
# threads evenly loaded.
cdef enum:
    LINEAR_BLOCKS = 8


cdef inline int q8_width(int IC) noexcept nogil:
    """K: IC rounded up to whole blocks"""
    return (IC + CLLM_QK - 1) // CLLM_QK * CLLM_QK


cdef void rows_product(float *y, const float *x, int M, const Matrix *m, int8_t *xq,
                      float *xs, float *xt, int threads) noexcept nogil:
    """y (M, OC) = x (M, IC) @ W.T + bias for W stored rows by output (int8, bf16 or float32
    rows). x is first put in the tile order of the product: for int8 quantized into xq (M, K),
    xs (M, K / 32), else copied into xt (M, IC rounded up to 8). The outputs are cut into
    LINEAR_BLOCKS blocks that the threads take as they come free (a thread that shares its
    core with another process then holds up one block, not a fixed share of the work)."""
    cdef int c, o0, o1, r
    with parallel(num_threads=threads):
        for r in prange(M, schedule="static"):
            if m.format == FORMAT_INT8:
                cllm_q8_quantize_activation(xq, xs, x, M, m.IC, m.K, r)
            else:
                cllm_float_tile_order(xt, x, M, m.IC, r)
        for c in prange(LINEAR_BLOCKS, schedule="dynamic"):
            o0 = m.OC * c // LINEAR_BLOCKS
            o1 = m.OC * (c + 1) // LINEAR_BLOCKS
            if m.format == FORMAT_INT8:
                cllm_q8_matmul(y, m.OC, m.bias, xq, xs, M, m.q8, m.scale, m.K, o0, o1)
            elif m.format == FORMAT_BF16:
                cllm_bf16_matmul(y, m.OC, m.bias, xt, M, m.IC, m.bf16, o0, o1)
            else:
                cllm_f32_matmul(y, m.OC, m.bias, xt, M, m.IC, m.f32_rows, o0, o1)


def quantize_q8(const float[:, ::1] x):
    """x (M, IC) -> q int8 (M, K), scale float32 (M, K // 32), K = IC rounded up to 32: per
    block of 32, scale = max |x| / 127 and q = x / scale rounded to nearest even."""
    cdef int M = x.shape[0], IC = x.shape[1], K = q8_width(IC)
    q = np.zeros((M, K), np.int8)
    scale = np.zeros((M, K // CLLM_QK), np.float32)
    cdef int8_t[:, ::1] qv = q
    cdef float[:, ::1] sv = scale
    if M and IC:
        with nogil:
            cllm_q8_quantize_rows(&qv[0, 0], &sv[0, 0], &x[0, 0], M, IC, K)
    return q, scale


def dequantize_q8(const int8_t[:, ::1] q, const float[:, ::1] scale, int IC):
    """q (M, K), scale (M, K // 32) -> x (M, IC) = q * scale, the padding dropped: the rows
    of a Q8 matrix back in float32 (what the embedding lookup of a Q8 table does)."""
    cdef int M = q.shape[0], K = q.shape[1], m
    if IC < 0 or K != q8_width(IC) or scale.shape[0] != M or scale.shape[1] != K // CLLM_QK:
        raise ValueError(f"dequantize_q8: q ({M}, {K}) and scale ({scale.shape[0]}, "
                         f"{scale.shape[1]}) do not hold rows of width {IC}")
    out = np.zeros((M, IC), np.float32)
    cdef float[:, ::1] ov = out
    if M and IC:
        with nogil:
            for m in range(M):
                cllm_q8_dequantize_row(&ov[m, 0], &q[m, 0], &scale[m, 0], IC)
    return out


cdef linear_rows(const float[:, ::1] x, Matrix *m, const float[::1] bias, int threads):
    """y (M, OC) = x @ W.T + bias through rows_product, with the scratch of m's format"""
    cdef int M = x.shape[0]
    y = np.zeros((M, m.OC), np.float32)
    if M == 0 or m.OC == 0:
        return y
    cdef bint int8 = m.format == FORMAT_INT8
    cdef float[:, ::1] yv = y
    cdef int8_t[::1] xq = np.empty(M * m.K if int8 else 1, np.int8)
    cdef float[::1] xs = np.empty(M * (m.K // CLLM_QK) if int8 else 1, np.float32)
    cdef float[::1] xt = np.empty(1 if int8 else M * ((m.IC + 7) // 8 * 8), np.float32)
    if bias is not None:
        m.bias = &bias[0]
    with nogil:
        rows_product(&yv[0, 0], &x[0, 0], M, m, &xq[0], &xs[0], &xt[0], threads)
    return y


cdef check_linear(int IC, int OC, bias, int threads):
    if IC < 1:
        raise ValueError("linear: the input rows are empty (IC = 0)")
    if bias is not None and bias.shape[0] != OC:
        raise ValueError(f"linear: bias has {bias.shape[0]} elements for {OC} outputs")
    if threads < 1:
        raise ValueError(f"linear: threads must be at least 1, not {threads}")


def q8_linear(const float[:, ::1] x, const int8_t[:, ::1] q, const float[:, ::1] scale,
              const float[::1] bias, int threads):
    """y (M, OC) = x (M, IC) @ W.T + bias with W given as Q8 (q (OC, K), scale (OC, K // 32),
    quantize_q8 of W): x is quantized the same way, then each block product is an exact int32
    dot product times the two scales. bias may be None. The result is the same bits for every
    thread count."""
    cdef int IC = x.shape[1], OC = q.shape[0], K = q.shape[1], nb = K // CLLM_QK
    check_linear(IC, OC, bias, threads)
    if K != q8_width(IC) or scale.shape[0] != OC or scale.shape[1] != nb:
        raise ValueError(f"q8_linear: q ({OC}, {K}) and scale ({scale.shape[0]}, "
                         f"{scale.shape[1]}) do not fit inputs of width {IC} "
                         f"(expected K = {q8_width(IC)})")
    cdef Matrix m
    memset(&m, 0, sizeof(Matrix))
    m.format, m.IC, m.OC, m.K = FORMAT_INT8, IC, OC, K
    if OC:
        m.q8, m.scale = &q[0, 0], &scale[0, 0]
    return linear_rows(x, &m, bias, threads)


def bf16_round(const float[::1] x):
    """float32 -> bfloat16 bits (uint16), rounded to nearest even; a NaN stays a NaN."""
    out = np.empty(x.shape[0], np.uint16)
    cdef uint16_t[::1] ov = out
    if x.shape[0]:
        with nogil:
            cllm_bf16_round(&ov[0], &x[0], x.shape[0])
    return out


def bf16_to_float(const uint16_t[::1] w):
    """bfloat16 bits -> float32 values"""
    out = np.empty(w.shape[0], np.float32)
    cdef float[::1] ov = out
    if w.shape[0]:
        with nogil:
            cllm_bf16_to_float(&ov[0], &w[0], w.shape[0])
    return out


def bf16_linear(const float[:, ::1] x, const uint16_t[:, ::1] w, const float[::1] bias,
                int threads):
    """y (M, OC) = x (M, IC) @ float(w).T + bias, w (OC, IC) bfloat16 bits, accumulated in
    float32; bias may be None. The same bits for every thread count."""
    cdef int IC = x.shape[1], OC = w.shape[0]
    check_linear(IC, OC, bias, threads)
    if w.shape[1] != IC:
        raise ValueError(f"bf16_linear: w ({OC}, {w.shape[1]}) does not fit inputs of width {IC}")
    cdef Matrix m
    memset(&m, 0, sizeof(Matrix))
    m.format, m.IC, m.OC = FORMAT_BF16, IC, OC
    if OC:
        m.bf16 = &w[0, 0]
    return linear_rows(x, &m, bias, threads)


# ----------------------------------------------------------------------------------------------
# generation: rows of tokens through every layer, with a key/value cache per sequence

cdef enum:
    # Row blocks of a one-row float32 matrix-vector product: fixed, so that the sum does not
    # depend on the thread count; 4 keeps 1, 2 and 4 threads evenly loaded.
    MATVEC_BLOCKS = 4
    # Output rows (columns of a float32 matrix) per unit of work of a product of more than
    # FEW_ROWS rows (a prompt): the weights of a tile go to float32 (for bf16 and int8) and
    # through single-threaded BLAS.
    TILE = 128
    MAX_ROWS = 256       # most token rows one decoder call runs (a longer prompt goes in blocks)
    FEW_ROWS = 16        # the most rows a product reads its weights for directly (see linear)

# int8 weights and activations come in blocks of this many sharing one scale.
Q8_BLOCK = CLLM_QK
# The formats of Weights, in FORMAT_* order.
WEIGHT_FORMATS = ("float32", "bf16", "int8")
# The matrices of a layer that generation reads, in the order of a Weights list.
DECODER_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                    "mlp.c_proj.weight")


cdef class Weights:
    """The matrices generation reads, all in one format: for each layer those of
    DECODER_MATRICES, then the head, then the token table. float32 layer matrices are the
    training layout (IC, OC); the head (V, C) and bf16 (uint16 bits) and int8 (a (q, scale)
    pair) matrices are rows by output, (OC, IC), so that a thread reads whole rows and every
    output is one dot product. The token table is read by rows, (V, C), in every format.
    The small tensors (LayerNorms, biases, wpe) are the Transformer's float32 ones."""
    cdef readonly str format
    cdef int fmt, n
    cdef list arrays            # keeps the matrices alive
    cdef Matrix *m              # (4 L + 2)

    def __cinit__(self):
        self.m = NULL

    def __dealloc__(self):
        PyMem_Free(self.m)

    def __init__(self, Transformer net, str format, list matrices):
        cdef Dims *d = &net.d
        cdef int C = d.C, F = d.F, V = d.V, l, k
        cdef const Py_ssize_t *o
        if format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {format!r}")
        self.format, self.fmt = format, WEIGHT_FORMATS.index(format)
        self.n = len(DECODER_MATRICES) * d.L + 2
        if len(matrices) != self.n:
            raise ValueError(f"expected {self.n} matrices, got {len(matrices)}")
        self.arrays = list(matrices)
        self.m = <Matrix *>PyMem_Malloc(self.n * sizeof(Matrix))
        if self.m == NULL:
            raise MemoryError()
        shapes = ((C, 3 * C, QKV_B), (C, C, PROJ_B), (C, F, FC_B), (F, C, FCPROJ_B))
        for l in range(d.L):
            o = d.layer + l * N_LAYER_TENSORS
            for k, (IC, OC, bias) in enumerate(shapes):
                self.set(l * 4 + k, matrices[l * 4 + k], IC, OC, net.p + o[bias])
        # the head and the token table, (V, C): rows by output in every format
        self.set(self.n - 2, matrices[self.n - 2], C, V, NULL, True)
        self.set(self.n - 1, matrices[self.n - 1], C, V, NULL, True)

    cdef set(self, int i, entry, int IC, int OC, const float *bias, bint rows=False):
        cdef Matrix *m = &self.m[i]
        cdef const float[:, ::1] f
        cdef const uint16_t[:, ::1] h
        cdef const int8_t[:, ::1] q
        cdef const float[:, ::1] sc
        memset(m, 0, sizeof(Matrix))
        m.format, m.IC, m.OC, m.bias = self.fmt, IC, OC, bias
        m.K = q8_width(IC)
        if self.fmt == FORMAT_F32:
            f = entry
            expected = ((OC, IC),) if rows else ((IC, OC),)
            got = ((f.shape[0], f.shape[1]),)
            if rows:
                m.f32_rows = &f[0, 0]
            else:
                m.f32 = &f[0, 0]
        elif self.fmt == FORMAT_BF16:
            h = entry
            expected, got = ((OC, IC),), ((h.shape[0], h.shape[1]),)
            m.bf16 = &h[0, 0]
        else:
            q, sc = entry
            expected = ((OC, m.K), (OC, m.K // CLLM_QK))
            got = ((q.shape[0], q.shape[1]), (sc.shape[0], sc.shape[1]))
            m.q8, m.scale = &q[0, 0], &sc[0, 0]
        if got != expected:
            raise ValueError(f"{self.format} matrix {i}: shape {got}, expected {expected}")


cdef bint is_prompt_block(const int32_t *seqs, const int32_t *pos, int M) noexcept nogil:
    """Whether rows are consecutive positions of one sequence (a prompt), read as one block"""
    cdef int r
    if M < 2:
        return False
    for r in range(1, M):
        if seqs[r] != seqs[0] or pos[r] != pos[0] + r:
            return False
    return True


cdef class Decoder:
    """Generation state of `batch` sequences: the key/value cache of every layer of each for
    the whole context, allocated once, and the scratch of up to MAX_ROWS token rows. `rows`
    runs rows of (token, sequence, position) through the model in nogil code, each matrix
    product split over `threads` threads: one row of one sequence is a generation step, a
    block of rows of one sequence reads a prompt (the matrix-matrix kernels), one row of each
    sequence decodes a batch, every weight read once for all of them.

    Every output of a product is computed by one thread in an order fixed by the matrix
    alone, so the text does not depend on the thread count; and up to FEW_ROWS rows (a step,
    a batch) every output has the bits it has alone, whatever rows are computed with it."""
    cdef Dims d
    cdef Transformer net                      # keeps the parameters and d's tables alive
    cdef Weights w
    cdef readonly int batch
    cdef readonly int most_threads            # what the scratch is sized for
    cdef int active_threads
    # keys and values by head, (batch, L, H, n_ctx, hd): a row's attention reads one
    # contiguous run of its head's keys and one of its values (a batch reads every sequence's
    # cache each step, as much memory as the weights, so it must stream)
    cdef float[:, :, :, :, ::1] k_cache, v_cache
    cdef float[:, ::1] x, ln, qkv, atty, fch    # (MAX_ROWS, C | C | 3C | C | F)
    cdef float[::1] mean, rstd                  # (MAX_ROWS)
    cdef int8_t[::1] xq                         # int8 activation rows (MAX_ROWS * max K)
    cdef float[::1] xs                          # their scales
    cdef float[:, ::1] partial                  # (MATVEC_BLOCKS, FEW_ROWS * max(3C, F)) sums
    cdef float[:, ::1] scores                   # (threads, MAX_ROWS * n_ctx) attention
    cdef float[:, ::1] tiles                    # (threads, TILE * max(C, F)) weights in float32
    cdef float[::1] x_int8                      # (M, IC) int8 activations back in float32
    cdef float[::1] xt                          # FEW_ROWS float32 rows in tile order
    cdef float[:, ::1] logits                   # (max(batch, 1), V) of step and decode

    def __init__(self, Transformer net, Weights weights, int batch, int threads):
        cdef Dims *d = &self.d
        if batch < 1 or threads < 1:
            raise ValueError("batch and threads must be >= 1")
        self.d = net.d
        self.net, self.w, self.batch = net, weights, batch
        self.active_threads = self.most_threads = threads
        self.k_cache = np.zeros((batch, d.L, d.H, d.n_ctx, d.C // d.H), np.float32)
        self.v_cache = np.zeros((batch, d.L, d.H, d.n_ctx, d.C // d.H), np.float32)
        rows = MAX_ROWS
        self.x = np.zeros((rows, d.C), np.float32)
        self.ln = np.zeros((rows, d.C), np.float32)
        self.qkv = np.zeros((rows, 3 * d.C), np.float32)
        self.atty = np.zeros((rows, d.C), np.float32)
        self.fch = np.zeros((rows, d.F), np.float32)
        self.mean = np.zeros(rows, np.float32)
        self.rstd = np.zeros(rows, np.float32)
        widest = q8_width(max(d.C, d.F))
        self.xq = np.zeros(rows * widest, np.int8)
        self.xs = np.zeros(rows * widest // CLLM_QK, np.float32)
        self.partial = np.zeros((MATVEC_BLOCKS, FEW_ROWS * max(3 * d.C, d.F)), np.float32)
        self.scores = np.zeros((threads, MAX_ROWS * d.n_ctx), np.float32)
        self.tiles = np.zeros((threads, TILE * max(d.C, d.F)), np.float32)
        self.x_int8 = np.zeros(rows * max(d.C, d.F), np.float32)
        self.xt = np.zeros(FEW_ROWS * ((max(d.C, d.F) + 7) // 8 * 8), np.float32)
        self.logits = np.zeros((batch, d.V), np.float32)

    @property
    def weight_format(self):
        return self.w.format

    @property
    def threads(self):
        """The threads the next call runs on, 1..most_threads (the text never depends on it)."""
        return self.active_threads

    @threads.setter
    def threads(self, int n):
        if not 1 <= n <= self.most_threads:
            raise ValueError(f"threads must lie in [1, {self.most_threads}], got {n}")
        self.active_threads = n

    cdef void matvec(self, float *y, const float *x, int M, const Matrix *m) noexcept nogil:
        """y (M, OC) = x (M, IC) @ W + b, float32 W (IC, OC), M <= FEW_ROWS. The rows of W are
        cut into MATVEC_BLOCKS fixed blocks, shared among the threads, each read as one stream
        for all M rows into partial sums of its own; the partials are then added in block
        order, so every output is the same for every thread count and whatever rows are
        computed with it."""
        cdef int blk, IC = m.IC, OC = m.OC
        cdef Py_ssize_t size = <Py_ssize_t>M * OC
        for blk in prange(MATVEC_BLOCKS, num_threads=self.active_threads, schedule="dynamic"):
            memset(&self.partial[blk, 0], 0, size * sizeof(float))
            # partial[blk] (M, OC) = x[:, i0:i1] @ W[i0:i1]
            cllm_matvec_accumulate(&self.partial[blk, 0], OC, x, IC, M, m.f32, OC, OC,
                                   IC * blk // MATVEC_BLOCKS, IC * (blk + 1) // MATVEC_BLOCKS)
        self.start_rows(y, M, m)
        for blk in range(MATVEC_BLOCKS):
            cllm_row_add(y, &self.partial[blk, 0], size)

    cdef void start_rows(self, float *y, int M, const Matrix *m) noexcept nogil:
        """y (M, OC) = the bias of m, or 0"""
        cdef int r
        for r in range(M):
            if m.bias != NULL:
                memcpy(y + <Py_ssize_t>r * m.OC, m.bias, m.OC * sizeof(float))
            else:
                memset(y + <Py_ssize_t>r * m.OC, 0, m.OC * sizeof(float))

    cdef void linear(self, float *y, const float *x, int M, const Matrix *m) noexcept nogil:
        """y (M, OC) = x (M, IC) @ W + bias. Up to FEW_ROWS rows (a step, a batch): each
        weight is read once for all rows, in its own format, by kernels whose every output has
        the bits it has alone. More rows (a prompt) are bound by arithmetic: tiles of at most
        TILE output rows, their weights in float32, go through BLAS. Outputs are cut into
        blocks that the threads take as they come free (a thread that shares its core with
        another process then holds up one block, not a fixed share of the work); where they
        are cut depends on M and the matrix alone."""
        cdef int blk, blocks, o0, o1, r, o
        cdef float *tile
        if M <= FEW_ROWS:
            if m.f32 != NULL:
                self.matvec(y, x, M, m)
            else:
                rows_product(y, x, M, m, &self.xq[0], &self.xs[0], &self.xt[0],
                             self.active_threads)
            return
        self.start_rows(y, M, m)
        if m.format == FORMAT_INT8:
            # int8 products take int8 activations: x's rows rounded as one row's would be
            for r in prange(M, num_threads=self.active_threads, schedule="static"):
                cllm_q8_quantize_rows(&self.xq[<Py_ssize_t>r * m.K],
                                      &self.xs[r * (m.K // CLLM_QK)],
                                      x + <Py_ssize_t>r * m.IC, 1, m.IC, m.K)
                cllm_q8_dequantize_row(&self.x_int8[<Py_ssize_t>r * m.IC],
                                       &self.xq[<Py_ssize_t>r * m.K],
                                       &self.xs[r * (m.K // CLLM_QK)], m.IC)
            x = &self.x_int8[0]
        blocks = (m.OC + TILE - 1) // TILE
        for blk in prange(blocks, num_threads=self.active_threads, schedule="dynamic"):
            o0 = m.OC * blk // blocks
            o1 = m.OC * (blk + 1) // blocks
            if m.f32 != NULL:
                # y[:, o0:o1] += x @ W[:, o0:o1], W (IC, OC)
                matmul(False, False, M, o1 - o0, m.IC, 1.0, x, m.IC, m.f32 + o0, m.OC, 1.0,
                       y + o0, m.OC)
                continue
            if m.f32_rows != NULL:
                # y[:, o0:o1] += x @ W[o0:o1]^T, W (OC, IC)
                matmul(False, True, M, o1 - o0, m.IC, 1.0, x, m.IC,
                       m.f32_rows + <Py_ssize_t>o0 * m.IC, m.IC, 1.0, y + o0, m.OC)
                continue
            tile = &self.tiles[threadid(), 0]
            if m.format == FORMAT_BF16:
                cllm_bf16_to_float(tile, m.bf16 + <Py_ssize_t>o0 * m.IC,
                                   <Py_ssize_t>(o1 - o0) * m.IC)
            else:
                for o in range(o0, o1):
                    cllm_q8_dequantize_row(tile + <Py_ssize_t>(o - o0) * m.IC,
                                           m.q8 + <Py_ssize_t>o * m.K,
                                           m.scale + <Py_ssize_t>o * (m.K // CLLM_QK), m.IC)
            # y[:, o0:o1] += x @ tile^T, tile (o1 - o0, IC) the rows of W^T
            matmul(False, True, M, o1 - o0, m.IC, 1.0, x, m.IC, tile, m.IC, 1.0, y + o0, m.OC)

    cdef void embed(self, float *out, int64_t token, int pos) noexcept nogil:
        """out (C) = the token's row of the table (+ wpe[pos] with learned positions)."""
        cdef const Matrix *table = &self.w.m[self.w.n - 1]
        cdef int C = self.d.C
        if table.format == FORMAT_F32:
            memcpy(out, table.f32_rows + token * C, C * sizeof(float))
        elif table.format == FORMAT_BF16:
            cllm_bf16_to_float(out, table.bf16 + token * C, C)
        else:
            cllm_q8_dequantize_row(out, table.q8 + token * table.K,
                                   table.scale + token * (table.K // CLLM_QK), C)
        if not self.d.angular:
            cllm_row_add(out, self.net.p + self.d.wpe + <Py_ssize_t>pos * C, C)

    cdef void attend(self, int l, const int32_t *seqs, const int32_t *pos, int M) noexcept nogil:
        """atty = softmax(q k^T / sqrt(hd)) v for every row and head, over the cached
        positions of the row's sequence that its position attends to (0..pos, or its Ulam
        neighbours); (row, head) pairs in parallel."""
        cdef int C = self.d.C, H = self.d.H, hd = C // H
        cdef int i, r, h, j, n
        cdef float scale = 1.0 / sqrtf(hd)
        cdef float *s
        cdef float *y
        cdef const float *q
        cdef const float *keys
        cdef const float *values
        cdef const int32_t *key
        for i in prange(M * H, num_threads=self.active_threads, schedule="dynamic"):
            r = i // H
            h = i % H
            n = pos[r] + 1
            key = NULL
            if self.d.ulam:
                key = self.d.ulam_keys + self.d.ulam_start[pos[r]]
                n = self.d.ulam_start[pos[r] + 1] - self.d.ulam_start[pos[r]]
            q = &self.qkv[r, h * hd]
            s = &self.scores[threadid(), 0]
            y = &self.atty[r, h * hd]
            keys = &self.k_cache[seqs[r], l, h, 0, 0]          # (n_ctx, hd)
            values = &self.v_cache[seqs[r], l, h, 0, 0]        # (n_ctx, hd)
            # s[j] = scale * q . k[p_j] over the attended positions p_j (0..n-1 when dense)
            for j in range(n):
                s[j] = scale * cllm_row_dot(q, keys + <Py_ssize_t>(key[j] if key else j) * hd, hd)
            cllm_row_softmax(s, n)
            # y = sum over the attended positions j of s[j] v[j]
            cllm_weighted_rows(y, s, values, hd, key, n, hd)

    cdef void attend_block(self, int l, int seq, int p0, int M) noexcept nogil:
        """atty for rows at positions p0..p0+M-1 of one sequence with dense attention (a
        prompt), head by head in parallel, through BLAS: scores S (M, n) = Q_h K_h^T / sqrt(hd)
        over the n = p0 + M cached positions, each row's softmax over its causal prefix, then
        Y_h = P V_h."""
        cdef int C = self.d.C, H = self.d.H, hd = C // H, n = p0 + M
        cdef int h, r, valid
        cdef float scale = 1.0 / sqrtf(hd)
        cdef float *S
        cdef float *row
        for h in prange(H, num_threads=self.active_threads, schedule="dynamic"):
            S = &self.scores[threadid(), 0]
            # S (M, n) = scale * Q_h (M, hd; rows 3C apart) @ K_h^T, K_h (n, hd)
            matmul(False, True, M, n, hd, scale, &self.qkv[0, h * hd], 3 * C,
                   &self.k_cache[seq, l, h, 0, 0], hd, 0.0, S, n)
            for r in range(M):
                row = S + <Py_ssize_t>r * n
                valid = p0 + r + 1
                cllm_row_softmax(row, valid)
                memset(row + valid, 0, (n - valid) * sizeof(float))
            # Y_h (M, hd; rows C apart) = P (M, n) @ V_h (n, hd)
            matmul(False, False, M, hd, n, 1.0, S, n, &self.v_cache[seq, l, h, 0, 0], hd, 0.0,
                   &self.atty[0, h * hd], C)

    cdef void run_rows(self, const int64_t *tokens, const int32_t *seqs, const int32_t *pos,
                       int M, bint block, const int32_t *out_rows, int R,
                       float *logits) noexcept nogil:
        """Rows r < M: token tokens[r] of sequence seqs[r] at position pos[r], the cache of
        that sequence holding its earlier positions (or getting them from earlier rows of this
        call); `block`: the rows are a prompt read with dense attention (attend_block).
        logits (R, V) <- those after rows out_rows[0..R-1]."""
        cdef Dims *d = &self.d
        cdef int C = d.C, F = d.F, hd = d.C // d.H, l, r, h
        cdef const Py_ssize_t *o
        cdef const float *p = self.net.p
        cdef const Matrix *m
        cdef float *x = &self.x[0, 0]
        cdef float *ln = &self.ln[0, 0]
        cdef float *qkv = &self.qkv[0, 0]
        for r in range(M):
            self.embed(x + r * C, tokens[r], pos[r])
        for l in range(d.L):
            o = d.layer + l * N_LAYER_TENSORS
            m = &self.w.m[l * 4]
            layernorm_forward(ln, &self.mean[0], &self.rstd[0], x, p + o[LN1_W], p + o[LN1_B],
                              M, C)
            self.linear(qkv, ln, M, &m[0])
            for r in range(M):
                if d.angular:
                    rotate_qk(qkv + r * 3 * C, d.rot_cos + pos[r] * (C // 2),
                              d.rot_sin + pos[r] * (C // 2), C, 1.0)
                for h in range(d.H):
                    memcpy(&self.k_cache[seqs[r], l, h, pos[r], 0],
                           qkv + r * 3 * C + C + h * hd, hd * sizeof(float))
                    memcpy(&self.v_cache[seqs[r], l, h, pos[r], 0],
                           qkv + r * 3 * C + 2 * C + h * hd, hd * sizeof(float))
            if block:
                self.attend_block(l, seqs[0], pos[0], M)
            else:
                self.attend(l, seqs, pos, M)
            self.linear(ln, &self.atty[0, 0], M, &m[1])
            cllm_row_add(x, ln, <Py_ssize_t>M * C)
            layernorm_forward(ln, &self.mean[0], &self.rstd[0], x, p + o[LN2_W], p + o[LN2_B],
                              M, C)
            self.linear(&self.fch[0, 0], ln, M, &m[2])
            cllm_gelu_forward(&self.fch[0, 0], &self.fch[0, 0], M * F)
            self.linear(ln, &self.fch[0, 0], M, &m[3])
            cllm_row_add(x, ln, <Py_ssize_t>M * C)
        # the head, for the rows asked only: their final LayerNorm into ln's first R rows
        for r in range(R):
            layernorm_forward(ln + r * C, &self.mean[r], &self.rstd[r], x + out_rows[r] * C,
                              p + d.lnf_w, p + d.lnf_b, 1, C)
        self.linear(logits, ln, R, &self.w.m[self.w.n - 2])

    def rows(self, const int64_t[::1] tokens, const int32_t[::1] seqs,
             const int32_t[::1] positions, const int32_t[::1] out_rows, float[:, ::1] logits):
        """Run M <= MAX_ROWS token rows (see run_rows); logits (R, V) receives the logits
        after the rows out_rows (R of them, R <= M)."""
        from contextlib import nullcontext
        from .threads import blas_single_threaded
        cdef int M = tokens.shape[0], R = out_rows.shape[0], r
        cdef Dims *d = &self.d
        if not 1 <= M <= MAX_ROWS or seqs.shape[0] != M or positions.shape[0] != M:
            raise ValueError(f"rows: 1 to {MAX_ROWS} tokens with one sequence and one position "
                             f"each")
        if R > M or logits.shape[0] != R or logits.shape[1] != d.V:
            raise ValueError(f"rows: logits must have shape ({R}, {d.V}), R <= {M}")
        for r in range(M):
            if not (0 <= tokens[r] < d.V and 0 <= seqs[r] < self.batch
                    and 0 <= positions[r] < d.n_ctx):
                raise ValueError(f"rows: token {tokens[r]}, sequence {seqs[r]} or position "
                                 f"{positions[r]} out of range")
        for r in range(R):
            if not 0 <= out_rows[r] < M:
                raise ValueError(f"rows: out_rows holds {out_rows[r]}, not a row")
        if R == 0:
            return
        # a prompt with dense attention: attention through BLAS (attend_block)
        cdef bint block = is_prompt_block(&seqs[0], &positions[0], M) and not d.ulam
        # BLAS runs for such a block and for more than FEW_ROWS rows only; a step or a batch
        # is too short to pay for limiting its threads
        with blas_single_threaded() if block or M > FEW_ROWS else nullcontext():
            with nogil:
                self.run_rows(&tokens[0], &seqs[0], &positions[0], M, block, &out_rows[0], R,
                              &logits[0, 0])

    def step(self, int token, int pos, int seq=0):
        """Logits (V) of the next token after `token` at position `pos` of sequence `seq`,
        whose cache holds positions 0..pos-1. The returned array is reused by the next call."""
        self.rows(np.array([token], np.int64), np.array([seq], np.int32),
                  np.array([pos], np.int32), np.zeros(1, np.int32), self.logits[:1])
        return np.asarray(self.logits[0])

    def decode(self, tokens, positions):
        """One step of sequences 0..n-1 together: logits (n, V) after token tokens[i] at
        position positions[i] of sequence i. The returned array is reused by the next call."""
        cdef int n = len(tokens)
        self.rows(np.ascontiguousarray(tokens, np.int64), np.arange(n, dtype=np.int32),
                  np.ascontiguousarray(positions, np.int32), np.arange(n, dtype=np.int32),
                  self.logits[:n])
        return np.asarray(self.logits[:n])

    def read(self, ids, int seq=0, bint every=False):
        """Read the tokens ids into the cache of sequence `seq` from position 0, MAX_ROWS
        rows at a time: the logits after the last (V), or with `every` after each (T, V)."""
        ids = np.asarray(ids, np.int64)
        cdef int T = ids.shape[0], start, n
        if not 1 <= T <= self.d.n_ctx:
            raise ValueError(f"read: 1 to {self.d.n_ctx} tokens, got {T}")
        out = np.empty((T if every else 1, self.d.V), np.float32)
        for start in range(0, T, MAX_ROWS):
            n = min(MAX_ROWS, T - start)
            self.rows(ids[start:start + n], np.full(n, seq, np.int32),
                      np.arange(start, start + n, dtype=np.int32),
                      np.arange(n, dtype=np.int32) if every
                      else np.array([n - 1] if start + n == T else [], np.int32),
                      out[start:start + n] if every else out[:1 if start + n == T else 0])
        return out if every else out[0]
