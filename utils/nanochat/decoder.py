"""A fast batched decode step for nanochat models (mlx-lm's October-2025 `nanochat` and our `nanochat_2026`).

mlx-lm's model call builds ~25 small ops per layer from Python for every token, and its batch
cache adds more (offsets, masks) per layer; at 256 rows a decode step is bound by building and
launching those ops, not by the GPU. Here the per-layer work on each side of attention runs as two
compiled functions of fixed shape (shapes do not change between decode steps, so they trace once),
q/k/v come from one fused matmul, and the KV cache is preallocated. On MLX's CUDA backend the
attention part (RoPE, QK norm, cache write, attention over the prompt stored once per group) is one
kernel, utils/cuda_kernels/decode.py; elsewhere the QK norm runs once for all heads, RoPE once for q and k together, and
MLX's fused attention reads a per-row cache filled by slice writes (on CUDA with the kernels off, masked
attention is written out as two matmuls: attention_by_gemm). The math is the model's own: for
the 2026 architecture (utils/nanochat/model.py) also the resid/x0 lambdas, value embeddings and their
gates, smear (the previous token's normed embedding carried per row), backout, GQA, the head's padded
rows (dropped here) and sliding windows (a query at p reads the keys p-w..p).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import decode as cuda_decode
from mlx_grpo.generation.fused_linear import linear_arrays as _linear_arrays
from mlx_grpo.generation.fused_linear import linear_spec as _linear_spec
from mlx_grpo.generation.fused_linear import matmul as _matmul
from mlx_grpo.generation.fused_linear import residual_matmul as _residual_matmul

# nanochat's October-2025 RMSNorm epsilon and logit softcap. mlx-lm's nanochat model writes both as literals
# (rms_norm, softcap), so tests/test_nanochat_decode.py checks these against it; the benches read them here.
# A nanochat_2026 model states both in its config (rms_norm_eps, softcap).
RMS_NORM_EPS = 1e-5
SOFTCAP = 15.0
PREFILL_ALIGN = 64  # prompt batches are prefilled in lengths of a multiple of this (the default; config prefill_align)
# KV buffers per layer of the per-row layout when a decoder is not told (the trainer's rollout_kv_buffers
# "auto" takes this one where the memory plan fits it, else 1): two, so no decode step copies a whole cache.
ALTERNATE_BUFFERS = 2
# attention_by_gemm reads a multiple of this many columns (the extra ones masked): cuBLAS's kernels for rows of
# other lengths load element by element.
GEMM_COLUMNS_ALIGN = 8
MODEL_TYPES = ("nanochat", "nanochat_2026")
_EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


@lru_cache(maxsize=None)
def _unit_weight(width: int, dtype: mx.Dtype) -> mx.array:
    """A weight of ones for nanochat's weightless RMSNorm: x * 1 is exact, and MLX's CUDA RMSNorm takes its
    fast path only with a weight vector (bench/kernel_profile.py shows the weightless one among the largest kernels).
    Built from numpy so it is a constant even when first made while mx.compile traces."""
    return mx.array(np.ones(width, np.float32), dtype=dtype)


def _norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, _unit_weight(x.shape[-1], x.dtype), eps)


def masked_attention_by_hand() -> bool:
    """Whether the per-row layout's masked one-query attention is written out (attention_by_gemm) rather than
    MLX's fused call: on MLX's CUDA backend, whose fused one-query kernel takes no array mask, so MLX's fallback
    runs instead and scores each row with a one-row GEMV that is slower than cuBLAS. Metal's fused kernel takes the
    mask; the CPU's fallback is the same math."""
    return cuda_kernels.runs_on_cuda_gpu()


