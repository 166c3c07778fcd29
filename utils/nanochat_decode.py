"""A fast batched decode step for mlx-lm's nanochat model: the rollouts' hot loop.

mlx-lm's model call builds ~25 small ops per layer from Python for every token, and its batch
cache adds more (offsets, masks) per layer; at 256 rows a decode step is bound by building and
launching those ops, not by the GPU. Here the per-layer work on each side of attention runs as two
compiled functions of fixed shape (shapes do not change between decode steps, so they trace once),
q/k/v come from one fused matmul, RoPE and the QK norm run once for q and k together, and the KV
cache is one preallocated buffer per layer written in place. The math is mlx-lm's nanochat model.
"""

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

EPS = 1e-5  # nanochat's RMSNorm epsilon (mlx-lm's nanochat.rms_norm)
SOFTCAP = 15.0  # nanochat's logit softcap


def _linear_spec(layer):
    """(kind, quantization) of a plain or quantized linear layer; None for anything else (adapters)."""
    if type(layer) is nn.Linear and "bias" not in layer:
        return ("linear", None)
    if type(layer) is nn.QuantizedLinear and "bias" not in layer:
        return ("quantized", (layer.group_size, layer.bits, layer.mode))
    return None


def _linear_arrays(layers):
    """Weights of several linear layers stacked along their output axis (one matmul for all)."""
    if type(layers[0]) is nn.Linear:
        return (mx.concatenate([l.weight for l in layers], axis=0),)
    keys = ("weight", "scales", "biases") if "biases" in layers[0] else ("weight", "scales")
    return tuple(mx.concatenate([l[k] for l in layers], axis=0) for k in keys)


def _matmul(x, arrays, quantization):
    if quantization is None:
        return x @ arrays[0].T
    group_size, bits, mode = quantization
    biases = arrays[2] if len(arrays) == 3 else None
    return mx.quantized_matmul(x, arrays[0], arrays[1], biases, transpose=True, group_size=group_size,
                               bits=bits, mode=mode)


def _residual_matmul(residual, x, arrays, quantization):
    """residual + x @ W.T; one GEMM (its beta term) instead of a GEMM and an add kernel."""
    if quantization is None:
        return mx.addmm(residual, x, arrays[0].T)
    return residual + _matmul(x, arrays, quantization)


def supports(model) -> bool:
    """True for an mlx-lm nanochat model whose linear layers are all plain or all equally quantized."""
    if getattr(model, "model_type", None) != "nanochat" or not hasattr(model, "transformer"):
        return False
    linears = [model.lm_head]
    for block in model.transformer.h:
        linears += [block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj,
                    block.mlp.c_fc, block.mlp.c_proj]
    specs = {_linear_spec(l) for l in linears}
    return len(specs) == 1 and None not in specs


@lru_cache(maxsize=None)
def _step_functions(n_heads, n_kv_heads, head_dim, quantization):
    """The compiled pieces of a decode step around attention, for one model shape."""
    qk_heads = n_heads + n_kv_heads

    # Rows are (rows, width) and heads (rows, heads, 1, head_dim): with one token per row no transposes.
    def attention_inputs(x, qkv_arrays, rope_freqs, positions):
        qkv = _matmul(mx.fast.rms_norm(x, None, EPS), qkv_arrays, quantization)
        qkv = qkv.reshape(x.shape[0], qk_heads + n_kv_heads, 1, head_dim)
        qk = mx.fast.rope(qkv[:, :qk_heads], head_dim, traditional=False, base=None, scale=1.0,
                          offset=positions, freqs=rope_freqs)
        qk = mx.fast.rms_norm(qk, None, EPS)  # nanochat's QK norm, after RoPE
        return qk[:, :n_heads], qk[:, n_heads:], qkv[:, qk_heads:]

    def block_output(x, attention, proj_arrays, fc_arrays, fc_proj_arrays):
        h = _residual_matmul(x, attention.reshape(x.shape[0], -1), proj_arrays, quantization)
        mlp = _matmul(mx.fast.rms_norm(h, None, EPS), fc_arrays, quantization)
        return _residual_matmul(h, nn.relu2(mlp), fc_proj_arrays, quantization)

    def logits(x, head_arrays):
        out = _matmul(mx.fast.rms_norm(x, None, EPS), head_arrays, quantization)
        return SOFTCAP * mx.tanh(out / SOFTCAP)

    return mx.compile(attention_inputs), mx.compile(block_output), mx.compile(logits)


@dataclass
class _LayerArrays:
    qkv: tuple
    proj: tuple
    fc: tuple
    fc_proj: tuple


