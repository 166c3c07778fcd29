"""The update's forward with each prompt run once per micro-batch group, not once per completion.

A GRPO micro-batch holds num_generations completions of each prompt. Here the prompt's tokens (all but
its last) run once per group (batch = the micro-batch's prompts), each layer's keys and values are kept,
and then the completions (batch = rows) run with the prompt's last token first, attending to their
prompt's keys and values and to their own. The logits of every completion token come from the second
pass, so the loss sees the same log-probs as the plain forward over prompt + completion rows, and the
gradient of every completion flows back into its prompt's computation (through the kept keys/values).

It runs the model's own forward twice, through caches that speak mlx-lm's cache protocol (offset,
update_and_fetch, make_mask): nothing of the architecture is written again here, so the October nanochat
(mlx-lm's model), the 2026 one (utils/nanochat/model.py: windows, value embeddings, smear, backout) and
mlx-lm's Llama and Qwen families share it, LoRA and quantized copies included. The prompt pass's logits
are never used, so MLX never computes them (nor the last layer's MLP for the prompt tokens).

    batch = pack_shared_prompt_rows(prompts, completions)   # prompts indexed by Completion.prompt_index
    logits = batch_logits(model, batch.model_inputs)        # [B, T, V] for batch.targets / batch.mask
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache

# The model types whose forward follows mlx-lm's cache protocol in every layer (tested against the plain forward).
SHARED_PROMPT_MODEL_TYPES = ("nanochat", "nanochat_2026", "llama", "qwen2", "qwen3")


@dataclass
class SharedPromptBatch:
    """One micro-batch for the shared forward: S distinct prompts ("segments"), B completion rows."""

    prompt_inputs: mx.array  # [S, P] int: each prompt but its last token, right-padded
    prompt_lengths: mx.array  # [S] int32: the real tokens of each prompt_inputs row (prompt length - 1)
    row_prompt: mx.array  # [B] int32: the prompt_inputs row of each completion row
    inputs: mx.array  # [B, T] int: the prompt's last token, then the completion but its last token
    targets: mx.array  # [B, T] int: the completion tokens
    mask: mx.array  # [B, T] float32: 1 where the target is a sampled completion token
    grouped: bool  # row r belongs to prompt r // (B / S): every prompt has the same number of consecutive rows

    @property
    def model_inputs(self) -> tuple:
        # Grouped rows need no index: a prompt's keys reach its rows as a broadcast, whose gradient is a sum
        # (an index's is a scatter-add).
        return self.prompt_inputs, self.prompt_lengths, None if self.grouped else self.row_prompt, self.inputs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# MLX's CUDA attention backward (cuDNN) checks only the queries' length against its 128-wide tiles; with a mask
# array and a key length off that multiple d20's update died of an illegal memory access, so on CUDA the
# completion pass's keys (prompt width + completion width) are padded to a multiple of 128.
CUDA_KEY_MULTIPLE = 128


def default_key_multiple() -> int:
    from mlx_grpo.cuda_kernels import runs_on_cuda_gpu

    return CUDA_KEY_MULTIPLE if runs_on_cuda_gpu() else 1


def pack_shared_prompt_rows(prompts, completions, pad_id=0, drop_rows=(), pad_multiple=1,
                            key_multiple=None) -> SharedPromptBatch:
    """completions[i] a rollout.Completion of prompts[completions[i].prompt_index]; rows in drop_rows get an
    all-zero mask. Both widths (prompt and completion) are rounded up to pad_multiple (see pack_rows), then the
    prompt width so that the two make a multiple of key_multiple (None: default_key_multiple())."""
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    key_multiple = default_key_multiple() if key_multiple is None else key_multiple
    segments = list(dict.fromkeys(c.prompt_index for c in completions))  # distinct prompts, first-seen order
    segment_of = {index: s for s, index in enumerate(segments)}
    segment_prompts = [list(prompts[index]) for index in segments]
    if any(len(p) == 0 for p in segment_prompts):
        raise ValueError("a prompt has no tokens: every prompt starts with at least one token (BOS)")
    prompt_width = _round_up(max(max(len(p) - 1 for p in segment_prompts), 1), pad_multiple)  # >= 1: 1-token prompts
    width = _round_up(max(max(len(c.tokens) for c in completions), 1), pad_multiple)
    prompt_width = _round_up(prompt_width + width, key_multiple) - width  # the extra prompt columns are masked
    inputs, targets, mask = [], [], []
    for i, c in enumerate(completions):
        tokens = list(c.tokens)
        row = [prompts[c.prompt_index][-1]] + tokens[:-1]
        inputs.append(row + [pad_id] * (width - len(row)))
        targets.append(tokens + [pad_id] * (width - len(tokens)))
        row_mask = [0] * width
        if i not in drop_rows:
            row_mask[: len(c.sampled)] = c.sampled
        mask.append(row_mask)
    row_prompt = [segment_of[c.prompt_index] for c in completions]
    rows_per_prompt = len(completions) // len(segments)
    grouped = row_prompt == [r // rows_per_prompt for r in range(len(completions))]
    return SharedPromptBatch(
        prompt_inputs=mx.array([p[:-1] + [pad_id] * (prompt_width - len(p) + 1) for p in segment_prompts]),
        prompt_lengths=mx.array([len(p) - 1 for p in segment_prompts], dtype=mx.int32),
        row_prompt=mx.array(row_prompt, dtype=mx.int32), inputs=mx.array(inputs), targets=mx.array(targets),
        mask=mx.array(mask, dtype=mx.float32), grouped=grouped)


def supports_shared_prompt(model) -> bool:
    """Whether shared_prompt_logits equals this model's plain forward: a tested model type whose caches are
    plain KV caches (and nanochat 2026's smear cache)."""
    from mlx_grpo.nanochat.model import SmearCache

    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) not in SHARED_PROMPT_MODEL_TYPES:
        return False
    # Not covered: a rotating (sliding-window) cache, whose mask and positions differ from a plain one's.
    return all(type(c) in (KVCache, SmearCache) for c in _cache_kinds(model))


