"""A plain float64 NumPy GPT-2, written for clarity rather than speed.

The test suite checks the Cython core against this module, and this module is checked against
central finite differences (tests/test_reference.py) and against Hugging Face (bench/check_hf.py).

Semantics are GPT-2's exactly: pre-LayerNorm blocks, LayerNorm eps 1e-5, tanh-approximated GELU,
causal softmax attention scaled by 1/sqrt(head_dim), learned absolute position embeddings, and
Hugging Face Conv1D linear layers (y = x @ W + b with W of shape (in, out)). The configuration's
crystalline switches (position, attention, loss) replace the matching parts with the
transcriptions of crystalline_reference.py.

Every layer kind has a forward function returning (output, cache) and a backward function taking
(upstream gradient, cache). Shapes: B batch, T time, C n_embd, H n_head, hd head_dim, F n_inner,
V vocab_size; "..." means any leading shape.
"""
from __future__ import annotations

import numpy as np

import crystalline_reference as crystal

LAYERNORM_EPS = 1e-5
GELU_COEFF = 0.044715
SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)
IGNORE_INDEX = -1


def layernorm_forward(x, w, b):
    """x (..., C), w (C,), b (C,) -> y (..., C)."""
    mean = x.mean(axis=-1, keepdims=True)               # (..., 1)
    centered = x - mean                                  # (..., C)
    var = (centered ** 2).mean(axis=-1, keepdims=True)  # (..., 1), biased like torch
    rstd = 1.0 / np.sqrt(var + LAYERNORM_EPS)            # (..., 1)
    xhat = centered * rstd                               # (..., C)
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), db (C,)."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    db = dy.reshape(-1, C).sum(axis=0)
    dxhat = dy * w
    # xhat depends on x through both the mean and the variance, hence the two projections.
    dx = rstd * (dxhat
                 - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


def linear_forward(x, W, b):
    """x (..., n_in), W (n_in, n_out), b (n_out,) -> y (..., n_out)."""
    return x @ W + b, (x, W)


def linear_backward(dy, cache):
    """dy (..., n_out) -> dx (..., n_in), dW (n_in, n_out), db (n_out,)."""
    x, W = cache
    dx = dy @ W.T
    dW = x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    db = dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    return dx, dW, db


def gelu_forward(x):
    """x (...) -> y (...): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    tanh_inner = np.tanh(SQRT_2_OVER_PI * (x + GELU_COEFF * x ** 3))
    return 0.5 * x * (1.0 + tanh_inner), (x, tanh_inner)


def gelu_backward(dy, cache):
    """dy (...) -> dx (...)."""
    x, tanh_inner = cache
    d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEFF * x ** 2)
    dydx = 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - tanh_inner ** 2) * d_inner
    return dy * dydx


def causal_mask(T):
    """(T, T) boolean, True where query t may attend to key s, i.e. s <= t."""
    return np.tril(np.ones((T, T), dtype=bool))


def attention_forward(qkv, n_head, mask=None):
    """qkv (B, T, 3C) -> y (B, T, C).

    qkv is the c_attn output: q, k, v side by side, each C wide, with head h in columns
    [h*hd, (h+1)*hd) of each. mask (T, T) boolean marks the allowed (query, key) pairs and
    defaults to causal_mask(T); every query must be allowed at least one key.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hd = C // n_head
    if mask is None:
        mask = causal_mask(T)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (T, T):
        raise ValueError(f"mask must be a boolean ({T}, {T}) array, got {mask.dtype} {mask.shape}")
    if not mask.any(axis=1).all():
        raise ValueError("every query must be allowed to attend to at least one key")

    def split_heads(m):  # (B, T, C) -> (B, H, T, hd)
        return m.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3)

    q, k, v = (split_heads(qkv[:, :, i * C:(i + 1) * C]) for i in range(3))
    scale = 1.0 / np.sqrt(hd)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale               # (B, H, T, T)
    scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)          # for exp's range only
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)                # (B, H, T, T)
    heads_out = weights @ v                                       # (B, H, T, hd)
    y = heads_out.transpose(0, 2, 1, 3).reshape(B, T, C)
    return y, (q, k, v, weights, scale)


