"""A fast batched decode step for mlx-lm's nanochat model: the rollouts' hot loop.

mlx-lm's model call builds ~25 small ops per layer from Python for every token, and its batch
cache adds more (offsets, masks) per layer; at 256 rows a decode step is bound by building and
launching those ops, not by the GPU. Here the per-layer work on each side of attention runs as two
compiled functions of fixed shape (shapes do not change between decode steps, so they trace once),
q/k/v come from one fused matmul, and the KV cache is preallocated. On MLX's CUDA backend the
attention part (RoPE, QK norm, cache write, attention over the prompt stored once per group) is one
kernel, utils/cuda_kernels/decode.py; elsewhere RoPE and the QK norm run once for q and k together and
MLX's fused attention reads a per-row cache filled by slice writes. The math is mlx-lm's nanochat model.
"""

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import decode as cuda_decode

# nanochat's RMSNorm epsilon and logit softcap. mlx-lm's nanochat model writes both as literals (rms_norm,
# softcap), so tests/test_nanochat_decode.py checks these against it; the CUDA kernel and benches read them here.
RMS_NORM_EPS = 1e-5
SOFTCAP = 15.0
PREFILL_ALIGN = 64  # prompt batches are prefilled in lengths of a multiple of this (the default; config prefill_align)


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

    def qkv_projection(x, qkv_arrays):  # alone for utils/cuda_kernels/decode.py, which does RoPE and the QK norm itself
        return _matmul(mx.fast.rms_norm(x, None, RMS_NORM_EPS), qkv_arrays, quantization)

    # Rows are (rows, width) and heads (rows, heads, 1, head_dim): with one token per row no transposes.
    def attention_inputs(x, qkv_arrays, rope_freqs, positions):
        qkv = qkv_projection(x, qkv_arrays).reshape(x.shape[0], qk_heads + n_kv_heads, 1, head_dim)
        qk = mx.fast.rope(qkv[:, :qk_heads], head_dim, traditional=False, base=None, scale=1.0,
                          offset=positions, freqs=rope_freqs)
        qk = mx.fast.rms_norm(qk, None, RMS_NORM_EPS)  # nanochat's QK norm, after RoPE
        return qk[:, :n_heads], qk[:, n_heads:], qkv[:, qk_heads:]

    def block_output(x, attention, proj_arrays, fc_arrays, fc_proj_arrays):
        h = _residual_matmul(x, attention.reshape(x.shape[0], -1), proj_arrays, quantization)
        mlp = _matmul(mx.fast.rms_norm(h, None, RMS_NORM_EPS), fc_arrays, quantization)
        return _residual_matmul(h, nn.relu2(mlp), fc_proj_arrays, quantization)

    def logits(x, head_arrays):
        out = _matmul(mx.fast.rms_norm(x, None, RMS_NORM_EPS), head_arrays, quantization)
        return SOFTCAP * mx.tanh(out / SOFTCAP)

    return (mx.compile(attention_inputs), mx.compile(block_output), mx.compile(logits),
            mx.compile(qkv_projection))


@dataclass
class _LayerArrays:
    qkv: tuple
    proj: tuple
    fc: tuple
    fc_proj: tuple


