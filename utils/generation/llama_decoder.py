"""A fast batched decode step for mlx-lm's Llama and Qwen families (mlx-lm's llama, qwen2 and qwen3 modules:
model types llama, qwen2, qwen3, and those mlx-lm maps to llama, such as mistral).

The structure is utils/nanochat/decoder.py's, whose cache layouts, shared prompt prefill, filter and row_cache
this decoder inherits: the per-layer work on each side of attention runs as two compiled functions of fixed
shape (traced once, reused by every layer and step), q/k/v come from one matmul and gate/up from another, and
the KV cache is preallocated. What differs is the model's math, read from mlx-lm's modules: RMSNorms with
weights, q/k/v biases (qwen2, llama's attention_bias), Qwen3's q/k norms before RoPE, RoPE through the
model's own rope module (default, linear or llama3 scaling), SwiGLU, tied or untied embeddings. On MLX's
CUDA backend the attention part is utils/cuda_kernels/decode.py's kernel (with qk_norm=False: RoPE only)
where the head shape fits; elsewhere MLX's fused attention over the per-row cache.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.activations import swiglu
from mlx_lm.models.rope_utils import Llama3RoPE

from mlx_grpo.cuda_kernels import decode as cuda_decode
from mlx_grpo.generation.fused_linear import linear_arrays, linear_spec, matmul, residual_matmul
from mlx_grpo.nanochat.decoder import PREFILL_ALIGN, NanochatDecoder

MODEL_CLASSES = (llama.Model, qwen2.Model, qwen3.Model)  # exactly these: a subclass may change the forward
# Rope modules whose call is mx.fast.rope on x alone, so per-row position offsets work (dynamic NTK reads a
# scalar offset; Yarn and longrope scale x first and stay on mlx-lm's path).
ROPE_TYPES = (nn.RoPE, Llama3RoPE)


def _blocks(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None) or []


def _head_layer(model):
    """The output projection: lm_head, or the embedding used as a linear layer (tied embeddings)."""
    return model.lm_head if "lm_head" in model else model.model.embed_tokens


def _head_spec(layer):
    if type(layer) is nn.Embedding:
        return ("linear", None)
    if type(layer) is nn.QuantizedEmbedding:
        return ("quantized", (layer.group_size, layer.bits, layer.mode))
    return linear_spec(layer)


def _has_bias(layers):
    """True if all these layers have a bias, False if none has; None if some have (not supported)."""
    flags = {"bias" in l for l in layers}
    return flags.pop() if len(flags) == 1 else None


def _block_parts(block):
    attn, mlp = block.self_attn, block.mlp
    return attn, mlp, [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]


def supports(model) -> bool:
    """True for a model of MODEL_CLASSES with full attention in every layer, a rope of ROPE_TYPES, and
    linear layers all plain or all equally quantized (the head may be quantized on its own); no adapters."""
    if type(model) not in MODEL_CLASSES or not _blocks(model):
        return False
    if any(t != "full_attention" for t in getattr(model.args, "layer_types", None) or []):
        return False
    specs, eps, structure = set(), set(), set()
    for block in _blocks(model):
        attn, mlp, qkv, gate_up = _block_parts(block)
        norms = [block.input_layernorm, block.post_attention_layernorm]
        qk_norm = "q_norm" in attn
        if qk_norm:
            norms += [attn.q_norm, attn.k_norm]
        if type(attn.rope) not in ROPE_TYPES or any(type(n) is not nn.RMSNorm for n in norms):
            return False
        specs |= {linear_spec(l, allow_bias=True) for l in qkv + gate_up + [attn.o_proj, mlp.down_proj]}
        eps |= {n.eps for n in norms}
        structure.add((qk_norm, _has_bias(qkv), "bias" in attn.o_proj, _has_bias(gate_up + [mlp.down_proj]),
                       _rope_key(attn.rope)))
    if type(model.model.norm) is not nn.RMSNorm or _head_spec(_head_layer(model)) is None:
        return False
    eps.add(model.model.norm.eps)
    uniform = len(specs) == 1 and None not in specs and len(eps) == 1 and len(structure) == 1
    return uniform and None not in structure.pop()  # every block alike, no partly biased projections


def _rope_key(rope):
    """A hashable fingerprint of a rope module (its settings and frequency arrays): equal keys, equal math."""
    settings = tuple(sorted((k, v) for k, v in vars(rope).items() if not k.startswith("_")))
    arrays = tuple((k, np.array(v).tobytes()) for k, v in sorted(rope.items()))
    return (type(rope).__name__, settings, arrays)


def _kernel_rope_freqs(rope, head_dim):
    """mx.fast.rope's `freqs` (position / freqs = angle) equal to this rope module's, or None where the kernel's
    RoPE (rotate-half over the whole head) is not the module's."""
    if rope.traditional or rope.dims != head_dim:
        return None
    if type(rope) is nn.RoPE:
        return (rope.base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)) / rope.scale
    if type(rope) is Llama3RoPE:
        return rope._freqs.astype(mx.float32)
    return None


