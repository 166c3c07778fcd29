"""One GRPO step, as the trainer (mlx-grpo.py) and bench/grpo_step.py both run it.

    setup = build_step(cfg, world, model, total_updates, stop_token_ids, calculator)
    state = TrainState(rollouts_quantized=cfg.quantize_for_rollouts)
    rollouts = sample_rollouts(setup, state, prompts)        # rollouts, old-policy and reference log-probs
    updates = grpo_updates(setup, state, rollouts, rewards)  # advantages -> normalizers -> num_iterations updates
    save_training_checkpoint(setup, state, run_dir, write_model_files)
    state = load_training_checkpoint(setup, path)            # a resumed run: weights, optimizer, RNGs, state

Under mlx.launch every process runs the step on its share of the step's prompts
(utils/training/distributed.py): the advantages' batch std, the loss normalizers and the gradients
are global, so every process takes the same update. TrainState holds every counter a checkpoint
restores, saved and loaded as a whole.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_grpo.config import GRPOConfig, config_to_dict
from mlx_grpo.generation.engine import RolloutStats, generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.training.backend import current_backend, generation_options, resolve_for_backend, resolve_headroom
from mlx_grpo.training.checkpoint import REFERENCE_FILE, CheckpointError, load_checkpoint, save_checkpoint
from mlx_grpo.training.distributed import (
    World,
    group_advantages_across,
    normalize_then_sum_across,
    process_states,
    restore_process_state,
    reward_std_across,
)
from mlx_grpo.training.lora import base_policy, has_adapters, load_adapter_weights, rollout_copy
from mlx_grpo.training.loss import finalize_stats, frac_reward_zero_std, group_reward_stats
from mlx_grpo.training.memory import record_peak
from mlx_grpo.training.muon import MuonAdamW, muon_adamw
from mlx_grpo.training.rollout_correction import importance_sampling_weights, sampling_metrics
from mlx_grpo.training.shared_prompt import supports_shared_prompt
from mlx_grpo.training.update import (
    FusedAdamW,
    LossAndGrad,
    UpdateResult,
    ensure_float32,
    frozen_copy,
    frozen_logprobs,
    loss_normalizers,
    make_loss_and_grad,
    make_lr_schedule,
    masked_all_finite,
    pack_micro_batches,
    policy_update,
)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite numbers a setting avoids); the message names the setting."""


# TrainState fields an older checkpoint lacks; their defaults resume it as a fresh run would start them.
LATER_FIELDS = ("entropy_coef", "last_world_entropy")