def batch_logits(model, model_inputs) -> mx.array:
    """The logits of a packed micro-batch: model_inputs is PackedBatch.model_inputs (token ids, or a dict for a
    vision-language policy, utils/vlm/training.py) or SharedPromptBatch's (a tuple)."""
    if isinstance(model_inputs, tuple):
        return shared_prompt_logits(model, *model_inputs)
    return model(model_inputs)


# ----------------------------------------------------------------------------------------------
# The two passes, as caches of mlx-lm's protocol


class _PromptRecorder:
    """Prompt pass: positions from 0, the causal mask of the plain forward; keeps what each layer computes."""

    offset = 0

    def size(self) -> int:
        return 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, N, return_array=False, window_size=None):
        # As mlx-lm's create_attention_mask without a cache: right padding never reaches a real token.
        if N == 1:
            return None
        if return_array or (window_size and N > window_size):
            return create_causal_mask(N, window_size=window_size)
        return "causal"


def _per_row(x: mx.array, row_prompt, rows: int) -> mx.array:
    """[S, ...] per prompt -> [rows, ...] per completion row (row_prompt None: grouped rows, a broadcast)."""
    if row_prompt is not None:
        return x[row_prompt]
    S = x.shape[0]
    return mx.broadcast_to(x[:, None], (S, rows // S, *x.shape[1:])).reshape(rows, *x.shape[1:])


class _SharedPromptKV:
    """Completion pass of one layer: each row's keys are its prompt's and then its own."""

    def __init__(self, prompt: _PromptRecorder, row_prompt, row_lengths, masks: dict):
        self.prompt, self.row_prompt, self.masks = prompt, row_prompt, masks
        self.offset = row_lengths  # [B]: the position of each row's first token

    def size(self) -> int:
        return self.prompt.keys.shape[2]  # the prompt width P (padding included), as a batch cache reports

    def update_and_fetch(self, keys, values):
        # mx.fast.scaled_dot_product_attention takes one key array per query row, so the prompt's keys and
        # values are laid out per row: a copy of K/V only; the prompt's projections and MLP ran once.
        rows = keys.shape[0]
        prompt_keys = _per_row(self.prompt.keys, self.row_prompt, rows)
        prompt_values = _per_row(self.prompt.values, self.row_prompt, rows)
        return mx.concatenate([prompt_keys, keys], axis=2), mx.concatenate([prompt_values, values], axis=2)

    def make_mask(self, N, return_array=False, window_size=None):
        if window_size not in self.masks:  # one mask per window for every layer
            # Additive, in the activations' dtype: MLX turns a boolean mask into one inside every attention
            # call, materialized over the heads.
            dtype = self.prompt.keys.dtype
            sees = completion_mask(self.offset, self.size(), N, window_size)
            self.masks[window_size] = mx.where(sees, mx.array(0.0, dtype), mx.array(-float("inf"), dtype))
        return self.masks[window_size]


class _SharedPromptSmear:
    """Completion pass of nanochat 2026's smear: a row's first token reads the embedding before it."""

    def __init__(self, previous):
        self.previous = previous  # [B, 1, 1, C]

    def size(self) -> int:
        return 1

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.previous, keys], axis=2), values


