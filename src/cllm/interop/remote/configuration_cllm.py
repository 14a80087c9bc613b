"""Configuration of a cllm model with crystalline switches (written by `cllm export --to hf`).

A GPT-2 in every other respect: LayerNorm epsilon 1e-5, GELU with the tanh approximation,
no dropout. position: "learned" (a wpe table) or "angular" (pairs of q and k features turned
by an angle of the position); attention: "dense" (causal) or "ulam" (keys within Chebyshev
distance ulam_radius of the query on the Ulam square spiral). See cllm's CRYSTALLINE.md."""
from transformers import PretrainedConfig


class CllmConfig(PretrainedConfig):
    model_type = "cllm"
    # the generic names transformers looks for, as GPT2Config maps them
    attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def __init__(self, vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, position="angular", attention="ulam", ulam_radius=2,
                 layer_norm_epsilon=1e-5, tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner if n_inner is not None else 4 * n_embd
        if position not in ("learned", "angular"):
            raise ValueError(f"position must be 'learned' or 'angular', got {position!r}")
        if attention not in ("dense", "ulam"):
            raise ValueError(f"attention must be 'dense' or 'ulam', got {attention!r}")
        self.position = position
        self.attention = attention
        self.ulam_radius = ulam_radius
        self.layer_norm_epsilon = layer_norm_epsilon
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
