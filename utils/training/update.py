"""The pieces of a GRPO update: packing rollouts into arrays, log-probs, the policy copies, the LR schedule."""

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_reduce

from mlx_grpo.training.loss import grpo_loss, token_logprobs, token_logprobs_and_entropy
from mlx_grpo.training.shared_prompt import batch_logits, pack_shared_prompt_rows


@dataclass
class PackedBatch:
    """Rows of prompt + completion, right-padded so positions start at 0 as in training."""

    inputs: mx.array  # [B, T] token ids fed to the model
    targets: mx.array  # [B, T] next-token ids
    mask: mx.array  # [B, T] float32: 1 where the target is a sampled completion token

    @property
    def model_inputs(self) -> mx.array:
        return self.inputs  # what batch_logits feeds the model (a tuple for a SharedPromptBatch)


def pack_rows(prompts, completions, pad_id=0, drop_rows=(), pad_multiple=1):
    """prompts[i] token ids, completions[i] a rollout.Completion; rows in drop_rows get an all-zero mask.

    pad_multiple rounds the row width up: a compiled loss is retraced (and on CUDA its attention
    re-planned) for every new width, so widths from a few buckets are reused across micro-batches.
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    lengths = [len(p) + len(c.tokens) for p, c in zip(prompts, completions)]
    width = -(-(max(lengths) - 1) // pad_multiple) * pad_multiple
    inputs, targets, mask = [], [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        full = list(prompt) + list(completion.tokens)
        pad = width + 1 - len(full)
        full = full + [pad_id] * pad
        inputs.append(full[:-1])
        targets.append(full[1:])
        row_mask = [0] * width
        if i not in drop_rows:
            start = len(prompt) - 1  # target index of the first completion token
            row_mask[start:start + len(completion.sampled)] = completion.sampled
        mask.append(row_mask)
    return PackedBatch(mx.array(inputs), mx.array(targets), mx.array(mask, dtype=mx.float32))


def micro_batch_slices(total: int, size: int):
    """Consecutive slices covering all rows; the last one may be smaller (never dropped)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def pack_micro_batches(prompts, completions, micro_batch_size, mask_truncated=False, pad_id=0, pad_multiple=1,
                       share_prompts=False):
    """Split a generation batch into packed micro-batches; truncated rows lose their mask if asked.

    share_prompts: SharedPromptBatch micro-batches (each prompt runs once per micro-batch), else PackedBatch;
    the same slices either way, so the loss is the same.
    """
    row_prompts = [prompts[c.prompt_index] for c in completions]
    slices = micro_batch_slices(len(completions), micro_batch_size)
    batches = []
    for rows in slices:
        part = completions[rows]
        drop = {i for i, c in enumerate(part) if c.truncated} if mask_truncated else set()
        if share_prompts:
            batches.append(pack_shared_prompt_rows(prompts, part, pad_id=pad_id, drop_rows=drop,
                                                   pad_multiple=pad_multiple))
        else:
            batches.append(pack_rows(row_prompts[rows], part, pad_id=pad_id, drop_rows=drop,
                                     pad_multiple=pad_multiple))
    return slices, batches


def frozen_copy(model, quant_bits=None, quant_group_size=64, dtype=None):
    """A frozen copy of the model's current weights: quantized (mlx-lm's quantizer) or cast to dtype."""
    from mlx_lm.utils import quantize_model

    copy = type(model)(model.args)
    copy.load_weights(tree_flatten(model.parameters()))
    if dtype is not None:
        copy.set_dtype(dtype)
    if quant_bits:
        copy, _ = quantize_model(copy, {}, group_size=quant_group_size, bits=quant_bits)
    copy.freeze()
    copy.eval()
    mx.eval(copy.parameters())
    return copy