def query_rows(heads, kv_heads):
    """The rows per KV head of gemm_queries' queries (and of padding_bias)."""
    return max(2, heads // kv_heads)


def gemm_queries(q, kv_heads):
    """attention_by_gemm's queries from q (rows, heads, 1, head_dim): grouped per KV head as
    (rows, kv_heads, R, head_dim), and without GQA each query twice (R = 2), so that the score product has two rows
    and MLX's CUDA matmul runs it on cuBLAS rather than its one-row GEMV (bench/portable_attention.py). A copy
    kernel, not a compiled product: MLX's CUDA kernels for compiled ops over broadcast or strided inputs run
    several times slower than its copies (bench/kernel_profile.py)."""
    rows, heads, _, dim = q.shape
    shape = (rows, kv_heads, query_rows(heads, kv_heads), dim)
    return mx.contiguous(mx.broadcast_to(q, shape)) if heads == kv_heads else q.reshape(shape)


def padding_bias(allowed, kv_heads, query_rows, dtype):
    """attention_by_gemm's bias from a (rows, columns) boolean mask: 0 where it holds, -inf elsewhere, as a
    (rows, kv_heads, query_rows, columns) array of its own: made once per step, and each layer's addmm then reads
    it as cuBLAS's C matrix without a copy."""
    shape = (allowed.shape[0], kv_heads, query_rows, allowed.shape[1])
    return mx.where(mx.broadcast_to(allowed[:, None, None, :], shape), mx.array(0, dtype), mx.array(-mx.inf, dtype))


def attention_by_gemm(queries, keys, values, bias, scale, heads):
    """The masked attention of one query per row, as MLX's fallback computes it (scores in the inputs' dtype, a
    float32 softmax), written as two matmuls: `queries` from gemm_queries, keys and values (rows, kv_heads,
    columns, head_dim), `bias` from padding_bias. -> (rows, heads, 1, head_dim). The score matmul applies the scale
    and adds the mask itself (addmm), so scores, softmax and values are three launches."""
    rows, kv_heads, _, dim = queries.shape
    scores = mx.addmm(bias, queries, keys.swapaxes(-1, -2), alpha=scale)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights[:, :, : heads // kv_heads] @ values).reshape(rows, heads, 1, dim)


def _is_2026(model) -> bool:
    return getattr(model, "model_type", None) == "nanochat_2026"


def supports(model) -> bool:
    """True for a nanochat model (either architecture) whose block and head matrices are all plain or all
    equally quantized, its embeddings plain or quantized and its gates plain (so no adapters anywhere)."""
    if getattr(model, "model_type", None) not in MODEL_TYPES or not hasattr(model, "transformer"):
        return False
    linears = [model.lm_head]
    for block in model.transformer.h:
        linears += [block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn.c_proj,
                    block.mlp.c_fc, block.mlp.c_proj]
    specs = {_linear_spec(l) for l in linears}
    if len(specs) != 1 or None in specs or not isinstance(model.transformer.wte, _EMBEDDINGS):
        return False
    if not _is_2026(model):
        return True
    gates = [b.attn.ve_gate for b in model.transformer.h if "value_embed" in b.attn]
    gates += [model.smear_gate] if model.args.smear else []
    tables = [b.attn.value_embed for b in model.transformer.h if "value_embed" in b.attn]
    return (all(type(g) is nn.Linear and "bias" not in g for g in gates)
            and all(isinstance(t, _EMBEDDINGS) for t in tables))


@dataclass(frozen=True)
class _Spec:
    """The constants the compiled step functions are traced with (one set per model shape)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    quantization: Optional[tuple]
    eps: float
    softcap: float
    float32_logits: bool  # 2026: the softcap in float32 (the October model keeps the head's dtype)
    lambdas: bool  # 2026: x = resid_lambda * x + x0_lambda * x0 before each layer
    ve_gate_channels: int = 0
    ve_gate_scale: float = 0.0


@dataclass
class _StepFunctions:
    project: dict  # has value embedding -> (x, x0, lambdas, qkv arrays[, ve, gate]) -> (h, qkv)
    attention_inputs: dict  # has value embedding -> (x, x0, lambdas, qkv arrays, rope, positions[, ...]) -> h, q, k, v
    block_output: object
    logits: dict  # has backout -> (x, head arrays[, x_mid, backout_lambda]) -> logits
    smear: object


@lru_cache(maxsize=None)
def _step_functions(spec: _Spec) -> _StepFunctions:
    """The compiled pieces of a decode step around attention, for one model shape."""
    quantization, eps, kv, hd = spec.quantization, spec.eps, spec.n_kv_heads, spec.head_dim
    qk_heads = spec.n_heads + kv

    def layer_input(x, x0, lambdas):
        if not spec.lambdas:
            return x
        # Scalars cast to the activations' dtype, as the model does: a float32 scalar would promote bfloat16.
        return lambdas[0].astype(x.dtype) * x + lambdas[1].astype(x.dtype) * x0

    def make_project(has_ve):
        # Alone for utils/cuda_kernels/decode.py, which does RoPE and the QK norm itself.
        def project(x, x0, lambdas, qkv_arrays, *value_embedding):
            h = layer_input(x, x0, lambdas)
            normed = _norm(h, eps)
            qkv = _matmul(normed, qkv_arrays, quantization)
            if has_ve:  # the model's gate per kv head on the first channels of the attention input
                ve, gate_weight = value_embedding
                gate = spec.ve_gate_scale * mx.sigmoid(normed[:, : spec.ve_gate_channels] @ gate_weight.T)
                v = qkv[:, qk_heads * hd:].reshape(-1, kv, hd) + gate[..., None] * ve.reshape(-1, kv, hd)
                qkv = mx.concatenate([qkv[:, : qk_heads * hd], v.reshape(x.shape[0], -1).astype(qkv.dtype)], axis=1)
            return h, qkv

        return project

    # Rows are (rows, width) and heads (rows, heads, 1, head_dim): with one token per row no transposes.
    def make_attention_inputs(project):
        def attention_inputs(x, x0, lambdas, qkv_arrays, rope_freqs, positions, *value_embedding):
            h, qkv = project(x, x0, lambdas, qkv_arrays, *value_embedding)
            qkv = qkv.reshape(x.shape[0], qk_heads + kv, 1, hd)
            # nanochat's QK norm comes after RoPE; RoPE rotates pairs of a head's channels and so keeps its norm,
            # and norming first lets the norm read all heads at once, contiguous (v's result is not used).
            qk = mx.fast.rope(_norm(qkv, eps)[:, :qk_heads], hd, traditional=False, base=None, scale=1.0,
                              offset=positions, freqs=rope_freqs)
            return h, qk[:, : spec.n_heads], qk[:, spec.n_heads:], qkv[:, qk_heads:]

        return attention_inputs

    def block_output(x, attention, proj_arrays, fc_arrays, fc_proj_arrays):
        h = _residual_matmul(x, attention.reshape(x.shape[0], -1), proj_arrays, quantization)
        mlp = _matmul(_norm(h, eps), fc_arrays, quantization)
        return _residual_matmul(h, nn.relu2(mlp), fc_proj_arrays, quantization)

    def make_logits(has_backout):
        def logits(x, head_arrays, *backout):
            if has_backout:  # the residual after the middle layer, subtracted before the final norm
                x_mid, backout_lambda = backout
                x = x - backout_lambda.astype(x.dtype) * x_mid
            out = _matmul(_norm(x, eps), head_arrays, quantization)
            if spec.float32_logits:
                out = out.astype(mx.float32)
            return spec.softcap * mx.tanh(out / spec.softcap)

        return logits

    def smear(x, previous, gate_weight, smear_lambda):
        """The model's smear of one token: its predecessor's normed embedding mixed in through a gate."""
        channels = gate_weight.shape[1]
        gate = smear_lambda.astype(x.dtype) * mx.sigmoid(x[:, :channels] @ gate_weight.T)
        return x + gate * previous

    projects = {has_ve: make_project(has_ve) for has_ve in (False, True)}
    return _StepFunctions(
        project={k: mx.compile(f) for k, f in projects.items()},
        attention_inputs={k: mx.compile(make_attention_inputs(f)) for k, f in projects.items()},
        block_output=mx.compile(block_output),
        logits={k: mx.compile(make_logits(k)) for k in (False, True)},
        smear=mx.compile(smear))


@dataclass
class _LayerArrays:
    qkv: tuple
    proj: tuple
    fc: tuple
    fc_proj: tuple
    lambdas: mx.array  # (2,): resid and x0 lambda (unused by the October model)
    window: Optional[int]  # a query at p reads the keys p-window..p; None: every earlier key
    value_embed: Optional[nn.Module] = None  # 2026 layers with a value embedding: its table and gate weight
    ve_gate: Optional[mx.array] = None


def _layer_arrays(model):
    is_2026 = _is_2026(model)
    args = model.args
    layers = []
    for i, b in enumerate(model.transformer.h):
        lambdas = mx.stack([model.resid_lambdas[i], model.x0_lambdas[i]]) if is_2026 else mx.ones((2,))
        has_ve = is_2026 and "value_embed" in b.attn
        layers.append(_LayerArrays(
            _linear_arrays([b.attn.c_q, b.attn.c_k, b.attn.c_v]), _linear_arrays([b.attn.c_proj]),
            _linear_arrays([b.mlp.c_fc]), _linear_arrays([b.mlp.c_proj]), lambdas,
            args.window_sizes[i] if is_2026 else None,
            b.attn.value_embed if has_ve else None, b.attn.ve_gate.weight if has_ve else None))
    return layers


class NanochatDecoder:
    """Decode `group_size` rows per prompt in one batch; `step(tokens)` -> next-token logits.

    The prompts are prefilled together, once each (all but their last token). Row r's token at
    decode step t sits at RoPE position len(prompt_r) - 1 + t. Two cache layouts:
    - with utils/cuda_kernels/decode.py's kernel (MLX's CUDA backend): each prompt's keys are stored once and
      each row's generated keys on their own, so nothing is padded or masked;
    - elsewhere: each prompt's cache is copied to its group's rows, left-padded to the longest
      prompt, and MLX's fused attention runs with a mask over the padding (attention_by_gemm on CUDA). A
      layer's window is the same columns for every row (all rows are at the same column), so it is a slice of
      the cache, not a mask.

    `prefilled`: as for the engine's MlxLmDecoder, a list with an mlx-lm prompt cache per prompt that already
    holds all of it but its last token (here one prompt: a chat's kept cache), so nothing is prefilled. The
    per-row layout is used then, which row_cache() reads to hand the cache back.

    `alternate_buffers` (per-row layout): MLX writes a slice in place only when no other array holds the
    buffer. While the step before still runs (the device behind the host, as in a GPU-bound rollout) it does,
    so the write copies the layer's whole cache first: on an H200 one such copy per layer per step took a
    quarter of the portable d20 rollout's GPU time (bench/kernel_profile.py --no-cuda-kernels, BENCHMARKS.md).
    Whether it happens depends on timing, not on the code. With n buffers per layer written in turn (each write
    adds the columns the buffer missed since its last turn, and its own), the buffer written is the one read n
    steps ago, which the engine has read back (and MLX released) by then: no copy, for n times the KV memory.
    True means 2, False or 1 one buffer; None: the module's ALTERNATE_BUFFERS (2).
    """

    def __init__(self, model, prompts, group_size, max_new_tokens, use_kernel=None, prefilled=None,
                 alternate_buffers=None, prefill_align=PREFILL_ALIGN):
        self.prefill_align = prefill_align
        attn = model.transformer.h[0].attn
        self.model = model
        self.is_2026 = _is_2026(model)
        args = model.args
        self.n_heads, self.n_kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim = args.hidden_size // self.n_heads
        self.scale = attn.scale
        self.rope_freqs = attn._rope_freqs
        self.eps = args.rms_norm_eps if self.is_2026 else RMS_NORM_EPS
        spec = _linear_spec(model.lm_head)
        self.functions = _step_functions(_Spec(
            self.n_heads, self.n_kv_heads, self.head_dim, spec[1], self.eps,
            args.softcap if self.is_2026 else SOFTCAP, self.is_2026, self.is_2026,
            args.ve_gate_channels if self.is_2026 else 0, args.ve_gate_scale if self.is_2026 else 0.0))
        self.layers = _layer_arrays(model)
        self.head = _linear_arrays([model.lm_head])
        if self.is_2026 and args.padded_vocab_size != args.vocab_size:  # padded rows never reach the logits
            self.head = tuple(a[: args.vocab_size] for a in self.head)
        self.backout = None
        if self.is_2026 and args.backout_layer is not None:
            self.backout = (args.backout_layer, model.backout_lambda)
        self.smear = (model.smear_gate.weight, model.smear_lambda) if self.is_2026 and args.smear else None
        kernel_fits = cuda_decode.supports_shape(self.n_heads, self.n_kv_heads, self.head_dim)
        self._setup_cache(prompts, group_size, max_new_tokens, use_kernel, prefilled, kernel_fits, alternate_buffers)

    def _setup_cache(self, prompts, group_size, max_new_tokens, use_kernel, prefilled, kernel_fits,
                     alternate_buffers=None):
        """Choose the cache layout and fill it (the prefill); the model's parts are read already."""
        self.attend_by_hand = masked_attention_by_hand()
        name = type(self).__name__
        if prefilled is not None and (len(prompts) != 1 or use_kernel):
            raise ValueError(f"{name}: a prefilled cache is one prompt's and needs the per-row layout; "
                             "pass one prompt and use_kernel=None or False with it")
        self.prefilled = prefilled
        if use_kernel is None:
            use_kernel = cuda_kernels.available() and kernel_fits and prefilled is None
        elif use_kernel and not (cuda_kernels.available() and kernel_fits):
            raise ValueError(f"{name}: use_kernel=True needs MLX's CUDA backend on the GPU, the kernels "
                             f"switched on ({cuda_kernels.ENV_VAR}) and a head shape utils/cuda_kernels/decode.py "
                             "supports; pass use_kernel=None to choose automatically")
        self.use_kernel = use_kernel
        if alternate_buffers is None:
            alternate_buffers = ALTERNATE_BUFFERS
        self.kv_buffers = 1 if use_kernel else 2 if alternate_buffers is True else max(1, int(alternate_buffers))
        self.alternate_buffers = self.kv_buffers > 1
        self.t = 0
        self.prompts = [list(p) for p in prompts]
        self.row_prompts = [p for p in range(len(prompts)) for _ in range(group_size)]
        prefix_lens = [len(p) - 1 for p in prompts]
        self.prefix_len = max(prefix_lens)
        self.capacity = max_new_tokens
        self.cache_dtype = self._cache_dtype()
        if self.smear is not None:
            self._start_smear(prompts, group_size)
        if self.use_kernel:
            self._cache_per_prompt(prompts, prefix_lens, group_size)
        else:
            self._cache_per_row(prompts, prefix_lens, group_size)

    def _embed(self, tokens):
        return _norm(self.model.transformer.wte(tokens), self.eps)

    def _cache_dtype(self):
        """The dtype of the keys a decode step writes (dtype inference only: nothing is evaluated)."""
        probe = self._embed(mx.array([0]))
        layer = self.layers[0]
        value_embedding = self._value_embedding(layer, mx.array([0]))
        out = self.functions.project[bool(value_embedding)](probe, probe, layer.lambdas, layer.qkv, *value_embedding)
        return out[1].dtype  # RoPE and the QK norm keep it

    def _start_smear(self, prompts, group_size):
        """Each row's previous-token embedding for its first decode step: its prompt's second-to-last token's
        (a one-token prompt has none: zeros, as the model's first token). `fed` records the tokens since, for
        row_cache's smear cache."""
        rows = [p[-2] if len(p) > 1 else 0 for p in prompts for _ in range(group_size)]
        has_previous = mx.array([len(p) > 1 for p in prompts for _ in range(group_size)])[:, None]
        embedded = self._embed(mx.array(rows, dtype=mx.int32))
        self.previous = mx.where(has_previous, embedded, mx.zeros_like(embedded))
        self.fed = []  # (rows, k) int32 arrays of the tokens fed since, in order

    def _prefill(self, prompts, prefix_lens):
        """All prompts (but their last token) in one forward, right-padded so the causal mask is the
        only mask and every real token sits at its true position: each layer's (keys, values) of
        shape (prompts, kv_heads, prefix_len, head_dim), prompt p's in columns [0, prefix_lens[p])."""
        width, n = self.prefix_len, len(self.layers)
        if self.prefilled is not None:
            return [(c.keys[..., :width, :], c.values[..., :width, :]) for c in self.prefilled[0][:n]]
        # The forward's length is rounded up so that steps with other prompts reuse its shape: on CUDA
        # MLX's fused attention plans every new shape anew, each time it meets one.
        padded = -(-width // self.prefill_align) * self.prefill_align
        tokens = mx.array([p[:n] + [0] * (padded - n) for p, n in zip(prompts, prefix_lens)], dtype=mx.int32)
        cache = make_prompt_cache(self.model)
        self.model(tokens, cache=cache)
        return [(c.keys[..., :width, :], c.values[..., :width, :]) for c in cache[:n]]  # not the smear cache

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
        self.row_prompt = mx.array(self.row_prompts, dtype=mx.int32)
        self.prompt_lens = mx.array(prefix_lens, dtype=mx.int32)
        self.inv_freq = (1.0 / self.rope_freqs).astype(mx.float32)  # mx.fast.rope's angle per position
        self.windows = [mx.array([cuda_decode.window_arg(layer.window)], dtype=mx.int32) for layer in self.layers]

    def _cache_per_row(self, prompts, prefix_lens, group_size):
        width = self.prefix_len
        capacity = width + self.capacity + (GEMM_COLUMNS_ALIGN - 1 if self.attend_by_hand else 0)
        dtype = self.cache_dtype
        prefix = self._rolled_prefill(prompts, prefix_lens) if width > 0 else None
        # Per layer, keys and values in one buffer, (2, rows, kv_heads, columns, head_dim).
        self.kv = []
        self.spare = [] if self.alternate_buffers else None  # per layer: the other buffers, next first
        self.last_kv = [[] for _ in self.layers]  # alternate_buffers: the latest steps' new keys and values
        for layer in range(len(self.layers)):
            if prefix is None:  # only one-token prompts: nothing to prefill
                held = mx.zeros((2, len(prompts), self.n_kv_heads, 0, self.head_dim), dtype)
            else:
                held = mx.stack(prefix[layer]).astype(dtype)
            held = mx.repeat(held, group_size, axis=1)
            free = mx.zeros(held.shape[:3] + (capacity - width, self.head_dim), dtype)
            self.kv.append(mx.concatenate([held, free], axis=3))
            mx.eval(self.kv[-1])
            if self.spare is not None:  # buffers of their own (concatenate allocates each)
                self.spare.append([mx.concatenate([held, free], axis=3) for _ in range(self.kv_buffers - 1)])
                mx.eval(self.spare[-1])
        lens = [n for n in prefix_lens for _ in range(group_size)]
        self.start_positions = mx.array(lens, dtype=mx.int32)  # RoPE position of each row's first decoded token
        self.left_padding = mx.array([width - n for n in lens], dtype=mx.int32)
        self.padded = any(n != width for n in lens)
        # The masked attention written out (attention_by_gemm) only with a mask: without one MLX's fused call is it.
        self.by_gemm = self.attend_by_hand and self.padded

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

    @staticmethod
    def _value_embedding(layer, tokens):
        """The extra inputs of a layer with a value embedding: (its rows for these tokens, its gate); else ()."""
        return () if layer.value_embed is None else (layer.value_embed(tokens), layer.ve_gate)

    def _window_views(self, column):
        """Per distinct window: (first column read, end column, mask or None) at this step's column (the per-row
        layout). For attention_by_gemm the mask is padding_bias' and the columns read run past the step's column to
        a multiple of GEMM_COLUMNS_ALIGN, masked."""
        views = {}
        for window in {layer.window for layer in self.layers}:
            first = 0 if window is None else max(0, column - window)
            end, mask = column + 1, None
            if self.by_gemm:
                end = first + -(-(column + 1 - first) // GEMM_COLUMNS_ALIGN) * GEMM_COLUMNS_ALIGN
                columns = mx.arange(first, end)
                allowed = (columns >= self.left_padding[:, None]) & (columns <= column)
                mask = padding_bias(allowed, self.n_kv_heads, query_rows(self.n_heads, self.n_kv_heads),
                                    self.cache_dtype)
            elif self.padded:  # the left padding of shorter prompts is not attended to
                mask = (mx.arange(first, column + 1) >= self.left_padding[:, None])[:, None, None, :]
            views[window] = (first, end, mask)
        return views

    def _check_capacity(self):
        if self.t >= self.capacity:  # mlx would silently drop a write past the buffer's end
            raise ValueError(f"{type(self).__name__}.step: all {self.t} decode steps of this batch are used; "
                             f"make a decoder with a larger max_new_tokens")

    def _per_row_attention(self, i, column, q, k, v, view):
        """Layer i's step in the per-row layout: write k and v at `column`, attend over the window's view."""
        kv = self._write(i, column, k, v)
        first, end, mask = view
        keys, values = kv[0, ..., first:end, :], kv[1, ..., first:end, :]
        if self.by_gemm:
            return attention_by_gemm(gemm_queries(q, self.n_kv_heads), keys, values, mask, self.scale, self.n_heads)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)

    def step(self, tokens):
        """(rows,) int32 tokens at decode step t -> (rows, vocab) logits for step t + 1."""
        self._check_capacity()
        f = self.functions
        x = self._embed(tokens)
        if self.smear is not None:
            x, self.previous = f.smear(x, self.previous, *self.smear), x
            self.fed.append(tokens[:, None])
        x0, x_mid = x, None
        if self.use_kernel:
            step = mx.array([self.t], dtype=mx.int32)
        else:
            column = self.prefix_len + self.t
            positions = self.start_positions + self.t
            views = self._window_views(column)
        for i, layer in enumerate(self.layers):
            value_embedding = self._value_embedding(layer, tokens)
            if self.use_kernel:
                h, qkv = f.project[bool(value_embedding)](x, x0, layer.lambdas, layer.qkv, *value_embedding)
                attention = cuda_decode.decode_attention(
                    qkv, self.inv_freq, step, self.row_prompt, self.prompt_lens, self.prompt_kv[i][0],
                    self.prompt_kv[i][1], self.generated_kv[i], self.windows[i], self.n_heads, self.n_kv_heads,
                    self.head_dim, self.eps, self.scale)
            else:
                h, q, k, v = f.attention_inputs[bool(value_embedding)](
                    x, x0, layer.lambdas, layer.qkv, self.rope_freqs, positions, *value_embedding)
                attention = self._per_row_attention(i, column, q, k, v, views[layer.window])
            x = f.block_output(h, attention, layer.proj, layer.fc, layer.fc_proj)
            if self.backout is not None and i == self.backout[0]:
                x_mid = x
        self.t += 1
        if self.backout is not None:
            return f.logits[True](x, self.head, x_mid, self.backout[1])
        return f.logits[False](x, self.head)

    def _write(self, i, column, k, v):
        """Layer i's new key and value into its cache at this column; the buffer to read this step. Slice updates
        (copy kernels) straight from the k and v views: no concatenated write array to build first."""
        if self.spare is None:
            kv = self.kv[i]
        else:
            kv = self.spare[i].pop(0)  # read kv_buffers steps ago, not by a step still in flight
            # The columns written since this buffer's last turn (none on its first), from those steps' own k and v:
            # the buffer written last step is read by this step, so it must not be read here (it is written next).
            missed = self.last_kv[i][len(self.last_kv[i]) - min(self.t, self.kv_buffers - 1):]
            for c, (old_k, old_v) in enumerate(missed, start=column - len(missed)):
                kv[0, ..., c:c + 1, :] = old_k
                kv[1, ..., c:c + 1, :] = old_v
            self.spare[i].append(self.kv[i])
            self.kv[i] = kv
            self.last_kv[i] = (missed + [(k, v)])[-(self.kv_buffers - 1):]
        kv[0, ..., column:column + 1, :] = k
        kv[1, ..., column:column + 1, :] = v
        return kv

    def row_cache(self, row):
        """Batch row `row`'s keys and values (its prompt and every token fed since) as an mlx-lm prompt cache
        (the per-row layout only); with smear, the model's smear cache after the layers' too."""
        if self.use_kernel:
            raise ValueError(f"{type(self).__name__}.row_cache reads the per-row layout: make the decoder with "
                             "use_kernel=False")
        start, end = int(self.left_padding[row].item()), self.prefix_len + self.t
        caches = self.model.make_cache() if self.is_2026 else make_prompt_cache(self.model)
        for cache, kv in zip(caches, self.kv):
            cache.keys = mx.contiguous(kv[0, row:row + 1, :, start:end])
            cache.values = mx.contiguous(kv[1, row:row + 1, :, start:end])
            cache.offset = end - start
        if self.smear is not None:  # the normed embeddings of every token the row holds, as the model keeps them
            fed = mx.concatenate(self.fed, axis=1)[row].tolist() if self.fed else []
            held = self.prompts[self.row_prompts[row]][:-1] + fed
            smear_cache = caches[len(self.layers)]
            smear_cache.keys = self._embed(mx.array(held, dtype=mx.int32))[None, None]
            smear_cache.values = mx.zeros((1, 1, len(held), 1), smear_cache.keys.dtype)
            smear_cache.offset = len(held)
        return caches

    def filter(self, keep):
        """Keep only these batch rows (an int array of row indices)."""
        self.row_prompts = [self.row_prompts[i] for i in keep.tolist()]
        if self.smear is not None:
            self.previous = self.previous[keep]
            self.fed = [mx.concatenate(self.fed, axis=1)[keep]] if self.fed else []
        if self.use_kernel:
            self.generated_kv = [g[keep] for g in self.generated_kv]
            self.row_prompt = self.row_prompt[keep]
            return
        self.kv = [kv[:, keep] for kv in self.kv]
        if self.spare is not None:
            self.spare = [[kv[:, keep] for kv in layer] for layer in self.spare]
            self.last_kv = [[(k[keep], v[keep]) for k, v in layer] for layer in self.last_kv]
        self.start_positions = self.start_positions[keep]
        self.left_padding = self.left_padding[keep]