@dataclass
class TrainState:
    """Every counter of a run that a checkpoint restores (with the weights, the optimizer and the RNGs)."""

    step: int = 0  # steps done (a step: one generation batch and its num_iterations updates)
    update: int = 0  # optimizer updates done, skipped ones included
    nan_streak: int = 0  # skipped updates in a row
    nan_events: int = 0  # skipped updates and rollout fallbacks to full precision, over the run
    rollouts_quantized: bool = False  # rollouts from a quantized copy (off for good after non-finite log-probs)
    data: dict = field(default_factory=dict)  # the data order's position (PromptSampler.state_dict())
    eval_history: list = field(default_factory=list)  # {"update", "eval/accuracy", ...} per evaluation
    config_changes: list = field(default_factory=list)  # keys a resume changed: {"key", "old", "new", "update"}
    # use_adaptive_entropy's controller (TRL's entropy_coef and _last_world_entropy). None: not adapted yet, so
    # cfg.entropy_coef; no finite entropy measured yet (TRL's inf, or its NaN after a non-finite update): no bonus.
    entropy_coef: float | None = None
    last_world_entropy: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, source="the checkpoint") -> "TrainState":
        """The state saved by to_dict (other keys, such as the processes' RNG states, are left alone).

        Fields added since checkpoints were first written (LATER_FIELDS) take their defaults when absent."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in saved and name not in LATER_FIELDS]
        if missing:
            raise CheckpointError(f"{source} has no {', '.join(missing)} in its trainer state: it was written by "
                                  "another version of MLX-GRPO; resume it with that version, or start a new run")
        return cls(**{name: saved[name] for name in names if name in saved})


def every(interval: int, step: int) -> bool:
    """True on every interval-th step (the unit of all *_steps keys); interval 0 = never."""
    return interval > 0 and step % interval == 0


# ----------------------------------------------------------------------------------------------
# What every step runs on


@dataclass
class StepSetup:
    """The policy, its reference, the optimizer and the samplers of a run, built once (build_step)."""

    cfg: GRPOConfig
    world: World
    model: Any  # the policy: float32 master weights, or float32 adapters on a frozen base
    reference: Any  # the KL reference (beta > 0) or None
    optimizer: FusedAdamW | MuonAdamW
    schedule: Callable  # optimizer step -> learning rate
    loss_and_grad: LossAndGrad
    sampler: Callable  # rollout sampler (temperature, top_p, top_k, min_p)
    stop_token_ids: set
    calculator: Any = None  # generation.engine.CalculatorTool, or None
    fast_decode: bool = True  # False: rollouts through mlx-lm's model call, never the nanochat decoder
    adapters: bool = False  # LoRA/DoRA: the base is already in compute_dtype
    share_prompts: bool = False  # micro-batches run each prompt once (cfg.share_prompt_forward, a covered model)

    @property
    def compute_dtype(self):
        return getattr(mx, self.cfg.compute_dtype)


def build_step(cfg: GRPOConfig, world: World, model, total_updates: int, stop_token_ids, calculator=None,
               fast_decode: bool = True) -> StepSetup:
    """The reference, the optimizer (warmup and decay sized on total_updates), the loss and the samplers."""
    if None in (cfg.pad_to_multiple_of, cfg.prefill_align, cfg.rollout_headroom):  # not resolved by the trainer
        cfg = resolve_headroom(resolve_for_backend(cfg, current_backend())[0], current_backend())[0]
    compute_dtype = getattr(mx, cfg.compute_dtype)
    adapters = has_adapters(model)
    # The reference exists only with a KL term: the starting weights (quantized with the rollouts), or
    # with adapters the base itself, the policy with its adapters switched off: no copy.
    reference = None
    if cfg.beta > 0 and adapters:
        reference = base_policy(model)
    elif cfg.beta > 0:  # sync_ref_model mixes the policy into it: a dense copy, quantization would not mix
        quantized_reference = cfg.quantize_for_rollouts and not cfg.sync_ref_model
        reference = frozen_copy(model, cfg.rollout_quant_bits if quantized_reference else None,
                                cfg.rollout_quant_group_size, dtype=compute_dtype)
    schedule = make_lr_schedule(cfg.learning_rate, total_updates, cfg.warmup_ratio, cfg.lr_scheduler_type)
    if cfg.optimizer == "muon":  # nanochat's groups, each at its base rate x schedule
        optimizer = muon_adamw(model, schedule, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                               unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr,
                               weight_decay=cfg.weight_decay)
    else:
        optimizer = FusedAdamW(learning_rate=schedule, betas=[cfg.adam_beta1, cfg.adam_beta2],
                               weight_decay=cfg.weight_decay)
    loss_and_grad = make_loss_and_grad(
        model, temperature=cfg.temperature, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
        epsilon_high=cfg.effective_epsilon_high, beta=cfg.beta,
        importance_sampling_level=cfg.importance_sampling_level, max_completion_length=cfg.generation_limit,
        compute_dtype=compute_dtype, use_compile=cfg.use_compile, loss_options=loss_options(cfg),
        grad_checkpoint=cfg.grad_checkpoint, adaptive_entropy=cfg.use_adaptive_entropy)
    # A vision-language policy (utils/vlm/) is not covered: its micro-batches carry image features.
    share_prompts = cfg.share_prompt_forward and supports_shared_prompt(model) and not hasattr(model, "processor")
    if cfg.share_prompt_forward and not share_prompts:
        model_type = getattr(getattr(model, "args", None), "model_type", None)
        which = "a vision-language model" if hasattr(model, "processor") else f"model type {model_type!r}"
        print(f"[update] share_prompt_forward: {which} is not covered; each completion runs its prompt in the update")
    # With groups split across micro-batches the shared forward measured slower than the plain one (d32,
    # micro-batch 8 of groups of 16: BENCHMARKS.md), so it runs only where micro-batches hold whole groups.
    # Checkpointing recomputes a block from its input alone; the shared forward's completion pass also reads the
    # prompt's keys and values through its caches, which mx.checkpoint cannot take, so it would keep everything.
    elif share_prompts and cfg.grad_checkpoint:
        share_prompts = False
        print("[update] share_prompt_forward: grad_checkpoint needs the plain forward; each completion runs its "
              "prompt in the update")
    elif share_prompts and cfg.effective_micro_batch_size % cfg.num_generations:
        share_prompts = False
        print(f"[update] share_prompt_forward: micro_batch_size {cfg.effective_micro_batch_size} splits groups of "
              f"{cfg.num_generations}, where the plain forward is faster; set it to a multiple of num_generations "
              "to share each prompt")
    return StepSetup(cfg, world, model, reference, optimizer, schedule, loss_and_grad,
                     make_rollout_sampler(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p), set(stop_token_ids),
                     calculator, fast_decode, adapters, share_prompts)


def loss_options(cfg: GRPOConfig) -> dict:
    """The grpo_loss keywords of TRL's newer loss types, masks and entropy bonus, from the config."""
    names = ("delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
             "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold", "top_entropy_quantile",
             "use_bias_correction_kl", "entropy_coef")
    return {name: getattr(cfg, name) for name in names}