def make_lr_schedule(learning_rate, total_updates, warmup_ratio, kind):
    """Linear warmup then cosine / linear decay / constant, sized on the real number of updates.

    Update u (0-based) gets lr * (u + 1) / warmup during warmup, so the first update is never at 0.
    """
    warmup = min(total_updates, int(math.ceil(warmup_ratio * total_updates))) if warmup_ratio > 0 else 0
    decay = max(total_updates - warmup, 1)
    schedules, boundaries = [], []
    if warmup > 0:
        schedules.append(optim.linear_schedule(learning_rate / warmup, learning_rate, max(warmup - 1, 1)))
        boundaries.append(warmup)
    if kind == "cosine":
        schedules.append(optim.cosine_decay(learning_rate, decay, 0.0))
    elif kind == "linear":
        schedules.append(optim.linear_schedule(learning_rate, 0.0, decay))
    elif kind == "constant":
        schedules.append(lambda step: mx.array(learning_rate, dtype=mx.float32))
    else:
        raise ValueError(f"lr_scheduler_type {kind!r} is not one of cosine, linear, constant")
    if len(schedules) == 1:
        return schedules[0]
    return optim.join_schedules(schedules, boundaries)


@partial(mx.compile, shapeless=True)
def _add_as_float32(accumulated, grad):
    return accumulated + grad.astype(mx.float32)  # compiled: one kernel, not a cast and an add


def add_grads(accumulated, grads):
    """accumulated + grads in float32 (micro-batch gradients may arrive in bfloat16)."""
    if accumulated is None:
        return tree_map(lambda g: g.astype(mx.float32), grads)
    return tree_map(_add_as_float32, accumulated, grads)


@partial(mx.compile, shapeless=True)
def _adamw_step(gradient, parameter, m, v, lr, b1, b2, eps, weight_decay):
    parameter = parameter * (1 - lr * weight_decay)
    m = b1 * m + (1 - b1) * gradient
    v = b2 * v + (1 - b2) * mx.square(gradient)
    return parameter - lr * m / (mx.sqrt(v) + eps), m, v


class FusedAdamW(optim.AdamW):
    """mlx's AdamW with its per-weight update compiled into one kernel.

    Uncompiled, the update is ~12 elementwise passes over every float32 weight and both moments;
    the arithmetic is mlx's own (AdamW.apply_single, then Adam.apply_single), in the same order.
    """

    def apply_single(self, gradient, parameter, state):
        if self.bias_correction:
            return super().apply_single(gradient, parameter, state)
        lr = self.learning_rate.astype(gradient.dtype)
        b1, b2 = self.betas
        new_parameter, state["m"], state["v"] = _adamw_step(
            gradient, parameter, state["m"], state["v"], lr, b1, b2, self.eps, self.weight_decay)
        return new_parameter


def all_finite(tree) -> mx.array:
    return tree_reduce(lambda ok, x: ok & mx.all(mx.isfinite(x)), tree, mx.array(True))


def global_norm(tree) -> mx.array:
    return mx.sqrt(tree_reduce(lambda total, x: total + mx.sum(x.astype(mx.float32) ** 2), tree, mx.array(0.0)))


def clip_by_norm(grads, norm: mx.array, max_norm: float):
    """mlx's clip_grad_norm scaling, on the global norm already taken (it would sum the squares again)."""
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale, grads)


def ensure_float32(model: nn.Module, adapters_only: bool = False):
    """Trained weights stay float32: in bf16 an Adam step of ~1e-6 rounds away and nothing learns.

    adapters_only (train_type lora/dora): only the trainable adapters are cast; the frozen base may
    be quantized (QLoRA) and keeps its dtype.
    """
    if adapters_only:
        model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
        return
    for name, value in tree_flatten(model.parameters()):
        if value.dtype in (mx.uint32, mx.int32):
            raise ValueError(f"the trained model is quantized ({name}); train a full-precision model "
                             "(convert without --q-bits) and use quantize_for_rollouts for speed, or train "
                             "adapters on it (train_type = \"lora\")")
    model.set_dtype(mx.float32)


def frozen_logprobs(model, batches, temperature):
    """Per-token log-probs under a frozen model (old policy, reference), one array per micro-batch."""
    out = []
    for batch in batches:
        logp = token_logprobs(batch_logits(model, batch.model_inputs), batch.targets, temperature)
        mx.eval(logp)
        out.append(logp)
    return out


