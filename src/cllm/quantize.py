"""Weights quantized for generation: bf16 or int8 copies of the matrices generation reads, and
the tensors a .cllm file of each weight format holds.

The quantized matrices are the four of each layer that generation reads
(_core.DECODER_MATRICES), the token table wte and, when untied, the output head lm_head.weight.
Each is stored rows by output, (OC, IC), so that a thread of the core reads whole rows: the
layer matrices, (IC, OC) in the model (Hugging Face's Conv1D layout), are transposed; wte and
lm_head.weight, (V, C), already are. A bf16 matrix is `<name>.bf16`, the bfloat16 bits (BF16);
an int8 one is `<name>.q8` (I8, each row zero-padded to K, a multiple of _core.Q8_BLOCK)
and `<name>.q8_scale` (F32, one scale per block of Q8_BLOCK weights, like llama.cpp's Q8_0).
Every other tensor (LayerNorms, biases, wpe) stays float32 under its own name.

The quantizers are the core's (quantize_q8, bf16_round), the same code generation runs."""
from __future__ import annotations

import numpy as np

from . import _core
from .config import ModelConfig

FORMATS = ("bf16", "int8")


def quantized_tensor_specs(config: ModelConfig,
                           weights: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype code, shape) of every tensor a .cllm file of `weights`
    ("float32", "bf16" or "int8") holds, in file order."""
    if weights == "float32":
        return {name: ("F32", shape) for name, shape in config.tensor_shapes()}
    _check_format(weights)
    matrices = _quantized_matrices(config)
    specs = {}
    for name, shape in config.tensor_shapes():
        if name not in matrices:
            specs[name] = ("F32", shape)
            continue
        OC, IC = shape[::-1] if _is_layer_matrix(name) else shape
        if weights == "bf16":
            specs[f"{name}.bf16"] = ("BF16", (OC, IC))
        else:
            K = -(-IC // _core.Q8_BLOCK) * _core.Q8_BLOCK
            specs[f"{name}.q8"] = ("I8", (OC, K))
            specs[f"{name}.q8_scale"] = ("F32", (OC, K // _core.Q8_BLOCK))
    return specs


def quantize_tensors(config: ModelConfig, params: dict[str, np.ndarray],
                     to: str) -> dict[str, np.ndarray]:
    """The tensors of quantized_tensor_specs(config, to), in its order, from the float32
    parameters `params` (named as in config.tensor_shapes())."""
    _check_format(to)
    matrices = _quantized_matrices(config)
    tensors = {}
    for name, _ in config.tensor_shapes():
        if name not in matrices:
            tensors[name] = np.ascontiguousarray(params[name], dtype=np.float32)
            continue
        matrix = params[name].T if _is_layer_matrix(name) else params[name]
        rows = np.ascontiguousarray(matrix, dtype=np.float32)
        if to == "bf16":
            tensors[f"{name}.bf16"] = _core.bf16_round(rows.reshape(-1)).reshape(rows.shape)
        else:
            tensors[f"{name}.q8"], tensors[f"{name}.q8_scale"] = _core.quantize_q8(rows)
    return tensors


def decoder_matrices(config: ModelConfig, tensors: dict[str, np.ndarray], weights: str) -> list:
    """The matrices of Transformer.use_weights from the tensors of a file of `weights`: those
    of each layer in DECODER_MATRICES order, then the head, then the token table (with tied
    embeddings, the same arrays twice)."""
    _check_format(weights)

    def matrix(name: str):
        if weights == "bf16":
            return tensors[f"{name}.bf16"]
        return tensors[f"{name}.q8"], tensors[f"{name}.q8_scale"]

    head = "wte" if config.tie_embeddings else "lm_head.weight"
    return ([matrix(f"h.{layer}.{name}") for layer in range(config.n_layer)
             for name in _core.DECODER_MATRICES]
            + [matrix(head), matrix("wte")])


def _check_format(weights: str) -> None:
    if weights not in FORMATS:
        raise ValueError(f"quantized weights are {' or '.join(FORMATS)}, not {weights!r}")


def _quantized_matrices(config: ModelConfig) -> set[str]:
    names = {f"h.{layer}.{name}" for layer in range(config.n_layer)
             for name in _core.DECODER_MATRICES}
    names.add("wte")
    if not config.tie_embeddings:
        names.add("lm_head.weight")
    return names


def _is_layer_matrix(name: str) -> bool:
    # a layer's matrices are Conv1D weights, (IC, OC), transposed to be stored rows by output;
    # wte and lm_head.weight are (V, C), rows by output already
    return name.startswith("h.")