# ----------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    """One step's completions on this process, packed for the loss, with the log-probs the loss compares to."""

    prompts: list
    completions: list
    stats: RolloutStats
    slices: list  # rows of each micro-batch
    batches: list  # update.PackedBatch (or shared_prompt.SharedPromptBatch) per micro-batch
    old_logp: list | None  # per micro-batch; None where they equal the current policy's (on-policy)
    ref_logp: list | None  # per micro-batch, under the reference (beta > 0)
    quantized: bool  # sampled by a quantized copy
    seconds: dict = field(default_factory=dict)  # "rollout", "old_policy", "reference"
    rollout_logp: list | None = None  # per micro-batch, under the quantized copy that sampled them
    is_weights: list | None = None  # per micro-batch: the importance-sampling correction's weights
    sampling: dict = field(default_factory=dict)  # TRL's sampling/* metrics of the correction
    peaks: dict = field(default_factory=dict)  # the same phases and "update": measured peak bytes


def rollout_policy(setup: StepSetup, quantized: bool):
    """The model rollouts sample from: decode is memory-bound, so fewer bytes are faster.

    A quantized copy, or a compute_dtype copy of the float32 policy, or the policy itself (float32, no
    adapters). With adapters (LoRA/DoRA/QLoRA) the copy has them merged into a dense base: one matmul per
    layer instead of three, and the fast nanochat decoder applies. It is made once per step and freed
    after the rollout (_sample holds it); sampled tokens are the adapted policy's (tests/test_lora.py).
    """
    cfg = setup.cfg
    if setup.adapters and hasattr(setup.model, "processor"):
        # A vision-language policy (utils/vlm/) has no frozen copy (check_vlm_config refuses the settings that
        # need one): its adapters sample in place, on a base already in compute_dtype.
        return setup.model
    if setup.adapters and not quantized and not cfg.merge_adapters_for_decoding:
        return setup.model  # adapters in place: no copy, through mlx-lm's model call
    if quantized or setup.adapters or setup.compute_dtype != mx.float32:
        return rollout_copy(setup.model, cfg.rollout_quant_bits if quantized else None, cfg.rollout_quant_group_size,
                            setup.compute_dtype)
    return setup.model