_STEP_FUNCTIONS = {}  # (shape, quantization, eps, biases, rope key) -> compiled functions; rope modules are unhashable


def _step_functions(shape, quantization, eps, biases, rope):
    """The compiled pieces of a decode step around attention, for one model structure (`rope`: the model's rope
    module, read when tracing)."""
    key = (shape, quantization, eps, biases, _rope_key(rope))
    if key not in _STEP_FUNCTIONS:
        _STEP_FUNCTIONS[key] = _build_step_functions(shape, quantization, eps, biases, rope)
    return _STEP_FUNCTIONS[key]


def _build_step_functions(shape, quantization, eps, biases, rope):
    n_heads, n_kv_heads, head_dim, intermediate, qk_norm = shape
    qkv_bias, o_bias, mlp_bias = biases
    qk_heads = n_heads + n_kv_heads

    def linear(x, arrays, bias):
        out = matmul(x, arrays, quantization)
        return out + bias if bias is not None else out

    # (rows, heads, head_dim), q and k normed as mlx-lm's Qwen3 does (before RoPE). The CUDA kernel takes the
    # projection without those norms (with_qk_norm=False) and applies them itself.
    def make_qkv_projection(with_qk_norm):
        def qkv_projection(x, norm_weight, qkv_arrays, qkv_biases, q_norm_weight, k_norm_weight):
            out = linear(mx.fast.rms_norm(x, norm_weight, eps), qkv_arrays, qkv_biases if qkv_bias else None)
            out = out.reshape(x.shape[0], qk_heads + n_kv_heads, head_dim)
            if with_qk_norm:
                q = mx.fast.rms_norm(out[:, :n_heads], q_norm_weight, eps)
                k = mx.fast.rms_norm(out[:, n_heads:qk_heads], k_norm_weight, eps)
                out = mx.concatenate([q, k, out[:, qk_heads:]], axis=1)
            return out

        return qkv_projection

    qkv_projection = make_qkv_projection(qk_norm)

    # Heads as (rows, heads, 1, head_dim): with one token per row no transposes.
    def attention_inputs(x, norm_weight, qkv_arrays, qkv_biases, q_norm_weight, k_norm_weight, positions):
        qkv = qkv_projection(x, norm_weight, qkv_arrays, qkv_biases, q_norm_weight, k_norm_weight)[:, :, None]
        qk = rope(qkv[:, :qk_heads], offset=positions)
        return qk[:, :n_heads], qk[:, n_heads:], qkv[:, qk_heads:]

    def block_output(x, attention, o_arrays, o_biases, norm_weight, gate_up_arrays, gate_up_biases, down_arrays,
                     down_biases):
        h = residual_matmul(x, attention.reshape(x.shape[0], -1), o_arrays, quantization)
        if o_bias:
            h = h + o_biases
        gate_up = linear(mx.fast.rms_norm(h, norm_weight, eps), gate_up_arrays, gate_up_biases if mlp_bias else None)
        out = residual_matmul(h, swiglu(gate_up[:, :intermediate], gate_up[:, intermediate:]), down_arrays,
                              quantization)
        return out + down_biases if mlp_bias else out

    return mx.compile(attention_inputs), mx.compile(block_output), mx.compile(make_qkv_projection(False))


@lru_cache(maxsize=None)
def _logits_function(eps, quantization):
    def logits(x, norm_weight, head_arrays):
        return matmul(mx.fast.rms_norm(x, norm_weight, eps), head_arrays, quantization)

    return mx.compile(logits)


def _bias(layers):
    return mx.concatenate([l.bias for l in layers]) if "bias" in layers[0] else mx.zeros((0,))


def _weight(norm):
    return norm.weight if norm is not None else mx.zeros((0,))


