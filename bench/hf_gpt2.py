"""Hugging Face GPT-2 in PyTorch: the baseline cllm's benchmarks compare against.

Needs the optional bench dependencies (torch, transformers); the test suite never imports this.
Parameters come in and go out as NumPy dicts keyed by the names of ModelConfig.tensor_shapes().
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from common import median_seconds

# Hugging Face's own default on CPU, i.e. what a plain PyTorch user gets; the alternative is
# "eager" (explicit matmul + softmax), which bench/check_hf.py checks as well.
ATTN_IMPLEMENTATION = "sdpa"

IGNORE_INDEX = -1


def hf_parameter_name(name: str) -> str:
    """Our tensor name -> the GPT2LMHeadModel parameter name."""
    if name == "lm_head.weight":
        return name
    if name in ("wte", "wpe"):
        return f"transformer.{name}.weight"
    return f"transformer.{name}"


def hf_model(config, params, attn_implementation: str = ATTN_IMPLEMENTATION) -> GPT2LMHeadModel:
    """A float32 GPT2LMHeadModel with the architecture of config, holding params, in eval mode."""
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=config.tie_embeddings, attn_implementation=attn_implementation,
        # No end-of-text token, so generation neither stops early nor has any logit suppressed to
        # keep it from stopping.
        bos_token_id=None, eos_token_id=None,
    )
    model = GPT2LMHeadModel(hf_config).float().eval()
    if model.config._attn_implementation != attn_implementation:
        raise RuntimeError(f"Hugging Face chose {model.config._attn_implementation!r} attention")
    hf_params = dict(model.named_parameters())  # a tied lm_head.weight is listed once, as wte
    names = [name for name, _ in config.tensor_shapes()]
    if sorted(map(hf_parameter_name, names)) != sorted(hf_params):
        raise ValueError("the Hugging Face model's parameters do not match config.tensor_shapes()")
    with torch.no_grad():
        for name in names:
            hf_params[hf_parameter_name(name)].copy_(torch.from_numpy(np.asarray(params[name], np.float32)))
    if config.tie_embeddings and model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("Hugging Face did not tie lm_head.weight to wte")
    return model


def _loss(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # targets are already aligned with idx (targets[t] labels position t), so HF's internal
    # label shifting is bypassed.
    logits = model(input_ids=idx, use_cache=False).logits
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=IGNORE_INDEX)


def hf_logits(model, idx) -> np.ndarray:
    """idx (B, T) -> logits (B, T, V) in the model's dtype."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(idx), dtype=torch.long), use_cache=False).logits.numpy()


def hf_loss_and_grads(model, config, idx, targets) -> tuple[float, dict[str, np.ndarray]]:
    """The mean cross-entropy and its gradient for each tensor of config.tensor_shapes()."""
    model.zero_grad(set_to_none=True)
    loss = _loss(model, torch.as_tensor(np.asarray(idx), dtype=torch.long),
                 torch.as_tensor(np.asarray(targets), dtype=torch.long))
    loss.backward()
    grads = {name: model.get_parameter(hf_parameter_name(name)).grad.numpy().copy()
             for name, _ in config.tensor_shapes()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def time_train_step(model, idx, targets, threads: int, steps: int, optimizer: bool = True) -> float:
    """Median seconds per training step over `steps` steps after one warmup step.

    A step is forward + backward, plus, with optimizer, gradient clipping to norm 1.0 and an
    AdamW update (lr 1e-4, betas (0.9, 0.95), weight decay 0.1), which changes the model.
    """
    torch.set_num_threads(threads)
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1) if optimizer else None

    def step():
        _loss(model, idx, targets).backward()
        if adamw is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            adamw.step()
        model.zero_grad(set_to_none=True)

    return median_seconds(step, steps)


def greedy_generate(model, prompts, new_tokens: int) -> list[list[int]]:
    """Greedy generation with the KV cache from prompts (a list of equal-length lists of ids,
    decoded together as one batch, no padding): the new ids of each prompt."""
    prompt = torch.as_tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True,
                                do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens,
                                pad_token_id=0)  # never used without padding, but generate insists
    return output[:, prompt.shape[1]:].tolist()


def time_generate(model, prompt_ids, new_tokens: int, threads: int) -> tuple[float, list[int]]:
    """Batch-1 greedy generation with the KV cache: (new tokens per second, the new token ids).

    The time covers the whole generate call, prompt processing included; a short untimed call
    first keeps one-off start-up costs out of it.
    """
    torch.set_num_threads(threads)
    greedy_generate(model, [list(prompt_ids)], min(new_tokens, 4))
    start = time.perf_counter()
    new_ids = greedy_generate(model, [list(prompt_ids)], new_tokens)[0]
    seconds = time.perf_counter() - start
    return len(new_ids) / seconds, new_ids