def _lap(seconds: dict, phase: str, start: float, peaks: dict | None = None) -> float:
    """Time a phase (and record its peak memory in `peaks`, when it ran)."""
    mx.synchronize()  # the phase's work is done, not only queued
    now = time.perf_counter()
    seconds[phase] = seconds.get(phase, 0.0) + now - start
    if peaks is not None:
        record_peak(peaks, phase)
    return now


def _sample(setup: StepSetup, prompts, quantized: bool, seconds: dict, peaks: dict) -> Rollouts:
    cfg = setup.cfg
    start = time.perf_counter()
    policy = rollout_policy(setup, quantized)
    completions, stats = generate_completions(
        policy, prompts, group_size=cfg.num_generations, max_new_tokens=cfg.generation_limit, sampler=setup.sampler,
        stop_token_ids=setup.stop_token_ids, calculator=setup.calculator, fast_decode=setup.fast_decode,
        **generation_options(cfg))
    if hasattr(setup.model, "pack_micro_batches"):  # a VLM: rows carry image features; prompts never shared
        slices, batches = setup.model.pack_micro_batches(prompts, completions, cfg.effective_micro_batch_size,
                                                         cfg.mask_truncated_completions,
                                                         pad_multiple=cfg.pad_to_multiple_of)
    else:
        slices, batches = pack_micro_batches(prompts, completions, cfg.effective_micro_batch_size,
                                             cfg.mask_truncated_completions, pad_multiple=cfg.pad_to_multiple_of,
                                             share_prompts=setup.share_prompts)
    start = _lap(seconds, "rollout", start, peaks)
    # Old-policy log-probs only where they differ from the current ones: the policy that sampled them
    # is a quantized copy, or the batch is reused for more than one update. With the correction, a
    # quantized copy's rollouts are weighted by pi_trained / pi_rollout and "old" is the trained policy.
    old_logp, rollout_logp, is_weights, sampling = None, None, None, {}
    if quantized and cfg.vllm_importance_sampling_correction:
        rollout_logp = frozen_logprobs(policy, batches, cfg.temperature)
        with setup.loss_and_grad.compute_weights():  # the weights the loss forward runs with
            trained_logp = frozen_logprobs(setup.model, batches, cfg.temperature)
        is_weights = [importance_sampling_weights(t, r, b.mask, cfg.vllm_importance_sampling_mode,
                                                  cfg.vllm_importance_sampling_clip_min,
                                                  cfg.vllm_importance_sampling_clip_max)
                      for t, r, b in zip(trained_logp, rollout_logp, batches)]
        mx.eval(is_weights)
        sampling = sampling_metrics(trained_logp, rollout_logp, is_weights, [b.mask for b in batches],
                                    cfg.vllm_importance_sampling_mode)
        old_logp = trained_logp if cfg.num_iterations > 1 else None  # one update: "old" is the policy itself
    elif quantized or cfg.num_iterations > 1:
        old_logp = frozen_logprobs(policy, batches, cfg.temperature)
        rollout_logp = old_logp if quantized else None
    _lap(seconds, "old_policy", start, peaks if rollout_logp is not None or old_logp is not None else None)
    return Rollouts(prompts, completions, stats, slices, batches, old_logp, None, quantized, seconds,
                    rollout_logp, is_weights, sampling, peaks)


