"""GRPO loss math on MLX arrays: group advantages, per-token log-probs, TRL's loss types (the
clipped surrogate with its grpo, bnpo, dr_grpo, dapo, luspo aggregations and delta; cispo, sapo,
vespo), GSPO sequence-level ratios, the rollout importance weights' place in the loss, the
off-policy and entropy masks, the entropy bonus and the k3 KL penalty, plus summable statistics
for logging.

Definitions follow TRL's GRPOTrainer (trl/trainer/grpo_trainer.py): _generate_and_score_completions
for the advantages, _compute_loss for the loss and the clip/KL metrics.

How a trainer uses it for one generation batch (N = num_prompts * group_size completions, split
into micro-batches, each micro-batch holding the B completions it scores):

    adv = group_advantages(rewards, group_size, "group")               # [N]
    total_tokens = mask_all.sum()                                        # for dapo
    stats = []
    for each micro-batch:
        def loss_fn(model):
            logp = token_logprobs(model(inputs)[:, -T:], targets, temperature)
            loss, s = grpo_loss(logp, old, ref, adv[rows], mask, loss_type=..., ...,
                                num_sequences_total=N, num_tokens_total=total_tokens,
                                num_micro_batches=M)
            return loss, s
        (loss, s), grads = nn.value_and_grad(model, loss_fn)(model)    # accumulate grads by SUM
        stats.append(s)
    metrics = finalize_stats({k: sum(s[k] for s in stats) for k in stats[0]})

Summing (not averaging) the micro-batch losses and gradients gives TRL's loss for the batch.
Across several processes pass GLOBAL totals (num_sequences_total, num_tokens_total, and
num_micro_batches counted over all processes) and all-reduce gradients and stats by SUM.

mask_truncated_completions is the caller's job: zero the whole mask row of every completion that
hit the length limit (and leave it counted in num_sequences_total, as TRL does).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from mlx_grpo import cuda_kernels
from mlx_grpo.config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS
from mlx_grpo.cuda_kernels import logprobs as cuda_logprobs

# Added to the reward std before dividing, as TRL does (keeps zero-std groups finite: A = 0).
ADVANTAGE_STD_EPS = 1e-4
# A group's std at or below this counts as "zero std" (TRL: torch.isclose(std, 0), atol 1e-8).
ZERO_STD_ATOL = 1e-8

Number = Union[int, float, mx.array]


# ----------------------------------------------------------------------------------------------
# Advantages


def _check_choice(name: str, value: str, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}")


def _as_rewards(rewards) -> mx.array:
    rewards = mx.array(rewards, dtype=mx.float32) if not isinstance(rewards, mx.array) else rewards
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {rewards.shape}")
    rewards = rewards.astype(mx.float32)
    # One host sync per generation batch; a NaN reward would silently poison every advantage.
    if not bool(mx.all(mx.isfinite(rewards)).item()):
        raise ValueError("rewards contain NaN or inf; fix the reward function so it returns finite floats")
    return rewards


def _check_group_size(num_rewards: int, group_size: int) -> None:
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (got {group_size}): a group of one has no reward std and zero "
            "advantage; set num_generations to 2 or more"
        )
    if num_rewards % group_size != 0:
        raise ValueError(
            f"{num_rewards} rewards do not split into groups of {group_size}; the generation batch "
            "must hold whole groups (num_prompts * group_size completions, group by group)"
        )


def group_reward_stats(rewards, group_size: int) -> tuple[mx.array, mx.array]:
    """Per-group reward mean and std (Bessel, ddof=1), each shape [N // group_size].

    rewards is [N], ordered group by group. The stds are what frac_reward_zero_std needs.
    """
    rewards = _as_rewards(rewards)
    _check_group_size(rewards.shape[0], group_size)
    grouped = rewards.reshape(-1, group_size)
    return grouped.mean(axis=1), mx.std(grouped, axis=1, ddof=1)


def batch_reward_std(rewards) -> mx.array:
    """Std (ddof=1) over the whole batch of rewards, as TRL's scale_rewards="batch"."""
    rewards = _as_rewards(rewards)
    if rewards.shape[0] < 2:
        raise ValueError("batch reward std needs at least 2 rewards")
    return mx.std(rewards, ddof=1)


def batch_std_from_sums(count: Number, reward_sum: Number, reward_sq_sum: Number) -> float:
    """Batch reward std (ddof=1) from globally reduced sums: count, sum(R), sum(R^2).

    For multi-process runs: each process sums its rewards and squared rewards, the sums are
    all-reduced, and every process gets the same std. Computed in float64 on the host.
    """
    n, s, sq = (float(v.item()) if isinstance(v, mx.array) else float(v) for v in (count, reward_sum, reward_sq_sum))
    if n < 2:
        raise ValueError(f"batch reward std needs count >= 2, got {n:g}")
    var = (sq - s * s / n) / (n - 1)
    return math.sqrt(max(var, 0.0))  # rounding can push a zero variance slightly below 0


def advantages_from_stats(
    rewards,
    group_means,
    scale_rewards: str,
    *,
    group_stds=None,
    batch_std: Optional[Number] = None,
) -> mx.array:
    """A = R - group mean, divided by (std + 1e-4) for scale_rewards "group" (group_stds) or
    "batch" (batch_std); "none" divides by nothing. group_means/group_stds are [num_groups] and
    rewards [num_groups * group_size], group by group. Use it when the stats were computed
    elsewhere (e.g. reduced across processes)."""
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    rewards = _as_rewards(rewards)
    group_means = mx.array(group_means).astype(mx.float32).reshape(-1)
    num_groups = group_means.shape[0]
    if num_groups == 0 or rewards.shape[0] % num_groups != 0:
        raise ValueError(f"{rewards.shape[0]} rewards do not match {num_groups} group means")
    group_size = rewards.shape[0] // num_groups
    advantages = rewards - mx.repeat(group_means, group_size)
    if scale_rewards == "group":
        if group_stds is None:
            raise ValueError('scale_rewards="group" needs group_stds')
        group_stds = mx.array(group_stds).astype(mx.float32).reshape(-1)
        if group_stds.shape[0] != num_groups:
            raise ValueError(f"got {group_stds.shape[0]} group stds for {num_groups} group means")
        advantages = advantages / (mx.repeat(group_stds, group_size) + ADVANTAGE_STD_EPS)
    elif scale_rewards == "batch":
        if batch_std is None:
            raise ValueError('scale_rewards="batch" needs batch_std')
        advantages = advantages / (batch_std + ADVANTAGE_STD_EPS)
    return advantages


def group_advantages(rewards, group_size: int, scale_rewards: str) -> mx.array:
    """Group-relative advantages [N] for rewards [N] ordered group by group (TRL's definition).

    A_i = R_i - mean(group); scale_rewards "group": / (group std + 1e-4), "batch": / (std over all
    N rewards + 1e-4), "none": unscaled. Stds use Bessel's correction (ddof=1). A group whose
    rewards are all equal gets A = 0. group_size < 2 raises ValueError.
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    means, stds = group_reward_stats(rewards, group_size)
    batch_std = batch_reward_std(rewards) if scale_rewards == "batch" else None
    return advantages_from_stats(rewards, means, scale_rewards, group_stds=stds, batch_std=batch_std)


def normalized_reward_sum(reward_parts, weights, group_size: int) -> mx.array:
    """GDPO's first half (TRL's multi_objective_aggregation = "normalize_then_sum"), shape [N].

    reward_parts [N, K]: each reward function's (unweighted) rewards, ordered group by group. Each
    function's rewards are normalized within their group, (r - mean) / (std + 1e-4) (ddof=1), then
    summed with `weights` ([K]). The advantages are then this sum normalized over the whole batch
    (advantages_from_stats with the batch mean and std).
    """
    parts = mx.array(np.asarray(reward_parts, dtype=np.float32))
    if parts.ndim != 2 or parts.shape[1] != len(weights):
        raise ValueError(f"reward_parts must be [N, {len(weights)}] (one column per reward function), got {parts.shape}")
    _check_group_size(parts.shape[0], group_size)
    grouped = parts.reshape(-1, group_size, parts.shape[1])
    normalized = (grouped - grouped.mean(axis=1, keepdims=True)) / (mx.std(grouped, axis=1, keepdims=True, ddof=1)
                                                                    + ADVANTAGE_STD_EPS)
    return (normalized.reshape(parts.shape) * mx.array(weights, dtype=mx.float32)).sum(axis=1)


def frac_reward_zero_std(group_stds) -> float:
    """Fraction of groups whose rewards are all equal (no learning signal), TRL's frac_reward_zero_std.

    TRL computes it from the std used for scaling; with scale_rewards="batch" that is the batch std,
    which makes the metric 0 or 1. Passing the per-group stds here always gives the useful number.
    """
    group_stds = mx.array(group_stds).reshape(-1)
    if group_stds.shape[0] == 0:
        raise ValueError("frac_reward_zero_std needs at least one group std")
    return (group_stds <= ZERO_STD_ATOL).astype(mx.float32).mean().item()


# ----------------------------------------------------------------------------------------------
# Log-probs and entropy


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _use_cuda_kernels(logits: mx.array, temperature: float) -> bool:
    _check_temperature(temperature)
    return cuda_kernels.available() and logits.dtype in cuda_logprobs.SUPPORTED_DTYPES


def _scaled_float32_logits(logits: mx.array, temperature: float) -> mx.array:
    _check_temperature(temperature)
    # bfloat16 logsumexp is off by ~0.05 nats for large vocabularies, so upcast (no-op for float32).
    logits = logits.astype(mx.float32)
    return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: mx.array, targets: mx.array, temperature: float = 1.0) -> mx.array:
    """log softmax(logits / temperature)[target] per position, float32, shape [B, T].

    logits [B, T, V] (any float dtype), targets [B, T] int ids. Computed as selected logit minus
    logsumexp, so no [B, T, V] log-softmax is kept; TRL divides by the sampling temperature too.
    """
    if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must be [B, T, V] and [B, T]")
    if _use_cuda_kernels(logits, temperature):
        return cuda_logprobs.token_logprobs_and_entropy(logits, targets, temperature)[0]
    scaled = _scaled_float32_logits(logits, temperature)
    selected = mx.take_along_axis(scaled, targets[..., None].astype(mx.int32), axis=-1).squeeze(-1)
    return selected - mx.logsumexp(scaled, axis=-1)


def token_logprobs_and_entropy(
    logits: mx.array, targets: mx.array, temperature: float = 1.0, entropy_gradient: bool = False
) -> tuple[mx.array, mx.array]:
    """token_logprobs and the entropy of softmax(logits / temperature) per position, float32 [B, T].

    H = logsumexp(x) - sum_v softmax(x)_v * x_v (equal to -sum p log p); a metric, so it carries no
    gradient, unless entropy_gradient (an entropy bonus in the loss). One pass shares the float32
    logits and the logsumexp between the two. On CUDA, two kernels instead
    (utils/cuda_kernels/logprobs.py): no float32 copy at all (they have no entropy gradient)."""
    if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must be [B, T, V] and [B, T]")
    if _use_cuda_kernels(logits, temperature) and not entropy_gradient:
        return cuda_logprobs.token_logprobs_and_entropy(logits, targets, temperature)
    scaled = _scaled_float32_logits(logits, temperature)
    lse = mx.logsumexp(scaled, axis=-1)
    selected = mx.take_along_axis(scaled, targets[..., None].astype(mx.int32), axis=-1).squeeze(-1)
    if entropy_gradient:
        return selected - lse, lse - (mx.softmax(scaled, axis=-1) * scaled).sum(axis=-1)
    scaled_sg, lse_sg = mx.stop_gradient(scaled), mx.stop_gradient(lse)
    probs = mx.exp(scaled_sg - lse_sg[..., None])
    entropy = mx.stop_gradient(lse_sg - (probs * scaled_sg).sum(axis=-1))
    return selected - lse, entropy


# ----------------------------------------------------------------------------------------------
# Loss


def _check_count(name: str, value, loss_type: str, allow_zero: bool = False) -> None:
    if value is None:
        raise ValueError(f"loss_type {loss_type!r} needs {name}; pass it to grpo_loss")
    if isinstance(value, Real) and not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def grpo_loss(
    logp: mx.array,
    old_logp: Optional[mx.array],
    ref_logp: Optional[mx.array],
    advantages: mx.array,
    mask: mx.array,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_sequences_total: Optional[Number] = None,
    num_tokens_total: Optional[Number] = None,
    num_micro_batches: Optional[int] = None,
    entropy: Optional[mx.array] = None,
    is_weights: Optional[mx.array] = None,
    delta: Optional[float] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    sampling_logp: Optional[mx.array] = None,
    off_policy_mask_threshold: Optional[float] = None,
    top_entropy_quantile: float = 1.0,
    use_bias_correction_kl: bool = False,
    entropy_coef: float | mx.array = 0.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The GRPO policy loss of ONE micro-batch, scaled so that the SUM over the micro-batches of a
    generation batch equals TRL's loss for that batch (TRL's _compute_loss, loss type by loss type).

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]. mask is 1 on tokens that get gradient
    (sampled completion tokens), 0 on padding, prompt and forced tool-output tokens. Masked tokens
    are inert: their log-probs may hold anything (even inf) without touching loss or gradient.
    old_logp None means on-policy (ratio = exp(logp - stop_gradient(logp)) = 1). ref_logp may be
    None only when beta == 0. epsilon_high None means epsilon (symmetric clipping).

    Ratio: r = exp(logp - old_logp) ("token"), or for "sequence" (GSPO) one ratio per sequence,
    r_i = exp(masked mean_t (logp - old_logp)), broadcast to its tokens. Per-token loss l:
      grpo, bnpo, dr_grpo, dapo, luspo: -min(r' A, clip(r, 1 - epsilon, 1 + epsilon_high) A),
               r' = min(r, delta) with delta set (two-sided clipping), else r
      cispo:   -stop_gradient(min(r, epsilon_high)) A logp     (epsilon_high is CISPO's eps_max, e.g. 5)
      sapo:    -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_temperature_pos if A > 0 else _neg
      vespo:   -phi_i A logp, phi_i = exp(lam + k log w_i - lam w_i) (no gradient), w_i the sequence
               ratio prod_t r_t (times the rollout weights of is_weights), k/lam by sign(A)
    is_weights ([B, T] or [B, 1], no gradient): the rollout importance-sampling weights
    (training/rollout_correction.py); they multiply l, except for vespo, which puts them into w_i.
    Masks (TRL's order; each multiplies l): off_policy_mask_threshold (DeepSeek-V3.2) drops a
    sequence with A < 0 whose mean over mask tokens of sampling_logp - logp exceeds the threshold
    (sampling_logp: the log-probs of the policy that sampled; None = old_logp); top_entropy_quantile
    q < 1 keeps the tokens whose entropy is >= this micro-batch's (1 - q) quantile of mask-token
    entropies (linear interpolation, torch.quantile's), needing `entropy`.
    Then l + beta * k3, k3 = exp(ref - logp) - (ref - logp) - 1, times r with use_bias_correction_kl.
    entropy_coef c > 0 subtracts c * H, H the mean entropy of the kept tokens (entropy must then
    carry its gradient): sum H / num_tokens_total for dapo/cispo/vespo, else each micro-batch's
    token mean / num_micro_batches (TRL's), so that H sums to the batch's mean entropy. An mx.array
    entropy_coef (use_adaptive_entropy: it changes every update, and a compiled loss takes it as an
    input instead of retracing) keeps the term, and the entropy's gradient, even while it is 0.

    Normalisation (TRL's loss_type), with |o_i| = sum_t mask[i, t]:
      grpo, sapo: sum_i (sum_t l*mask / max(|o_i|, 1)) / num_sequences_total
      bnpo:    (sum l*mask / max(sum mask, 1)) / num_micro_batches    (per-micro-batch token mean,
               averaged over micro-batches the way TRL's gradient accumulation does)
      dr_grpo: sum l*mask / (num_sequences_total * max_completion_length)
      dapo, cispo, vespo: sum l*mask / max(num_tokens_total, 1)   (mask tokens of the whole batch)
      luspo:   sum l*mask / num_sequences_total    (each sequence's loss times its length; TRL's
               mean_i(l_i |o_i|) at sequence level, masked where TRL's token level would count padding)
    TRL divides grpo/dr_grpo by the micro-batch size times the accumulation steps; with equal
    micro-batches that equals num_sequences_total. num_sequences_total counts every completion,
    including rows masked out whole (truncated), as TRL's mean over rows does.

    Returns (loss scalar, stats); stats are sums over this micro-batch (see finalize_stats).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    for name, arr in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy)):
        if arr is not None and arr.shape != logp.shape:
            raise ValueError(f"{name} shape {arr.shape} must equal logp shape {logp.shape}")
    if is_weights is not None and is_weights.shape not in (logp.shape, (logp.shape[0], 1)):
        raise ValueError(f"is_weights shape {is_weights.shape} must be [B, T] or [B, 1] for logp {logp.shape}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = {logp.shape[:1]}, got shape {advantages.shape}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-model log-probs); pass them or set beta to 0")
    if loss_type in ("grpo", "dr_grpo", "sapo", "luspo"):
        _check_count("num_sequences_total", num_sequences_total, loss_type)
    if loss_type == "dr_grpo":
        _check_count("max_completion_length", max_completion_length, loss_type)
    if loss_type == "bnpo":
        _check_count("num_micro_batches", num_micro_batches, loss_type)
    entropy_bonus = isinstance(entropy_coef, mx.array) or entropy_coef != 0.0
    if (top_entropy_quantile < 1.0 or entropy_bonus) and entropy is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef need the per-token entropy; pass entropy")
    if entropy_bonus and loss_type not in ("dapo", "cispo", "vespo"):
        _check_count("num_micro_batches", num_micro_batches, loss_type)
    if loss_type in ("dapo", "cispo", "vespo"):
        # 0 is legitimate (every completion truncated and masked): the loss is then 0
        _check_count("num_tokens_total", num_tokens_total, loss_type, allow_zero=True)

    logp = logp.astype(mx.float32)
    mask = mask.astype(mx.float32)
    live = mask > 0
    old_logp = mx.stop_gradient(logp) if old_logp is None else old_logp.astype(mx.float32)
    adv = advantages.astype(mx.float32)[:, None]  # [B, 1]
    tokens_per_seq = mask.sum(axis=-1)  # [B]
    if is_weights is not None:
        is_weights = mx.stop_gradient(is_weights.astype(mx.float32))

    # where() (not a multiply) so a masked token holding inf/NaN cannot make 0 * inf = NaN.
    log_ratio = mx.where(live, logp - old_logp, 0.0)
    if importance_sampling_level == "token":
        log_weights = log_ratio  # [B, T]
    else:
        log_weights = log_ratio.sum(axis=-1, keepdims=True) / mx.maximum(tokens_per_seq[:, None], 1.0)  # [B, 1]
    ratio = mx.exp(log_weights)
    coef_1 = ratio  # before delta's cap: the KL's bias correction uses it
    logp_live = mx.where(live, logp, 0.0)  # cispo and vespo multiply by logp itself

    phi = None
    if loss_type == "cispo":
        per_token_loss = -mx.stop_gradient(mx.minimum(ratio, epsilon_high)) * adv * logp_live
    elif loss_type == "sapo":
        tau = mx.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -mx.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    elif loss_type == "vespo":
        phi = vespo_gamma_weights(adv, log_ratio, mask, is_weights, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                                  vespo_lambda_neg)
        per_token_loss = -phi * adv * logp_live
    else:  # grpo, bnpo, dr_grpo, dapo, luspo: PPO's clipped surrogate
        clipped_ratio = mx.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
        if delta is not None:
            ratio = mx.minimum(ratio, delta)
        per_token_loss = -mx.minimum(ratio * adv, clipped_ratio * adv)
    off_policy_keep = None
    if off_policy_mask_threshold is not None:
        off_policy_keep = off_policy_mask(adv, logp, old_logp if sampling_logp is None else sampling_logp, mask,
                                          off_policy_mask_threshold)
        per_token_loss = per_token_loss * off_policy_keep
    entropy_keep = None
    if top_entropy_quantile < 1.0:
        entropy_keep = high_entropy_mask(entropy, mask, 1.0 - top_entropy_quantile)
        per_token_loss = per_token_loss * entropy_keep
    if is_weights is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * is_weights
    per_token_loss = mx.broadcast_to(per_token_loss, logp.shape)  # GSPO: the sequence loss on every token

    per_token_kl = None
    if ref_logp is not None:
        ref_delta = mx.where(live, ref_logp.astype(mx.float32) - logp, 0.0)
        per_token_kl = mx.exp(ref_delta) - ref_delta - 1.0
        if use_bias_correction_kl:  # DeepSeek-V3.2's unbiased estimator: weighted by the ratio (with its gradient)
            per_token_kl = per_token_kl * coef_1
        if beta != 0:
            per_token_loss = per_token_loss + beta * per_token_kl

    masked_loss = mx.where(live, per_token_loss * mask, 0.0)
    if loss_type in ("grpo", "sapo"):
        per_seq = masked_loss.sum(axis=-1) / mx.maximum(tokens_per_seq, 1.0)
        loss = per_seq.sum() / num_sequences_total
    elif loss_type == "bnpo":
        loss = masked_loss.sum() / mx.maximum(mask.sum(), 1.0) / num_micro_batches
    elif loss_type == "dr_grpo":
        loss = masked_loss.sum() / (num_sequences_total * max_completion_length)
    elif loss_type == "luspo":
        loss = masked_loss.sum() / num_sequences_total
    else:  # dapo, cispo, vespo
        loss = masked_loss.sum() / mx.maximum(mx.array(num_tokens_total, dtype=mx.float32), 1.0)
    policy_loss = loss
    if entropy_bonus:
        kept = mask if entropy_keep is None else mask * entropy_keep
        entropy_total = mx.where(kept > 0, entropy.astype(mx.float32) * kept, 0.0).sum()
        if loss_type in ("dapo", "cispo", "vespo"):
            entropy_term = entropy_total / mx.maximum(mx.array(num_tokens_total, dtype=mx.float32), 1.0)
        else:
            entropy_term = entropy_total / mx.maximum(kept.sum(), 1.0) / num_micro_batches
        loss = loss - entropy_coef * entropy_term

    # Statistics: sums, so micro-batches and processes add up before finalize_stats divides; and this
    # micro-batch's means (mean/*), which finalize_stats averages over micro-batches as TRL's log does.
    # Clip/ratio stats count tokens at "token" level and sequences at "sequence" level, like TRL.
    ratio_sg = mx.stop_gradient(ratio)
    if importance_sampling_level == "token":
        unit_weight, num_units = mask, mask.sum()
    else:
        unit_weight, num_units = mx.ones_like(ratio_sg), mx.array(float(logp.shape[0]))

    def unit_sum(x):
        return mx.where(unit_weight > 0, x * unit_weight, 0.0).sum()

    stats = {
        "num_sequences": mx.array(float(logp.shape[0])),
        "num_tokens": mask.sum(),
        "num_ratio_units": num_units,
        "micro_batches": mx.array(1.0),
        "ratio_sum": unit_sum(ratio_sg),
    }
    units, tokens = mx.maximum(num_units, 1.0), mx.maximum(mask.sum(), 1.0)
    if loss_type in CLIPPED_LOSS_TYPES:
        is_low = ((ratio_sg < 1.0 - epsilon) & (adv < 0)).astype(mx.float32)
        is_high = ((ratio_sg > 1.0 + epsilon_high) & (adv > 0)).astype(mx.float32)
        for name, flags in (("low", is_low), ("high", is_high), ("region", mx.maximum(is_low, is_high))):
            stats[f"clip_{name}_sum"] = unit_sum(flags)
            stats[f"mean/clip_ratio/{name}_mean"] = stats[f"clip_{name}_sum"] / units
        # TRL's low_min / high_max: the extreme per-sequence clip share of the micro-batch (rows with tokens)
        if importance_sampling_level == "token":
            has_tokens = tokens_per_seq > 0
            per_seq_low = mx.where(live, is_low, 0.0).sum(-1) / mx.maximum(tokens_per_seq, 1.0)
            per_seq_high = mx.where(live, is_high, 0.0).sum(-1) / mx.maximum(tokens_per_seq, 1.0)
        else:
            has_tokens = mx.ones((logp.shape[0],), dtype=mx.bool_)
            per_seq_low, per_seq_high = is_low[:, 0], is_high[:, 0]
        any_row = has_tokens.any()
        stats["mean/clip_ratio/low_min"] = mx.where(any_row, mx.where(has_tokens, per_seq_low, mx.inf).min(), 0.0)
        stats["mean/clip_ratio/high_max"] = mx.where(any_row, mx.where(has_tokens, per_seq_high, -mx.inf).max(), 0.0)
    elif loss_type == "cispo":
        stats["mean/cispo_clip_ratio"] = unit_sum(((ratio_sg > epsilon_high) & (adv > 0)).astype(mx.float32)) / units
    elif loss_type == "vespo":
        stats["mean/vespo/phi_seq_mean"] = phi.sum() / max(float(logp.shape[0]), 1.0)
    if per_token_kl is not None:
        stats["kl_sum"] = mx.where(live, mx.stop_gradient(per_token_kl) * mask, 0.0).sum()
        stats["mean/kl"] = stats["kl_sum"] / tokens
    if entropy is not None:
        stats["entropy_sum"] = mx.where(live, mx.stop_gradient(entropy).astype(mx.float32) * mask, 0.0).sum()
        stats["mean/entropy"] = stats["entropy_sum"] / tokens
    if entropy_bonus:
        stats["policy_loss"] = mx.stop_gradient(policy_loss)  # TRL's policy_loss: the loss without the bonus
        # The bonus's own tokens, summed: the adaptive controller's global mean entropy (step.adapt_entropy_coef)
        stats["entropy_bonus_sum"] = mx.stop_gradient(entropy_total)
        stats["entropy_bonus_tokens"] = kept.sum()
    if off_policy_keep is not None:  # ours: the share of sequences the off-policy mask keeps
        stats["mean/off_policy_mask/kept"] = off_policy_keep.sum() / max(float(logp.shape[0]), 1.0)
    return loss, stats


def off_policy_mask(adv, logp, sampling_logp, mask, threshold) -> mx.array:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's get_off_policy_mask), [B, 1] of 1 (keep) / 0 (drop).

    Keep a sequence if A >= 0 or its mean over mask tokens of sampling_logp - logp (no gradient) is <= threshold.
    adv [B, 1]; logp, sampling_logp, mask [B, T].
    """
    live = mask > 0
    kl = mx.where(live, sampling_logp.astype(mx.float32) - mx.stop_gradient(logp), 0.0)
    mean_kl = kl.sum(axis=-1, keepdims=True) / mx.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    return ((adv >= 0) | (mean_kl <= threshold)).astype(mx.float32)