class _LayerArrays:
    """One block's weights, in the order the compiled step functions take them."""

    window = None  # every earlier key (sliding-window models keep mlx-lm's path)

    def __init__(self, block):
        attn, mlp, qkv, gate_up = _block_parts(block)
        self.qk_norm_weights = (_weight(attn.get("q_norm")), _weight(attn.get("k_norm")))  # Qwen3's
        self.attention = (block.input_layernorm.weight, linear_arrays(qkv), _bias(qkv), *self.qk_norm_weights)
        self.output = (linear_arrays([attn.o_proj]), _bias([attn.o_proj]), block.post_attention_layernorm.weight,
                       linear_arrays(gate_up), _bias(gate_up), linear_arrays([mlp.down_proj]), _bias([mlp.down_proj]))


class LlamaDecoder(NanochatDecoder):
    """Decode `group_size` rows per prompt in one batch; `step(tokens)` -> next-token logits.

    Prompts, cache layouts (the CUDA kernel's per-prompt one, the per-row one elsewhere), `prefilled`,
    `filter` and `row_cache` as NanochatDecoder's. `model` must pass supports().
    """

    smear = None  # nanochat 2026's, which the base decoder reads
    is_2026 = False

    def __init__(self, model, prompts, group_size, max_new_tokens, use_kernel=None, prefilled=None,
                 alternate_buffers=None, prefill_align=PREFILL_ALIGN):
        self.prefill_align = prefill_align
        blocks = _blocks(model)
        attn, mlp, _, _ = _block_parts(blocks[0])
        self.model = model
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.head_dim = attn.q_proj.weight.shape[0] // self.n_heads  # quantized weights keep their output rows
        self.scale = attn.scale
        self.qk_norm = "q_norm" in attn
        self.embed = model.model.embed_tokens
        eps = self.eps = blocks[0].input_layernorm.eps  # every norm's (supports())
        shape = (self.n_heads, self.n_kv_heads, self.head_dim, mlp.gate_proj.weight.shape[0], self.qk_norm)
        biases = ("bias" in attn.q_proj, "bias" in attn.o_proj, "bias" in mlp.down_proj)
        quantization = linear_spec(attn.q_proj, allow_bias=True)[1]
        self.functions = _step_functions(shape, quantization, eps, biases, attn.rope)
        head = _head_layer(model)
        self.logits = _logits_function(eps, _head_spec(head)[1])
        self.final_norm = model.model.norm.weight
        self.head = linear_arrays([head])
        self.layers = [_LayerArrays(b) for b in blocks]
        self.rope_freqs = _kernel_rope_freqs(attn.rope, self.head_dim)  # the kernel's RoPE (None: no kernel)
        kernel_fits = self.rope_freqs is not None and cuda_decode.supports_shape(
            self.n_heads, self.n_kv_heads, self.head_dim)
        self.no_window = mx.array([cuda_decode.window_arg(None)], dtype=mx.int32)
        self._setup_cache(prompts, group_size, max_new_tokens, use_kernel, prefilled, kernel_fits, alternate_buffers)

    def _cache_dtype(self):
        """The dtype of the keys a decode step writes (dtype inference only: nothing is evaluated)."""
        probe = self.embed(mx.array([0]))
        return self.functions[0](probe, *self.layers[0].attention, mx.array([0]))[1].dtype

    def step(self, tokens):
        """(rows,) int32 tokens at decode step t -> (rows, vocab) logits for step t + 1."""
        self._check_capacity()
        attention_inputs, block_output, qkv_projection = self.functions
        x = self.embed(tokens)
        if self.use_kernel:
            step = mx.array([self.t], dtype=mx.int32)
            for layer, (prompt_k, prompt_v), generated_kv in zip(self.layers, self.prompt_kv, self.generated_kv):
                qkv = qkv_projection(x, *layer.attention).reshape(x.shape[0], -1)
                attention = cuda_decode.decode_attention(
                    qkv, self.inv_freq, step, self.row_prompt, self.prompt_lens, prompt_k, prompt_v, generated_kv,
                    self.no_window, self.n_heads, self.n_kv_heads, self.head_dim, self.eps, self.scale,
                    qk_norm=False, pre_rope_norm=layer.qk_norm_weights if self.qk_norm else None)
                x = block_output(x, attention, *layer.output)
        else:
            column = self.prefix_len + self.t
            positions = self.start_positions + self.t
            view = self._window_views(column)[None]
            for i, layer in enumerate(self.layers):
                q, k, v = attention_inputs(x, *layer.attention, positions)
                attention = self._per_row_attention(i, column, q, k, v, view)
                x = block_output(x, attention, *layer.output)
        self.t += 1
        return self.logits(x, self.final_norm, self.head)