def sample_rollouts(setup: StepSetup, state: TrainState, prompts) -> Rollouts:
    """num_generations completions per prompt (token id lists), their old-policy and reference log-probs.

    Non-finite log-probs of a quantized rollout copy switch rollouts to full precision for the rest
    of the run (state.rollouts_quantized, counted in state.nan_events) and the rollouts are sampled
    again; every process takes the same branch.
    """
    seconds, peaks = {}, {}
    mx.reset_peak_memory()
    rollouts = _sample(setup, prompts, state.rollouts_quantized, seconds, peaks)
    if rollouts.quantized and not setup.world.all_true(masked_all_finite(rollouts.rollout_logp, rollouts.batches)):
        print("[nan] the quantized rollout copy gave non-finite log-probs: rollouts switch to full precision "
              "for the rest of the run; sampling this step again")
        state.rollouts_quantized = False
        state.nan_events += 1
        rollouts = _sample(setup, prompts, False, seconds, peaks)
    start = time.perf_counter()
    rollouts.ref_logp = reference_logprobs(setup, rollouts.batches)
    _lap(seconds, "reference", start, peaks if rollouts.ref_logp is not None else None)
    return rollouts


def reference_logprobs(setup: StepSetup, batches) -> list | None:
    if setup.reference is None:
        return None
    ref_logp = frozen_logprobs(setup.reference, batches, setup.cfg.temperature)
    if not setup.world.all_true(masked_all_finite(ref_logp, batches)):
        quantized = setup.cfg.quantize_for_rollouts
        fix = "set quantize_for_rollouts = false" if quantized else 'use compute_dtype = "float32"'
        raise TrainingError(f"the reference model gave non-finite log-probs; {fix}")
    return ref_logp


# ----------------------------------------------------------------------------------------------
# Updates


@dataclass
class StepUpdate:
    update: int  # 1-based index of the update in the run
    lr: float  # the learning rate it used
    nan_events: int  # state.nan_events after it
    result: UpdateResult
    reward_std: float = 0.0  # std of the step's rewards over every process (TRL's reward_std)
    entropy_coef: float | None = None  # with an entropy bonus: the coefficient after the update (TRL's log)


def grpo_updates(setup: StepSetup, state: TrainState, rollouts: Rollouts, rewards,
                 reward_parts=None) -> list[StepUpdate]:
    """Rewards (one per completion) -> group-relative advantages -> num_iterations optimizer updates.

    reward_parts [N, K]: each reward function's unweighted rewards, which multi_objective_aggregation =
    "normalize_then_sum" needs (with cfg.reward_weights, [] = 1 each).

    A non-finite loss or gradient skips its update; max_nan_steps skipped in a row stop the run
    (TrainingError). Counts the step done in `state`.
    """
    cfg, world, model = setup.cfg, setup.world, setup.model
    if cfg.multi_objective_aggregation == "normalize_then_sum":
        if reward_parts is None:
            raise ValueError('multi_objective_aggregation = "normalize_then_sum" needs reward_parts')
        weights = cfg.reward_weights or [1.0] * np.shape(reward_parts)[1]
        advantages = normalize_then_sum_across(world, reward_parts, weights, cfg.num_generations)
    else:
        advantages = group_advantages_across(world, mx.array(np.asarray(rewards), dtype=mx.float32),
                                             cfg.num_generations, cfg.scale_rewards)
    # Loss normalizers of the whole (global) batch, so the processes' gradients add up to its gradient.
    normalizers = world.sum_values(loss_normalizers(rollouts.completions, rollouts.batches))
    reward_std = reward_std_across(world, rewards)
    updates = []
    mx.reset_peak_memory()
    for _ in range(cfg.num_iterations):
        lr = float(setup.schedule(setup.optimizer.step))
        model.train()  # only the loss forward runs in train mode (LoRA dropout)
        result = policy_update(model, setup.optimizer, setup.loss_and_grad, rollouts.batches, rollouts.slices,
                               advantages, rollouts.old_logp, rollouts.ref_logp, normalizers, cfg.max_grad_norm,
                               all_sum=world.sum_tree, is_weights=rollouts.is_weights,
                               # the off-policy mask compares with the policy that sampled (TRL's choice)
                               sampling_logp=rollouts.rollout_logp if cfg.off_policy_mask_threshold is not None
                               else None,
                               entropy_coef=applied_entropy_coef(cfg, state) if cfg.use_adaptive_entropy else None)
        record_peak(rollouts.peaks, "update")
        if cfg.use_adaptive_entropy:  # after every update, skipped ones too (TRL's, at each optimizer step)
            state.entropy_coef, state.last_world_entropy = adapt_entropy_coef(cfg, state, result.stats)
        model.eval()
        state.update += 1
        if result.applied:
            state.nan_streak = 0
        else:
            state.nan_streak, state.nan_events = state.nan_streak + 1, state.nan_events + 1
            print(f"[nan] non-finite loss or gradients at update {state.update}: skipped ({state.nan_streak} in a "
                  f"row; the run stops at max_nan_steps={cfg.max_nan_steps})")
            if state.nan_streak >= cfg.max_nan_steps:
                raise TrainingError(f"stopping: {state.nan_streak} updates in a row had non-finite loss or "
                                    "gradients; lower learning_rate or use compute_dtype = \"float32\"")
        coef = current_entropy_coef(cfg, state) if cfg.use_adaptive_entropy or cfg.entropy_coef != 0.0 else None
        updates.append(StepUpdate(state.update, lr, state.nan_events, result, reward_std, coef))
    state.step += 1
    if cfg.sync_ref_model and every(cfg.ref_model_sync_steps, state.step):
        sync_reference(setup.reference, setup.model, cfg.ref_model_mixup_alpha)
    return updates


