"""Rollout importance-sampling correction: rollouts sampled by a quantized copy, trained as the policy's.

A quantized rollout copy samples from a slightly different policy than the float one the loss trains.
TRL's correction for its vLLM rollouts (trl/trainer/grpo_trainer.py, vllm_importance_sampling_*):
the trained policy's own log-probs are the PPO "old" policy, and each completion token (or whole
sequence) is weighted by rho = pi_trained / pi_rollout, truncated or masked to [clip_min, clip_max]:

    token_*:    rho_t = exp(logp_trained_t - logp_rollout_t)                      [B, T]
    sequence_*: rho_i = exp(sum_t (logp_trained_t - logp_rollout_t))  (a sum)     [B, 1]
    *_truncate: clip(rho, clip_min, clip_max)     *_mask: rho, or 0 outside [clip_min, clip_max]

clip_min/clip_max None mean no bound on that side. Padding slots hold a log difference of 0 (rho = 1).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlx_grpo.config import IMPORTANCE_SAMPLING_MODES


def importance_sampling_weights(trained_logp: mx.array, rollout_logp: mx.array, mask: mx.array, mode: str,
                                clip_min: float | None, clip_max: float | None) -> mx.array:
    """The rollout weights of one micro-batch: [B, T] for token_* modes, [B, 1] for sequence_* (see above)."""
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; valid: {', '.join(IMPORTANCE_SAMPLING_MODES)}")
    diff = mx.where(mask > 0, trained_logp.astype(mx.float32) - rollout_logp.astype(mx.float32), 0.0)
    if mode.startswith("sequence_"):
        diff = diff.sum(axis=-1, keepdims=True)
    ratio = mx.exp(diff)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("_truncate"):
        return mx.clip(ratio, low, high)
    return mx.where((ratio < low) | (ratio > high), 0.0, ratio)


def sampling_metrics(trained_logp: list, rollout_logp: list, weights: list, masks: list, mode: str) -> dict:
    """TRL's sampling/* metrics over a generation batch (lists: one array per micro-batch).

    sampling_logp_difference: |logp_trained - logp_rollout| over mask tokens (mean, max);
    importance_sampling_ratio: the weights (min, mean, max) over mask tokens, or over every
    sequence (rows masked out whole included, as TRL flattens them) for sequence_* modes.
    """
    differences, ratios = [], []
    for trained, rollout, weight, mask in zip(trained_logp, rollout_logp, weights, masks):
        live = np.array(mask) > 0
        differences.append(np.abs(np.array(trained) - np.array(rollout))[live])
        weight = np.array(weight)
        ratios.append(weight.reshape(-1) if mode.startswith("sequence_") else np.broadcast_to(weight, live.shape)[live])
    difference, ratio = np.concatenate(differences), np.concatenate(ratios)

    def stat(values, reduce):
        return float(reduce(values)) if values.size else 0.0  # TRL logs 0 for an empty batch

    return {
        "sampling/sampling_logp_difference/mean": stat(difference, np.mean),
        "sampling/sampling_logp_difference/max": stat(difference, np.max),
        "sampling/importance_sampling_ratio/min": stat(ratio, np.min),
        "sampling/importance_sampling_ratio/mean": stat(ratio, np.mean),
        "sampling/importance_sampling_ratio/max": stat(ratio, np.max),
    }