def masked_all_finite(arrays, batches) -> bool:
    return all(bool(mx.all(mx.isfinite(mx.where(b.mask > 0, a, 0.0)))) for a, b in zip(arrays, batches))


class LossAndGrad:
    """loss_and_grad(batch arrays..., normalizers) -> ((loss, stats), grads of the trainable weights).

    Gradients come in the dtype the trainable weights have at call time (called outside
    compute_weights, the forward runs in float32). policy_update runs the
    micro-batches inside `compute_weights()`: the float32 master weights are cast to
    compute_dtype once per update (not per micro-batch) and gradients arrive in compute_dtype, half
    the memory of float32 ones. They are the same numbers: the gradient of a float32 weight through
    a cast is the compute_dtype gradient, upcast.
    """

    def __init__(self, model, loss_fn, value_and_grad, stat_names, compute_dtype):
        self.model, self.loss_fn, self.value_and_grad, self.stat_names = model, loss_fn, value_and_grad, stat_names
        self.compute_dtype = compute_dtype

    def __call__(self, *args):
        (loss, stacked), grads = self.value_and_grad(*args)
        return (loss, dict(zip(self.stat_names, stacked))), grads

    @contextmanager
    def compute_weights(self):
        model = self.model
        master = model.trainable_parameters()
        if self.compute_dtype != mx.float32:
            model.update(tree_map(lambda p: p.astype(self.compute_dtype), master))
        try:
            yield
        finally:
            model.update(master)  # the float32 master weights are what the optimizer updates


def make_loss_and_grad(model, *, temperature, loss_type, epsilon, epsilon_high, beta,
                       importance_sampling_level, max_completion_length, compute_dtype=mx.float32,
                       use_compile=False, loss_options=None, grad_checkpoint=False,
                       adaptive_entropy=False) -> LossAndGrad:
    """The GRPO loss and its gradient for `model`; normalizers are arrays so a compiled graph is
    reused across steps. loss_options: more grpo_loss keywords (delta, sapo_*, vespo_*, masks,
    entropy_coef). See LossAndGrad for the dtypes. inputs: a packed batch's model_inputs.
    grad_checkpoint: the model's blocks recompute their activations in the backward pass
    (training.memory.checkpoint_blocks). adaptive_entropy: the entropy coefficient is the last
    argument of every call, an mx.array (it changes each update; as an input it never retraces)."""
    if grad_checkpoint:
        from mlx_grpo.training.memory import checkpoint_blocks

        checkpoint_blocks(model)
    loss_options = dict(loss_options or {})
    # Adaptive: the entropy keeps its gradient even while the coefficient is 0 (it may come back)
    entropy_gradient = adaptive_entropy or loss_options.get("entropy_coef", 0.0) != 0.0

    def loss_fn(inputs, targets, mask, advantages, old_logp, ref_logp, num_sequences_total, num_tokens_total,
                num_micro_batches, is_weights=None, sampling_logp=None, entropy_coef=None):
        logp, entropy = token_logprobs_and_entropy(batch_logits(model, inputs), targets, temperature,
                                                   entropy_gradient)
        options = {**loss_options, "entropy_coef": entropy_coef} if adaptive_entropy else loss_options
        loss, stats = grpo_loss(
            logp, old_logp, ref_logp, advantages, mask, loss_type=loss_type, epsilon=epsilon,
            epsilon_high=epsilon_high, beta=beta, importance_sampling_level=importance_sampling_level,
            max_completion_length=max_completion_length, num_sequences_total=num_sequences_total,
            num_tokens_total=num_tokens_total, num_micro_batches=num_micro_batches, entropy=entropy,
            is_weights=is_weights, sampling_logp=sampling_logp, **options)
        stat_names[:] = list(stats)
        # One stacked output: mlx 0.32's compile breaks when two outputs are the same expression.
        return loss, mx.stack([stats[name] for name in stat_names])

    stat_names = []
    value_and_grad = nn.value_and_grad(model, loss_fn)
    if use_compile:
        # The model's state is an implicit input and output of the compiled graph (mlx's pattern);
        # so is the RNG state, or LoRA dropout would reuse one mask on every step.
        state = [model.state, mx.random.state]
        value_and_grad = mx.compile(value_and_grad, inputs=state, outputs=state)
    return LossAndGrad(model, loss_fn, value_and_grad, stat_names, compute_dtype)