def high_entropy_mask(entropy, mask, quantile: float) -> mx.array:
    """1 where a mask token's entropy is >= the `quantile` quantile of the mask tokens' entropies, else 0, [B, T].

    The quantile interpolates linearly between order statistics (torch.quantile): position
    quantile * (n - 1) among the n sorted mask-token entropies. No host sync (it runs compiled).
    """
    live = mask > 0
    entropy = mx.stop_gradient(entropy.astype(mx.float32))
    ordered = mx.sort(mx.where(live, entropy, mx.inf).reshape(-1))  # padding sorts last
    last = mx.maximum(live.sum() - 1, 0)
    position = quantile * last.astype(mx.float32)
    low = mx.floor(position).astype(mx.int32)
    high = mx.minimum(low + 1, last).astype(mx.int32)
    low_value, high_value = ordered[low], ordered[high]
    threshold = low_value + (position - low.astype(mx.float32)) * mx.where(high > low, high_value - low_value, 0.0)
    return ((entropy >= threshold) & live).astype(mx.float32)


# The loss types with PPO's clipped surrogate (and so the clip_ratio metrics).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# VESPO's floor for the sequence weight, log(1e-8), and its cap on log ratios (TRL's get_gamma_weights).
VESPO_LOG_FLOOR = math.log(1e-8)
VESPO_LOG_CAP = 20.0