def current_entropy_coef(cfg: GRPOConfig, state: TrainState) -> float:
    """The entropy coefficient now: the adaptive one, or cfg.entropy_coef (static, or not adapted yet)."""
    return cfg.entropy_coef if state.entropy_coef is None else state.entropy_coef


def applied_entropy_coef(cfg: GRPOConfig, state: TrainState) -> float:
    """The coefficient an adaptive update's loss uses: TRL applies it only while the last update's entropy was at or
    below entropy_target, so not before a first measurement; the entropy term stays in the loss either way."""
    last = state.last_world_entropy
    return current_entropy_coef(cfg, state) if last is not None and last <= cfg.entropy_target else 0.0


def adapt_entropy_coef(cfg: GRPOConfig, state: TrainState, stats: dict) -> tuple[float, float | None]:
    """TRL's adaptive entropy control (Skywork-OR1) after an update: (the next coefficient, the update's entropy).

    The entropy H is the update's mean over the bonus's tokens (mask tokens; the kept ones with
    top_entropy_quantile < 1) of every micro-batch and process: stats are summed over both, so it is the same
    on every process. H <= entropy_target: coef + delta, at most entropy_coef_max; else coef - delta, at least
    entropy_coef_min. A non-finite H steps down (TRL's NaN comparison is false) and is kept as None."""
    entropy = stats["entropy_bonus_sum"] / max(stats["entropy_bonus_tokens"], 1.0)  # TRL's clamp(min=1)
    coef = current_entropy_coef(cfg, state)
    if entropy <= cfg.entropy_target:
        coef = min(coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
    else:
        coef = max(coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)
    return coef, entropy if np.isfinite(entropy) else None


def sync_reference(reference, policy, alpha: float) -> None:
    """TRL's sync_ref_model: reference = alpha * policy + (1 - alpha) * reference, in float32, stored in the
    reference's dtype (every process holds the same policy, so every reference stays the same)."""
    ref = dict(tree_flatten(reference.parameters()))
    mixed = []
    for name, p in tree_flatten(policy.parameters()):
        mix = alpha * p.astype(mx.float32) + (1.0 - alpha) * ref[name].astype(mx.float32)
        mixed.append((name, mix.astype(ref[name].dtype)))
    reference.load_weights(mixed)
    mx.eval(reference.parameters())


def update_metrics(cfg: GRPOConfig, rollouts: Rollouts, rewards, update: StepUpdate, accuracy: float) -> dict:
    """Everything logged for one update (names follow TRL's where one exists); rewards: data.rewards' result."""
    _, group_stds = group_reward_stats(mx.array(rewards.total, dtype=mx.float32), cfg.num_generations)
    completions, result = rollouts.completions, update.result
    lengths = [len(c.tokens) for c in completions]
    return {
        "lr": update.lr,
        "nan_events": update.nan_events,
        "loss": result.loss,
        "reward": float(rewards.total.mean()),
        "reward_std": update.reward_std,
        "reward_std/group_mean": float(group_stds.mean()),  # ours: the mean of the groups' stds
        **{f"rewards/{name}/mean": float(values.mean()) for name, values in rewards.per_function.items()},
        **{f"rewards/{name}/std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
           for name, values in rewards.per_function.items()},
        "reward_failures": int(sum(rewards.failures.values())),
        "frac_reward_zero_std": frac_reward_zero_std(group_stds),
        "train/accuracy": accuracy,
        **finalize_stats(result.stats),
        **rollouts.sampling,
        "completions/mean_length": float(np.mean(lengths)),
        "completions/min_length": int(min(lengths)),
        "completions/max_length": int(max(lengths)),
        "completions/clipped_ratio": float(np.mean([c.truncated for c in completions])),
        "tools/calls": sum(c.tool_calls for c in completions),
        "tools/failures": sum(c.tool_failures for c in completions),
        **({} if update.entropy_coef is None else {"entropy_coef": update.entropy_coef}),
        "grad_norm": result.grad_norm,
        "tokens_per_sec/rollout": rollouts.stats.tokens_per_sec,
        "tokens_per_sec/train": result.stats.get("num_tokens", 0.0) / max(result.seconds, 1e-9),
        "time/rollout": rollouts.stats.seconds,
        "time/rollout_prefill": rollouts.stats.prefill_seconds,
        "time/update": result.seconds,
    }


# ----------------------------------------------------------------------------------------------
# Checkpoints of a run


def save_training_checkpoint(setup: StepSetup, state: TrainState, run_dir, write_model_files, keep_last: int = 0):
    """Checkpoint the run after state.step: every process takes part (RNG states, weight check), rank 0 writes."""
    processes = process_states(setup.world, setup.model)
    if not setup.world.is_main:
        return None
    write = write_model_files
    if setup.cfg.sync_ref_model:  # the moving reference is part of the run's state

        def write(folder):
            write_model_files(folder)
            mx.save_safetensors(str(Path(folder) / REFERENCE_FILE), dict(tree_flatten(setup.reference.parameters())))

    return save_checkpoint(run_dir, state.step, optimizer=setup.optimizer, config=config_to_dict(setup.cfg),
                           trainer_state={**state.to_dict(), **processes}, write_model_files=write,
                           keep_last=keep_last)


def load_training_checkpoint(setup: StepSetup, path) -> TrainState:
    """The policy's weights, the optimizer, the RNG states (each process its own) and the TrainState of a checkpoint.

    Nothing is written: a checkpoint that does not fit the run raises before the run folder changes.
    """
    model, path = setup.model, Path(path)
    if setup.adapters:
        load_adapter_weights(model, path)
    else:
        model.load_weights(str(path / "model.safetensors"))
    ensure_float32(model, adapters_only=setup.adapters)
    setup.optimizer.init(model.trainable_parameters())
    saved = load_checkpoint(path, optimizer=setup.optimizer)
    if setup.cfg.sync_ref_model:
        if not (path / REFERENCE_FILE).exists():
            raise CheckpointError(f"{path} has no {REFERENCE_FILE}: it was saved without sync_ref_model; resume "
                                  "with sync_ref_model = false or start a new run")
        setup.reference.load_weights(str(path / REFERENCE_FILE))
    restore_process_state(setup.world, saved, path)  # same world size; each process's own RNG state
    state = TrainState.from_dict(saved, source=str(path))
    if not setup.cfg.use_adaptive_entropy:  # TRL restores the controller only when it runs: a later one starts anew
        state.entropy_coef = state.last_world_entropy = None
    return state