class NanochatDecoder:
    """Decode `group_size` rows per prompt in one batch; `step(tokens)` -> next-token logits.

    The prompts are prefilled together, once each (all but their last token), and each prompt's cache
    is copied to its group's rows, left-padded to the longest prompt. Row r's token at decode step t sits at buffer column
    prefix_len + t and at RoPE position len(prompt_r) - 1 + t.
    """

    def __init__(self, model, prompts, group_size, max_new_tokens):
        attn = model.transformer.h[0].attn
        self.model = model
        self.n_heads, self.n_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.scale
        self.rope_freqs = attn._rope_freqs
        spec = _linear_spec(model.lm_head)
        self.functions = _step_functions(self.n_heads, self.n_kv_heads, self.head_dim, spec[1])
        self.layers = [
            _LayerArrays(_linear_arrays([b.attn.c_q, b.attn.c_k, b.attn.c_v]), _linear_arrays([b.attn.c_proj]),
                         _linear_arrays([b.mlp.c_fc]), _linear_arrays([b.mlp.c_proj]))
            for b in model.transformer.h
        ]
        self.head = _linear_arrays([model.lm_head])
        self._prefill(prompts, group_size, max_new_tokens)

    def _prefill(self, prompts, group_size, max_new_tokens):
        prefix_lens = [len(p) - 1 for p in prompts]
        self.prefix_len = width = max(prefix_lens)
        capacity = width + max_new_tokens
        # The cache's dtype is that of the keys a decode step writes (dtype inference only: not evaluated).
        probe = mx.fast.rms_norm(self.model.transformer.wte(mx.array([0])), None, EPS)
        dtype = self.functions[0](probe, self.layers[0].qkv, self.rope_freqs, mx.array([0]))[1].dtype
        prefix = self._batched_prefill(prompts, prefix_lens) if width > 0 else None
        self.keys, self.values = [], []
        for layer in range(len(self.layers)):
            if prefix is None:  # only one-token prompts: nothing to prefill
                keys = values = mx.zeros((len(prompts), self.n_kv_heads, 0, self.head_dim), dtype)
            else:
                keys, values = prefix[layer]
            keys, values = mx.repeat(keys, group_size, axis=0), mx.repeat(values, group_size, axis=0)
            free = mx.zeros((keys.shape[0], self.n_kv_heads, capacity - width, self.head_dim), keys.dtype)
            self.keys.append(mx.concatenate([keys, free], axis=2))
            self.values.append(mx.concatenate([values, free], axis=2))
            mx.eval(self.keys[-1], self.values[-1])
        lens = [n for n in prefix_lens for _ in range(group_size)]
        self.start_positions = mx.array(lens, dtype=mx.int32)  # RoPE position of each row's first decoded token
        self.left_padding = mx.array([width - n for n in lens], dtype=mx.int32)
        self.padded = any(n != width for n in lens)
        self.t = 0

    def _batched_prefill(self, prompts, prefix_lens):
        """All prompts (but their last token) in one forward, right-padded so the causal mask is the
        only mask and every real token sits at its true position; then each row's keys and values
        are rolled right so they end at column prefix_len (the padding's values wrap to the front,
        where the decode mask hides them)."""
        width = self.prefix_len
        tokens = mx.array([p[:n] + [0] * (width - n) for p, n in zip(prompts, prefix_lens)], dtype=mx.int32)
        cache = make_prompt_cache(self.model)
        self.model(tokens, cache=cache)
        shift = mx.array([width - n for n in prefix_lens], dtype=mx.int32)
        source = ((mx.arange(width)[None] - shift[:, None]) % width)[:, None, :, None]  # (prompts, 1, width, 1)
        out = []
        for c in cache:
            keys, values = c.keys[..., :width, :], c.values[..., :width, :]
            out.append((mx.take_along_axis(keys, source, axis=2), mx.take_along_axis(values, source, axis=2)))
        mx.eval(out)
        return out

    def step(self, tokens):
        """(rows,) int32 tokens at decode step t -> (rows, vocab) logits for step t + 1."""
        attention_inputs, block_output, logits = self.functions
        column = self.prefix_len + self.t
        if column >= self.keys[0].shape[2]:  # mlx would silently drop a write past the buffer's end
            raise ValueError(f"NanochatDecoder.step: all {self.t} decode steps of this batch are used; "
                             f"make a decoder with a larger max_new_tokens")
        positions = self.start_positions + self.t
        mask = None
        if self.padded:  # the left padding of shorter prompts is not attended to
            mask = (mx.arange(column + 1) >= self.left_padding[:, None])[:, None, None, :]
        x = mx.fast.rms_norm(self.model.transformer.wte(tokens), None, EPS)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = attention_inputs(x, layer.qkv, self.rope_freqs, positions)
            keys[..., column:column + 1, :] = k
            values[..., column:column + 1, :] = v
            attention = mx.fast.scaled_dot_product_attention(
                q, keys[..., :column + 1, :], values[..., :column + 1, :], scale=self.scale, mask=mask)
            x = block_output(x, attention, layer.proj, layer.fc, layer.fc_proj)
        self.t += 1
        return logits(x, self.head)

    def filter(self, keep):
        """Keep only these batch rows (an int array of row indices)."""
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.start_positions = self.start_positions[keep]
        self.left_padding = self.left_padding[keep]