def attention_backward(dy, cache):
    """dy (B, T, C) -> dqkv (B, T, 3C)."""
    q, k, v, weights, scale = cache
    B, H, T, hd = q.shape
    d_heads_out = dy.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
    dv = weights.transpose(0, 1, 3, 2) @ d_heads_out              # (B, H, T, hd)
    d_weights = d_heads_out @ v.transpose(0, 1, 3, 2)             # (B, H, T, T)
    # Softmax Jacobian; masked entries have weight 0 and so get no gradient.
    d_scores = weights * (d_weights - (d_weights * weights).sum(axis=-1, keepdims=True))
    dq = (d_scores @ k) * scale                                   # (B, H, T, hd)
    dk = (d_scores.transpose(0, 1, 3, 2) @ q) * scale             # (B, H, T, hd)

    def merge_heads(m):  # (B, H, T, hd) -> (B, T, C)
        return m.transpose(0, 2, 1, 3).reshape(B, T, H * hd)

    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def cross_entropy_forward(logits, targets):
    """logits (..., V), targets (...) int in [0, V) or -1 (ignored) -> mean loss over the rest."""
    V = logits.shape[-1]
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match logits {logits.shape}")
    if ((targets < IGNORE_INDEX) | (targets >= V)).any():
        raise ValueError(f"targets must lie in [0, {V}) or be {IGNORE_INDEX}")
    counted = targets != IGNORE_INDEX
    n_counted = int(counted.sum())
    if n_counted == 0:
        raise ValueError("the mean loss over zero targets is undefined: every target is ignored")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (..., V)
    safe_targets = np.where(counted, targets, 0)
    target_log_probs = np.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]
    loss = -(target_log_probs * counted).sum() / n_counted
    return loss, (np.exp(log_probs), safe_targets, counted, n_counted)


def cross_entropy_backward(dloss, cache):
    """dloss scalar -> dlogits (..., V)."""
    probs, safe_targets, counted, n_counted = cache
    one_hot = np.zeros_like(probs)
    np.put_along_axis(one_hot, safe_targets[..., None], 1.0, axis=-1)
    return (probs - one_hot) * (counted[..., None] * (dloss / n_counted))


