"""Linear layers of a decode step as raw arrays: several layers stacked into one matmul, plain or quantized.

Shared by the fast decoders (utils/nanochat/decoder.py, utils/generation/llama_decoder.py): their compiled
step functions take weights as arrays, so one traced function serves every layer of a model.
"""

import mlx.core as mx
import mlx.nn as nn


def linear_spec(layer, allow_bias=False):
    """(kind, quantization) of a plain or quantized linear layer; None for anything else (adapters), and for a
    layer with a bias unless `allow_bias` (the caller then adds the bias itself)."""
    if "bias" in layer and not allow_bias:
        return None
    if type(layer) is nn.Linear:
        return ("linear", None)
    if type(layer) is nn.QuantizedLinear:
        return ("quantized", (layer.group_size, layer.bits, layer.mode))
    return None


def linear_arrays(layers):
    """Weights of several linear layers stacked along their output axis (one matmul for all)."""
    if "scales" not in layers[0]:
        return (mx.concatenate([l.weight for l in layers], axis=0),)
    keys = ("weight", "scales", "biases") if "biases" in layers[0] else ("weight", "scales")
    return tuple(mx.concatenate([l[k] for l in layers], axis=0) for k in keys)


def matmul(x, arrays, quantization):
    if quantization is None:
        return x @ arrays[0].T
    group_size, bits, mode = quantization
    biases = arrays[2] if len(arrays) == 3 else None
    return mx.quantized_matmul(x, arrays[0], arrays[1], biases, transpose=True, group_size=group_size,
                               bits=bits, mode=mode)


def residual_matmul(residual, x, arrays, quantization):
    """residual + x @ W.T; one GEMM (its beta term) instead of a GEMM and an add kernel."""
    if quantization is None:
        return mx.addmm(residual, x, arrays[0].T)
    return residual + matmul(x, arrays, quantization)