def completion_mask(row_lengths, prompt_width: int, length: int, window_size=None) -> mx.array:
    """[B, 1, length, prompt_width + length] bool: completion query j of row r (position L_r + j) sees prompt
    key k < L_r and its own keys j' <= j; with a window (mlx-lm's: window_size keys, the query's own included)
    only keys less than window_size positions back."""
    lengths = row_lengths[:, None, None]
    query = mx.arange(length)[None, :, None]
    prompt_key = mx.arange(prompt_width)[None, None, :]
    own_key = mx.arange(length)[None, None, :]
    sees_prompt = prompt_key < lengths
    sees_own = own_key <= query
    if window_size is not None:
        sees_prompt = sees_prompt & (lengths + query - prompt_key < window_size)
        sees_own = sees_own & (query - own_key < window_size)
    B = row_lengths.shape[0]
    mask = mx.concatenate([mx.broadcast_to(sees_prompt, (B, length, prompt_width)),
                           mx.broadcast_to(sees_own, (B, length, length))], axis=-1)
    return mask[:, None]


def _smear_previous(recorded: mx.array, prompt_lengths, row_prompt, rows: int) -> mx.array:
    """[B, 1, 1, C]: the normed embedding of the prompt token before each row's first (zero for a 1-token prompt)."""
    S, _, P, C = recorded.shape
    last = recorded.reshape(S * P, C)[mx.arange(S) * P + mx.maximum(prompt_lengths - 1, 0)]
    last = mx.where((prompt_lengths > 0)[:, None], last, mx.zeros_like(last))
    return _per_row(last, row_prompt, rows)[:, None, None, :]


def _cache_kinds(model) -> list:
    """The caches the model's own generation would make, one per layer (nanochat 2026: + its smear cache)."""
    from mlx_grpo.training.lora import BasePolicy  # here: lora imports update, which imports this module

    if isinstance(model, BasePolicy):  # a LoRA run's reference: the policy with its adapters off
        model = model.model
    return model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]


def shared_prompt_logits(model, prompt_inputs, prompt_lengths, row_prompt, inputs) -> mx.array:
    """[B, T, V] logits of the completion rows; equal to the plain forward's at the same tokens.
    row_prompt None: grouped rows (SharedPromptBatch.grouped)."""
    from mlx_grpo.nanochat.model import SmearCache

    kinds = _cache_kinds(model)
    recorders = [_PromptRecorder() for _ in kinds]
    model(prompt_inputs, cache=recorders)  # for the keys and values only: its logits are never computed
    rows = inputs.shape[0]
    row_lengths = _per_row(prompt_lengths, row_prompt, rows)
    masks = {}
    caches = [_SharedPromptSmear(_smear_previous(recorder.keys, prompt_lengths, row_prompt, rows))
              if isinstance(kind, SmearCache) else _SharedPromptKV(recorder, row_prompt, row_lengths, masks)
              for kind, recorder in zip(kinds, recorders)]
    return model(inputs, cache=caches)