def block_forward(x, p, n_head, angles=None, mask=None):
    """x (B, T, C) -> (B, T, C); p maps the LAYER_TENSORS suffixes to one layer's tensors.
    angles (T, H, hd/2), when given, rotate q and k (angular positions); mask (T, T) defaults
    to the causal one."""
    ln_1, ln_1_cache = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    qkv, c_attn_cache = linear_forward(ln_1, p["attn.c_attn.weight"], p["attn.c_attn.bias"])
    if angles is not None:
        qkv = crystal.rotate_qk_forward(qkv, angles)
    attn, attn_cache = attention_forward(qkv, n_head, mask)
    attn_proj, attn_proj_cache = linear_forward(attn, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    x = x + attn_proj
    ln_2, ln_2_cache = layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"])
    fc, c_fc_cache = linear_forward(ln_2, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    act, gelu_cache = gelu_forward(fc)
    mlp_proj, mlp_proj_cache = linear_forward(act, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    x = x + mlp_proj
    return x, (ln_1_cache, c_attn_cache, angles, attn_cache, attn_proj_cache,
               ln_2_cache, c_fc_cache, gelu_cache, mlp_proj_cache)


def block_backward(dx, cache):
    """dx (B, T, C) -> dx (B, T, C) and the gradients of the layer's tensors by suffix."""
    (ln_1_cache, c_attn_cache, angles, attn_cache, attn_proj_cache,
     ln_2_cache, c_fc_cache, gelu_cache, mlp_proj_cache) = cache
    g = {}
    d_act, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = linear_backward(dx, mlp_proj_cache)
    d_fc = gelu_backward(d_act, gelu_cache)
    d_ln_2, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = linear_backward(d_fc, c_fc_cache)
    d_resid, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(d_ln_2, ln_2_cache)
    dx = dx + d_resid
    d_attn, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = linear_backward(dx, attn_proj_cache)
    d_qkv = attention_backward(d_attn, attn_cache)
    if angles is not None:
        d_qkv = crystal.rotate_qk_backward(d_qkv, angles)
    d_ln_1, g["attn.c_attn.weight"], g["attn.c_attn.bias"] = linear_backward(d_qkv, c_attn_cache)
    d_resid, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(d_ln_1, ln_1_cache)
    return dx + d_resid, g


def layer_params(params, i):
    """The tensors of layer i keyed by their suffix, e.g. 'ln_1.weight'."""
    prefix = f"h.{i}."
    return {name[len(prefix):]: t for name, t in params.items() if name.startswith(prefix)}


def head_weight(params, config):
    """(V, C): the output projection, which is wte itself when embeddings are tied."""
    return params["wte"] if config.tie_embeddings else params["lm_head.weight"]


def _forward_with_caches(params, config, idx):
    idx = np.asarray(idx)
    B, T = idx.shape
    if T > config.n_ctx:
        raise ValueError(f"sequence length {T} exceeds n_ctx {config.n_ctx}")
    if ((idx < 0) | (idx >= config.vocab_size)).any():
        raise ValueError(f"token ids must lie in [0, {config.vocab_size})")
    x = params["wte"][idx]                                        # (B, T, C)
    angles = mask = None
    if config.position == "learned":
        x = x + params["wpe"][:T]
    else:
        angles = crystal.angular_angles(range(T), config.n_head, config.n_embd // config.n_head)
    if config.attention == "ulam":
        mask = crystal.ulam_mask(T, config.ulam_radius)
    block_caches = []
    for i in range(config.n_layer):
        x, cache = block_forward(x, layer_params(params, i), config.n_head, angles, mask)
        block_caches.append(cache)
    x_final, ln_f_cache = layernorm_forward(x, params["ln_f.weight"], params["ln_f.bias"])
    logits = x_final @ head_weight(params, config).T              # (B, T, V)
    return logits, (idx, block_caches, ln_f_cache, x_final)


def gpt2_forward(params, config, idx):
    """params name -> float64 array (names of config.tensor_shapes()), idx (B, T) int -> logits (B, T, V)."""
    return _forward_with_caches(params, config, idx)[0]


def training_loss_forward(logits, targets, config):
    """The mean training loss of config.loss, and the cache of its backward."""
    if config.loss == "crystalline":
        return crystal.crystalline_loss_forward(logits, targets, config.crystalline_alpha)
    return cross_entropy_forward(logits, targets)


def training_loss_backward(dloss, cache, config):
    if config.loss == "crystalline":
        return crystal.crystalline_loss_backward(dloss, cache)
    return cross_entropy_backward(dloss, cache)


def gpt2_loss(params, config, idx, targets):
    """The mean training loss (config.loss) of targets (B, T)."""
    return training_loss_forward(gpt2_forward(params, config, idx), targets, config)[0]


def gpt2_loss_and_grads(params, config, idx, targets):
    """Mean training loss (config.loss) of targets (B, T) (targets[b, t] labels position t;
    -1 is ignored) and its gradient for every parameter, as a dict with the names of params."""
    logits, (idx, block_caches, ln_f_cache, x_final) = _forward_with_caches(params, config, idx)
    loss, loss_cache = training_loss_forward(logits, targets, config)
    dlogits = training_loss_backward(1.0, loss_cache, config)    # (B, T, V)
    V, C = config.vocab_size, config.n_embd
    grads = {}
    d_head = dlogits.reshape(-1, V).T @ x_final.reshape(-1, C)    # (V, C)
    d_x_final = dlogits @ head_weight(params, config)             # (B, T, C)
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(d_x_final, ln_f_cache)
    for i in reversed(range(config.n_layer)):
        dx, layer_grads = block_backward(dx, block_caches[i])
        grads.update({f"h.{i}.{suffix}": g for suffix, g in layer_grads.items()})
    d_wte = np.zeros_like(params["wte"])
    np.add.at(d_wte, idx, dx)                                     # repeated tokens accumulate
    if config.position == "learned":
        grads["wpe"] = np.zeros_like(params["wpe"])
        grads["wpe"][:idx.shape[1]] = dx.sum(axis=0)
    if config.tie_embeddings:
        grads["wte"] = d_wte + d_head
    else:
        grads["wte"] = d_wte
        grads["lm_head.weight"] = d_head
    return loss, {name: grads[name] for name, _ in config.tensor_shapes()}


def random_params(config, rng, scale=0.1):
    """float64 params in tensor_shapes() order: every entry N(0, scale^2), except LayerNorm
    weights, which are 1 + N(0, scale^2), so that LayerNorm affine terms and all biases are
    exercised rather than left at their identity/zero initialisation."""
    params = {}
    for name, shape in config.tensor_shapes():
        noise = scale * rng.standard_normal(shape)
        is_layernorm_weight = name.endswith(".weight") and name.split(".")[-2].startswith("ln_")
        params[name] = 1.0 + noise if is_layernorm_weight else noise
    return params
