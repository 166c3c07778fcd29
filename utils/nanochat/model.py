"""nanochat's 2026 architecture as an mlx-lm model (model_type "nanochat_2026"), what nanochat trains since 2026.

Beyond the October-2025 model (mlx-lm's models/nanochat.py, whose MLP and RoPE are reused here): per-layer
resid/x0 lambdas, value embeddings mixed into the values through a gate, sliding-window attention, a QK
scale, smear (each token's embedding gets the previous token's mixed in), backout (the residual after the
middle layer subtracted before the final norm), and embedding/head rows padded past the vocabulary.
Every constant is read from config.json, which the converter writes per nanochat era
(utils/nanochat/eras.py): nothing is guessed here.

Caches (make_cache): one KVCache per layer; a sliding window is a mask over it (rollouts are shorter than
the windows, so a rotating cache would save nothing there). With smear, one more entry after the layers'
(SmearCache) holds each row's normed token embeddings as the keys of a one-head KV cache: a chunk's first
token reads its predecessor there, and mlx-lm's cache machinery (batch merge, left and right padding,
filter, trim) keeps it in step with the layers' caches.

mlx-lm imports this module as mlx_lm.models.nanochat_2026 (utils/nanochat/mlx_lm_hook.py), so plain
mlx_lm.load reads these folders.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.nanochat import MLP, apply_rotary_emb

from mlx_grpo.nanochat.mlx_lm_hook import MODEL_TYPE  # noqa: F401 (this module's model type)

# nanochat's state dict keeps value embeddings at the top (value_embeds.{i}); here they live in their layer's attention.
_NANOCHAT_VALUE_EMBED = re.compile(r"^value_embeds\.(\d+)\.(.+)$")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # the tokenizer's: logits are sliced to it
    padded_vocab_size: int  # rows of the token embedding, the head and the value embeddings
    max_position_embeddings: int  # nanochat's sequence_len
    intermediate_size: int
    rope_theta: float
    softcap: float  # logits = softcap * tanh(logits / softcap), in float32
    qk_scale: float  # q and k are multiplied by it after the QK norm (1.0: not scaled)
    rms_norm_eps: float
    window_sizes: list  # per layer: a query at position p sees the keys p-w..p; None: every earlier key
    value_embedding_layers: list  # the layers with a value embedding and its gate
    ve_gate_channels: int  # the gate reads this many leading channels of the attention input
    ve_gate_scale: float  # gate = ve_gate_scale * sigmoid(ve_gate(x[..., :ve_gate_channels]))
    smear: bool
    smear_gate_channels: int
    backout_layer: Optional[int]  # the layer whose output is subtracted before the final norm (None: no backout)

    def __post_init__(self):
        n = self.num_hidden_layers
        if len(self.window_sizes) != n:
            raise ValueError(f"config window_sizes has {len(self.window_sizes)} entries for {n} layers")
        bad = [i for i in [*self.value_embedding_layers, self.backout_layer] if i is not None and not 0 <= i < n]
        if bad:
            raise ValueError(f"config names layers {bad} of a {n}-layer model (value_embedding_layers, backout_layer)")


def rms_norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


@partial(mx.compile, shapeless=True)
def softcap(logits: mx.array, cap: float) -> mx.array:
    return cap * mx.tanh(logits / cap)


def window_mask(x: mx.array, cache, window: Optional[int]):
    """The attention mask of a layer whose query at p sees keys p-window..p, for the chunk x (before the
    cache is updated). Where the window cannot bind, the plain causal mask (None or "causal": the fast paths)."""
    cached = 0
    if cache is not None:
        cached = cache.offset if isinstance(cache.offset, int) else cache.size()  # batch caches: padded length
    binding = window is not None and cached + x.shape[1] - 1 > window
    # mlx-lm's window_size counts the query's own key: window + 1 keys.
    return create_attention_mask(x, cache, window_size=window + 1 if binding else None)


class SmearCache(KVCache):
    """The normed token embeddings seen so far (keys of shape (B, 1, L, C); the values are a dummy column)."""

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        return self  # mlx-lm's kv_bits quantizes attention caches; this one is an input of the model, kept exact


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        head_dim = args.hidden_size // self.num_heads
        kv_dim = self.num_kv_heads * head_dim
        self.c_q = nn.Linear(args.hidden_size, self.num_heads * head_dim, bias=False)
        self.c_k = nn.Linear(args.hidden_size, kv_dim, bias=False)
        self.c_v = nn.Linear(args.hidden_size, kv_dim, bias=False)
        self.c_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        if layer in args.value_embedding_layers:
            self.value_embed = nn.Embedding(args.padded_vocab_size, kv_dim)
            self.ve_gate = nn.Linear(args.ve_gate_channels, self.num_kv_heads, bias=False)
        self.ve_gate_channels = args.ve_gate_channels
        self.ve_gate_scale = args.ve_gate_scale
        # q and k are both multiplied by qk_scale after the QK norm: the same as one scale on the scores.
        self.scale = args.qk_scale**2 / math.sqrt(head_dim)
        self.eps = args.rms_norm_eps
        half = head_dim // 2  # nanochat's RoPE: half-split layout, rotation by -theta (negated frequencies)
        self._rope_freqs = -mx.exp(mx.arange(0.0, half, dtype=mx.float32) * (math.log(args.rope_theta) / half))

    def __call__(self, x: mx.array, ids: mx.array, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        q = self.c_q(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.c_k(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.c_v(x).reshape(B, L, self.num_kv_heads, -1)
        if "value_embed" in self:
            gate = self.ve_gate_scale * mx.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))  # (B, L, kv heads)
            v = v + gate[..., None] * self.value_embed(ids).reshape(B, L, self.num_kv_heads, -1)
        v = v.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = rms_norm(apply_rotary_emb(q, offset, freqs=self._rope_freqs), self.eps)
        k = rms_norm(apply_rotary_emb(k, offset, freqs=self._rope_freqs), self.eps)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.eps = args.rms_norm_eps

    def __call__(self, x: mx.array, ids: mx.array, mask, cache=None) -> mx.array:
        x = x + self.attn(rms_norm(x, self.eps), ids, mask, cache)
        return x + self.mlp(rms_norm(x, self.eps))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.padded_vocab_size, args.hidden_size)
        self.h = [Block(args, i) for i in range(args.num_hidden_layers)]


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        n = args.num_hidden_layers
        self.transformer = Transformer(args)
        self.lm_head = nn.Linear(args.hidden_size, args.padded_vocab_size, bias=False)
        self.resid_lambdas = mx.ones((n,))
        self.x0_lambdas = mx.zeros((n,))
        if args.smear:
            self.smear_gate = nn.Linear(args.smear_gate_channels, 1, bias=False)
            self.smear_lambda = mx.zeros((1,))
        if args.backout_layer is not None:
            self.backout_lambda = mx.zeros((1,))

    @property
    def layers(self):
        return self.transformer.h

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        args = self.args
        layer_caches, smear_cache = self._split_cache(cache)
        x = rms_norm(self.transformer.wte(inputs), args.rms_norm_eps)
        if args.smear:
            x = self._smear(x, smear_cache)
        x0, x_mid, masks = x, None, {}
        for i, (block, layer_cache) in enumerate(zip(self.transformer.h, layer_caches)):
            window = args.window_sizes[i]
            if window not in masks:  # every layer's cache holds the same positions
                masks[window] = window_mask(x, layer_cache, window)
            # Scalars cast to the activations' dtype: a float32 scalar would promote bfloat16 activations.
            x = self.resid_lambdas[i].astype(x.dtype) * x + self.x0_lambdas[i].astype(x.dtype) * x0
            x = block(x, inputs, masks[window], layer_cache)
            if i == args.backout_layer:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda.astype(x.dtype) * x_mid
        logits = self.lm_head(rms_norm(x, args.rms_norm_eps))[..., : args.vocab_size]
        return softcap(logits.astype(mx.float32), args.softcap)  # float32, as nanochat's

    def _smear(self, x: mx.array, cache: Optional[KVCache]) -> mx.array:
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:channels])) * x_{t-1}, x_{t-1} the embedding before
        smearing; a sequence's first token has none (a left-padded row's first real token neither)."""
        B, T, C = x.shape
        start = 0 if cache is None else cache.size()  # positions the cache holds (batch caches: with padding)
        if start == 0:
            before = mx.concatenate([mx.zeros((B, 1, C), dtype=x.dtype), x[:, :-1]], axis=1)
        if cache is not None:
            held, _ = cache.update_and_fetch(x[:, None], mx.zeros((B, 1, T, 1), dtype=x.dtype))
            if start > 0:
                before = held[:, 0, start - 1 : start - 1 + T]
            if (left_padding := getattr(cache, "left_padding", None)) is not None:
                has_previous = (start - 1 + mx.arange(T))[None] >= left_padding[:, None]
                before = mx.where(has_previous[..., None], before, 0)
        channels = self.args.smear_gate_channels
        gate = self.smear_lambda.astype(x.dtype) * mx.sigmoid(self.smear_gate(x[..., :channels]))
        return x + gate * before

    def _split_cache(self, cache):
        """(one KV cache per layer, the smear cache or None)."""
        n = self.args.num_hidden_layers
        if cache is None:
            return [None] * n, None
        if not self.args.smear:
            return cache, None
        if len(cache) != n + 1:
            raise ValueError(f"this nanochat model keeps its smear state in a cache after the {n} layers' (got "
                             f"{len(cache)} caches): make them with model.make_cache() (make_prompt_cache does)")
        return cache[:n], cache[n]

    def make_cache(self) -> list:
        caches = [KVCache() for _ in range(self.args.num_hidden_layers)]
        return caches + [SmearCache()] if self.args.smear else caches

    def sanitize(self, weights: dict) -> dict:
        """nanochat's state-dict names to this model's (names of a saved folder are left as they are)."""
        out = {}
        for name, value in weights.items():
            if m := _NANOCHAT_VALUE_EMBED.match(name):
                name = f"transformer.h.{m.group(1)}.attn.value_embed.{m.group(2)}"
            out[name] = value
        return out
