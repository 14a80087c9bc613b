"""Cross-check Hugging Face GPT-2 (bench/hf_gpt2.py), the float64 reference GPT-2 and cllm.

Random tiny models, tied and untied, both attention implementations: logits, loss gradients
and greedy generation must agree, to float32 rounding for the float32 model and to float64
rounding for the same model cast to float64. Agreement validates the reference's semantics and
the loader's parameter mapping at once. Then cllm, given the same weights, must compute the
same logits, loss and gradients as Hugging Face in float64 (to float32 rounding) and generate
the same greedy ids as Hugging Face's `generate` with its KV cache. Exits non-zero on
disagreement.

Run from the repository root: PYTHONPATH=src python bench/check_hf.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the reference is a test helper

import reference as ref  # noqa: E402
from cllm import Model  # noqa: E402
from cllm.config import GPT2_SWITCHES, ModelConfig  # noqa: E402
from hf_gpt2 import hf_logits, hf_loss_and_grads, hf_model, time_generate  # noqa: E402

TOLERANCE = {"float32": 1e-5, "float64": 1e-10, "cllm vs HF": 1e-4}  # worst error relative to the largest entry
B, T = 3, 10
PROMPT, NEW_TOKENS = [3, 1, 4, 1, 5], 6


def relative_error(actual, expected):
    return np.abs(actual - expected).max() / np.abs(expected).max()


def reference_greedy(params, config, prompt, new_tokens):
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(ref.gpt2_forward(params, config, np.array([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def check(config, attn_implementation, rng):
    """Worst relative errors per precision, and whether greedy generation matched."""
    # Round to float32 first so that both sides hold the very same parameter values.
    params = {name: p.astype(np.float32).astype(np.float64)
              for name, p in ref.random_params(config, rng, scale=0.3).items()}
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[0, :3] = targets[2, 7] = -1
    expected_logits = ref.gpt2_forward(params, config, idx)
    expected_loss, expected_grads = ref.gpt2_loss_and_grads(params, config, idx, targets)

    model = hf_model(config, params, attn_implementation)
    errors = {}
    for precision, cast in (("float32", model.float), ("float64", model.double)):
        cast()
        loss, grads = hf_loss_and_grads(model, config, idx, targets)
        errors[precision] = {
            "logits": relative_error(hf_logits(model, idx), expected_logits),
            "loss": abs(loss - expected_loss) / expected_loss,
            "grads": max(relative_error(grads[name], expected_grads[name]) for name in expected_grads),
        }
    # float64 makes an argmax tie between the two sides vanishingly unlikely.
    generated = time_generate(model, PROMPT, NEW_TOKENS, threads=1)[1]
    generation_ok = generated == reference_greedy(params, config, PROMPT, NEW_TOKENS)

    cllm_model = Model(config)
    for name, value in params.items():
        cllm_model.params[name][...] = value
    hf_loss, hf_grads = hf_loss_and_grads(model, config, idx, targets)  # float64 HF
    (loss, _), grads = cllm_model.loss_and_grads(idx, targets, spheres=2, threads=2)
    errors["cllm vs HF"] = {
        "logits": relative_error(cllm_model.forward(idx), hf_logits(model, idx)),
        "loss": abs(loss - hf_loss) / hf_loss,
        "grads": max(relative_error(grads[name], hf_grads[name]) for name in hf_grads),
    }
    model.float()
    within_context = config.n_ctx - len(PROMPT)  # HF cannot slide past n_ctx
    hf_greedy = time_generate(model, PROMPT, within_context, threads=1)[1]
    cllm_greedy = cllm_model.generate_ids(PROMPT, within_context, temperature=0)
    return errors, generation_ok and hf_greedy == cllm_greedy


def main():
    rng = np.random.default_rng(0)
    all_ok = True
    for tie_embeddings in (True, False):
        config = ModelConfig(vocab_size=50, n_ctx=12, n_embd=16, n_layer=2, n_head=4, n_inner=40,
                             tie_embeddings=tie_embeddings, **GPT2_SWITCHES)
        for attn_implementation in ("sdpa", "eager"):
            errors, generation_ok = check(config, attn_implementation, rng)
            ok = generation_ok and all(err <= TOLERANCE[precision]
                                       for precision, by_kind in errors.items() for err in by_kind.values())
            all_ok &= ok
            figures = "  ".join(f"{precision} " + " ".join(f"{kind} {err:.1e}" for kind, err in by_kind.items())
                                for precision, by_kind in errors.items())
            print(f"tied={tie_embeddings!s:5} {attn_implementation:5}  {figures}  "
                  f"greedy {'same' if generation_ok else 'DIFFERENT'}  {'ok' if ok else 'FAIL'}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