UPDATE_CHUNK_BYTES = 256 << 20


def eval_update_in_chunks(model, optimizer, chunk_bytes=UPDATE_CHUNK_BYTES):
    """Run a lazy optimizer update a chunk of parameters (~256 MB of weights) at a time.

    Evaluated at once, the update holds the old and the new weights and moments of every parameter
    together (for d32 in float32: ~22 GB more); in chunks, only one chunk's. Chunks rather than
    single parameters keep the number of host syncs small.
    """
    chunk, size = [], 0
    for _, param in tree_flatten(model.trainable_parameters()):
        chunk.append(param)
        size += param.nbytes
        if size >= chunk_bytes:
            mx.eval(chunk)
            chunk, size = [], 0
    mx.eval(chunk, model.parameters(), optimizer.state)


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    applied: bool  # False when the loss or gradients were not finite (update skipped)
    stats: dict  # summed loss statistics (see grpo_loss.finalize_stats)
    seconds: float


def loss_normalizers(completions, batches) -> dict:
    """The counts grpo_loss divides by, over a whole generation batch (sum them across processes)."""
    return {"num_sequences_total": len(completions),
            "num_tokens_total": sum(float(b.mask.sum()) for b in batches),
            "num_micro_batches": len(batches)}


def policy_update(model, optimizer, loss_and_grad, batches, slices, advantages, old_logp, ref_logp,
                  normalizers, max_grad_norm, all_sum=None, is_weights=None, sampling_logp=None, entropy_coef=None):
    """One optimizer step over all micro-batches of a generation batch (gradients summed).

    is_weights: the rollout importance-sampling weights per micro-batch (training/rollout_correction.py), or None;
    sampling_logp: per micro-batch, the log-probs of the policy that sampled when they are not old_logp (or None);
    entropy_coef: this update's entropy coefficient for a loss made with adaptive_entropy (a float), else None.

    all_sum(tree) -> tree summed over the data-parallel processes (distributed.World.sum_tree;
    the normalizers must then be global): every process then takes the same step.
    """
    start = time.perf_counter()
    norm_args = [mx.array(normalizers[k], dtype=mx.float32)
                 for k in ("num_sequences_total", "num_tokens_total", "num_micro_batches")]
    coef = None if entropy_coef is None else mx.array(entropy_coef, dtype=mx.float32)
    grads, loss, stats = None, mx.array(0.0), {}
    with loss_and_grad.compute_weights():
        for i, (rows, batch) in enumerate(zip(slices, batches)):
            (mb_loss, mb_stats), mb_grads = loss_and_grad(
                batch.model_inputs, batch.targets, batch.mask, advantages[rows],
                None if old_logp is None else old_logp[i], None if ref_logp is None else ref_logp[i], *norm_args,
                None if is_weights is None else is_weights[i], None if sampling_logp is None else sampling_logp[i],
                coef)
            grads = add_grads(grads, mb_grads)
            del mb_grads  # now only the sum's graph holds them: each leaf is freed once it is added
            loss = loss + mb_loss
            stats = {k: stats.get(k, 0.0) + v for k, v in mb_stats.items()}
            mx.eval(grads, loss, stats)  # bound memory to one micro-batch's activations
    if all_sum is not None:  # add the other processes' micro-batches
        grads, loss, stats = all_sum((grads, loss, stats))
    grad_norm = global_norm(grads)
    applied = bool(all_finite(grads)) and bool(mx.isfinite(loss))
    if applied:
        if max_grad_norm > 0:
            grads = clip_by_norm(grads, grad_norm, max_grad_norm)
        optimizer.update(model, grads)
        del grads
        eval_update_in_chunks(model, optimizer)
    return UpdateResult(float(loss), float(grad_norm), applied, {k: float(v) for k, v in stats.items()},
                        time.perf_counter() - start)