class NanochatDecoder:
    """Decode `group_size` rows per prompt in one batch; `step(tokens)` -> next-token logits.

    The prompts are prefilled together, once each (all but their last token). Row r's token at
    decode step t sits at RoPE position len(prompt_r) - 1 + t. Two cache layouts:
    - with utils/cuda_kernels/decode.py's kernel (MLX's CUDA backend): each prompt's keys are stored once and
      each row's generated keys on their own, so nothing is padded or masked;
    - elsewhere: each prompt's cache is copied to its group's rows, left-padded to the longest
      prompt, and MLX's fused attention runs with a mask over the padding.

    `prefilled`: as for the engine's MlxLmDecoder, a list with an mlx-lm prompt cache per prompt that already
    holds all of it but its last token (here one prompt: a chat's kept cache), so nothing is prefilled. The
    per-row layout is used then, which row_cache() reads to hand the cache back.
    """

    def __init__(self, model, prompts, group_size, max_new_tokens, use_kernel=None, prefilled=None,
                 prefill_align=PREFILL_ALIGN):
        self.prefill_align = prefill_align
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
        kernel_fits = cuda_decode.supports_shape(self.n_heads, self.n_kv_heads, self.head_dim, self.scale)
        if prefilled is not None and (len(prompts) != 1 or use_kernel):
            raise ValueError("NanochatDecoder: a prefilled cache is one prompt's and needs the per-row layout; "
                             "pass one prompt and use_kernel=None or False with it")
        self.prefilled = prefilled
        if use_kernel is None:
            use_kernel = cuda_kernels.available() and kernel_fits and prefilled is None
        elif use_kernel and not (cuda_kernels.available() and kernel_fits):
            raise ValueError("NanochatDecoder: use_kernel=True needs MLX's CUDA backend on the GPU, the kernels "
                             f"switched on ({cuda_kernels.ENV_VAR}) and a head shape utils/cuda_kernels/decode.py "
                             "supports; pass use_kernel=None to choose automatically")
        self.use_kernel = use_kernel
        self.t = 0
        prefix_lens = [len(p) - 1 for p in prompts]
        self.prefix_len = max(prefix_lens)
        self.capacity = max_new_tokens
        self.cache_dtype = self._cache_dtype()
        if self.use_kernel:
            self._cache_per_prompt(prompts, prefix_lens, group_size)
        else:
            self._cache_per_row(prompts, prefix_lens, group_size)

    def _cache_dtype(self):
        """The dtype of the keys a decode step writes (dtype inference only: nothing is evaluated)."""
        probe = mx.fast.rms_norm(self.model.transformer.wte(mx.array([0])), None, RMS_NORM_EPS)
        return self.functions[0](probe, self.layers[0].qkv, self.rope_freqs, mx.array([0]))[1].dtype

    def _prefill(self, prompts, prefix_lens):
        """All prompts (but their last token) in one forward, right-padded so the causal mask is the
        only mask and every real token sits at its true position: each layer's (keys, values) of
        shape (prompts, kv_heads, prefix_len, head_dim), prompt p's in columns [0, prefix_lens[p])."""
        width = self.prefix_len
        if self.prefilled is not None:
            return [(c.keys[..., :width, :], c.values[..., :width, :]) for c in self.prefilled[0]]
        # The forward's length is rounded up so that steps with other prompts reuse its shape: on CUDA
        # MLX's fused attention plans every new shape anew, each time it meets one.
        padded = -(-width // self.prefill_align) * self.prefill_align
        tokens = mx.array([p[:n] + [0] * (padded - n) for p, n in zip(prompts, prefix_lens)], dtype=mx.int32)
        cache = make_prompt_cache(self.model)
        self.model(tokens, cache=cache)
        return [(c.keys[..., :width, :], c.values[..., :width, :]) for c in cache]

    def _cache_per_prompt(self, prompts, prefix_lens, group_size):
        dtype = self.cache_dtype
        empty = mx.zeros((len(prompts), self.n_kv_heads, 1, self.head_dim), dtype)  # only one-token prompts
        prefix = self._prefill(prompts, prefix_lens) if self.prefix_len > 0 else [(empty, empty)] * len(self.layers)
        self.prompt_kv = [(mx.contiguous(k.astype(dtype)), mx.contiguous(v.astype(dtype))) for k, v in prefix]
        rows = len(prompts) * group_size
        self.generated_kv = []
        for keys, values in self.prompt_kv:
            self.generated_kv.append(mx.zeros((rows, 2, self.n_kv_heads, self.capacity, self.head_dim), dtype))
            mx.eval(keys, values, self.generated_kv[-1])
        self.row_prompt = mx.array([p for p in range(len(prompts)) for _ in range(group_size)], dtype=mx.int32)
        self.prompt_lens = mx.array(prefix_lens, dtype=mx.int32)
        self.inv_freq = (1.0 / self.rope_freqs).astype(mx.float32)  # mx.fast.rope's angle per position

    def _cache_per_row(self, prompts, prefix_lens, group_size):
        width = self.prefix_len
        capacity = width + self.capacity
        dtype = self.cache_dtype
        prefix = self._rolled_prefill(prompts, prefix_lens) if width > 0 else None
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

    def _rolled_prefill(self, prompts, prefix_lens):
        """The prefill with each row's keys and values rolled right so they end at column prefix_len
        (the padding's values wrap to the front, where the decode mask hides them)."""
        width = self.prefix_len
        shift = mx.array([width - n for n in prefix_lens], dtype=mx.int32)
        source = ((mx.arange(width)[None] - shift[:, None]) % width)[:, None, :, None]  # (prompts, 1, width, 1)
        out = [(mx.take_along_axis(k, source, axis=2), mx.take_along_axis(v, source, axis=2))
               for k, v in self._prefill(prompts, prefix_lens)]
        mx.eval(out)
        return out

    def step(self, tokens):
        """(rows,) int32 tokens at decode step t -> (rows, vocab) logits for step t + 1."""
        if self.t >= self.capacity:  # mlx would silently drop a write past the buffer's end
            raise ValueError(f"NanochatDecoder.step: all {self.t} decode steps of this batch are used; "
                             f"make a decoder with a larger max_new_tokens")
        attention_inputs, block_output, logits, qkv_projection = self.functions
        x = mx.fast.rms_norm(self.model.transformer.wte(tokens), None, RMS_NORM_EPS)
        if self.use_kernel:
            step = mx.array([self.t], dtype=mx.int32)
            for layer, (prompt_k, prompt_v), generated_kv in zip(self.layers, self.prompt_kv, self.generated_kv):
                attention = cuda_decode.decode_attention(
                    qkv_projection(x, layer.qkv), self.inv_freq, step, self.row_prompt, self.prompt_lens,
                    prompt_k, prompt_v, generated_kv, self.n_heads, self.n_kv_heads, self.head_dim, RMS_NORM_EPS)
                x = block_output(x, attention, layer.proj, layer.fc, layer.fc_proj)
        else:
            column = self.prefix_len + self.t
            positions = self.start_positions + self.t
            mask = None
            if self.padded:  # the left padding of shorter prompts is not attended to
                mask = (mx.arange(column + 1) >= self.left_padding[:, None])[:, None, None, :]
            for layer, keys, values in zip(self.layers, self.keys, self.values):
                q, k, v = attention_inputs(x, layer.qkv, self.rope_freqs, positions)
                keys[..., column:column + 1, :] = k
                values[..., column:column + 1, :] = v
                attention = mx.fast.scaled_dot_product_attention(
                    q, keys[..., :column + 1, :], values[..., :column + 1, :], scale=self.scale, mask=mask)
                x = block_output(x, attention, layer.proj, layer.fc, layer.fc_proj)
        self.t += 1
        return logits(x, self.head)

    def row_cache(self, row):
        """Batch row `row`'s keys and values (its prompt and every token fed since) as an mlx-lm prompt cache
        (the per-row layout only)."""
        if self.use_kernel:
            raise ValueError("NanochatDecoder.row_cache reads the per-row layout: make the decoder with "
                             "use_kernel=False")
        start, end = int(self.left_padding[row].item()), self.prefix_len + self.t
        caches = []
        for keys, values in zip(self.keys, self.values):
            cache = KVCache()
            cache.keys = mx.contiguous(keys[row:row + 1, :, start:end])
            cache.values = mx.contiguous(values[row:row + 1, :, start:end])
            cache.offset = end - start
            caches.append(cache)
        return caches

    def filter(self, keep):
        """Keep only these batch rows (an int array of row indices)."""
        if self.use_kernel:
            self.generated_kv = [g[keep] for g in self.generated_kv]
            self.row_prompt = self.row_prompt[keep]
            return
        self.keys = [k[keep] for k in self.keys]
        self.values = [v[keep] for v in self.values]
        self.start_positions = self.start_positions[keep]
        self.left_padding = self.left_padding[keep]
