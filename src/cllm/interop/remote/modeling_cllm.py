"""A cllm model with crystalline switches, in PyTorch (written by `cllm export --to hf`).

It computes what cllm's core computes (cllm's _core.pyx), layer for layer, so that its logits
and greedy tokens are cllm's: GPT-2 with LayerNorm epsilon 1e-5, GELU with the tanh
approximation, no dropout, and

- position "angular": no position table; in every layer, after q and k are computed, feature
  pair (2i, 2i+1) of head h of q and of k at position p turns by the angle
  p (2 pi / 12) phi^-(i + h / H) (CRYSTALLINE.md section 3);
- attention "ulam": a query at position p sees the keys p' <= p within Chebyshev distance
  ulam_radius of it on the Ulam square spiral (section 4), softmax over those alone.

The angles and the neighbour lists come from crystal.py beside this file, which is cllm's own
module of these tables (computed in float64, used in float32, as cllm uses them).
Positions count from the first token given: the model reads at most n_positions tokens, and
padding (an attention mask with zeros) is refused.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_cllm import CllmConfig
from .crystal import angular_tables, ulam_neighbours


class Conv1D(nn.Module):
    """out = x @ weight + bias with weight (in, out): GPT-2's layout, which cllm keeps."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[1])


def rotate_pairs(x, cos, sin):
    """x (B, T, C): feature pair j = (2j, 2j+1) turned by the angle of cos[t, j], sin[t, j]."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Tables:
    """What the crystalline switches add to a GPT-2, for every position up to n_positions:
    the rotation of each feature pair (angular), and which keys each query sees."""

    def __init__(self, config, device):
        n, C = config.n_positions, config.n_embd
        self.cos = self.sin = None
        if config.position == "angular":
            cos, sin = angular_tables(n, config.n_head, C // config.n_head)
            self.cos = torch.from_numpy(cos.reshape(n, C // 2).astype(np.float32)).to(device)
            self.sin = torch.from_numpy(sin.reshape(n, C // 2).astype(np.float32)).to(device)
        if config.attention == "ulam":
            start, keys = ulam_neighbours(n, config.ulam_radius)
            mask = torch.zeros(n, n, dtype=torch.bool)
            rows = torch.from_numpy(np.repeat(np.arange(n), np.diff(start)))
            mask[rows, torch.from_numpy(keys.astype(np.int64))] = True
        else:
            mask = torch.ones(n, n, dtype=torch.bool).tril()
        self.allowed = mask.to(device)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x, tables):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        if tables.cos is not None:
            cos, sin = tables.cos[:T].to(x.dtype), tables.sin[:T].to(x.dtype)
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        scores = scores.masked_fill(~tables.allowed[:T, :T], float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.n_inner)
        self.c_proj = Conv1D(config.n_inner, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, tables):
        x = x + self.attn(self.ln_1(x), tables)
        return x + self.mlp(self.ln_2(x))


class CllmModel(nn.Module):
    """The transformer under GPT-2's names (wte, wpe, h.N..., ln_f), as cllm saves them."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) \
            if config.position == "learned" else None
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self._tables = None

    def tables(self, device):
        # built on first use, on the device of the input: not parameters, never saved
        if self._tables is None or self._tables.allowed.device != device:
            self._tables = Tables(self.config, device)
        return self._tables

    def forward(self, input_ids):
        T = input_ids.shape[1]
        if T > self.config.n_positions:
            raise ValueError(f"{T} tokens exceed the context of {self.config.n_positions}")
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=input_ids.device))
        tables = self.tables(input_ids.device)
        for block in self.h:
            x = block(x, tables)
        return self.ln_f(x)


class CllmPreTrainedModel(PreTrainedModel):
    config_class = CllmConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"

    def _init_weights(self, module):
        """GPT-2's initialisation, for a model made from a configuration alone."""
        if isinstance(module, (nn.Embedding, nn.Linear, Conv1D)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CllmForCausalLM(CllmPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = CllmModel(config)
        # a tied head is wte itself, used directly in forward (nothing to tie or untie)
        self.lm_head = None if config.tie_word_embeddings \
            else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padding is not supported: every position of a sequence counts "
                             "from its first token")
        hidden = self.transformer(input_ids)
        head = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # no key/value cache: every step reads the whole sequence, as positions count from
        # its first token
        return {"input_ids": input_ids}