def vespo_gamma_weights(adv, log_ratio, mask, is_weights, k_pos, lambda_pos, k_neg, lambda_neg) -> mx.array:
    """VESPO's per-sequence weight phi(w) = exp(lam + k log w - lam w) (phi(1) = 1), shape [B, 1], no gradient.

    log w = sum_t clip(log r_t, -20, 20) over mask tokens, plus sum_t log(is weight) (floored at
    log 1e-8) where rollout weights are given, clipped to [log 1e-8, 20]; k, lam by A >= 0 or not.
    Non-finite phi counts as 0. adv [B, 1]; log_ratio, mask [B, T]; is_weights [B, T] or None.
    """
    live = mask > 0
    seq_log = mx.where(live, mx.clip(log_ratio, -VESPO_LOG_CAP, VESPO_LOG_CAP), 0.0).sum(axis=-1, keepdims=True)
    if is_weights is not None:
        # Summed over mask tokens only: TRL sums every slot, where padding holds a weight of 1 (log 0) anyway.
        log_is = mx.clip(mx.log(is_weights), VESPO_LOG_FLOOR, VESPO_LOG_CAP)
        seq_log = seq_log + mx.where(live, log_is, 0.0).sum(axis=-1, keepdims=True)
    log_w = mx.stop_gradient(mx.clip(seq_log, VESPO_LOG_FLOOR, VESPO_LOG_CAP))
    nonneg = adv >= 0
    k = mx.where(nonneg, k_pos, k_neg)
    lam = mx.maximum(mx.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = mx.exp(lam + k * log_w - lam * mx.exp(log_w))
    return mx.where(mx.isfinite(phi), phi, 0.0)


def finalize_stats(summed_stats: dict) -> dict[str, float]:
    """Turn summed stats into TRL-named metrics (floats).

    kl, entropy, clip_ratio/{low,high,region}_mean, cispo_clip_ratio and vespo/phi_seq_mean are TRL's:
    each micro-batch's mean (over mask tokens; over ratio units, i.e. mask tokens or GSPO's sequences,
    for the clip ratios; over sequences for phi), averaged over the micro-batches as TRL's log
    averages them. importance_ratio/mean (ours) pools every ratio unit of the batch. Empty
    denominators count as 1 (TRL's clamp).
    """
    def value(key):
        v = summed_stats[key]
        return float(v.item()) if isinstance(v, mx.array) else float(v)

    units = max(value("num_ratio_units"), 1.0)
    micro_batches = max(value("micro_batches"), 1.0)
    metrics = {"importance_ratio/mean": value("ratio_sum") / units}
    if "policy_loss" in summed_stats:  # with an entropy bonus: the loss without it
        metrics["policy_loss"] = value("policy_loss")
    for key in summed_stats:
        if key.startswith("mean/"):
            metrics[key[len("mean/"):]] = value(key) / micro_batches
    return metrics
