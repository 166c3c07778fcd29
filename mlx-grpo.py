"""MLX-GRPO: train a language model on GSM8K with Group Relative Policy Optimization.

    python mlx-grpo.py                                   # the offline demo (configs/demo.toml)
    python mlx-grpo.py --config configs/nanochat_d32.toml [--set key=value ...]
    python mlx-grpo.py --config X --eval-only            # score a model and exit
    python mlx-grpo.py --config X --resume [CHECKPOINT]  # continue a run exactly
    mlx.launch -n 2 python mlx-grpo.py --config X        # data-parallel (utils/training/distributed.py)

The story of a run, top to bottom: configuration, the policy and its copies, data and rewards,
evaluation before training, then per step: rollouts -> rewards -> advantages -> loss and update,
with evaluation, logging and checkpoints along the way, and a summary at the end.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_grpo import REPO_ROOT
from mlx_grpo.config import ConfigError, config_to_dict, load_config, save_resolved_config
from mlx_grpo.data.gsm8k import DataError, PromptSampler, build_messages, encode_prompt, load_gsm8k
from mlx_grpo.data.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    compute_rewards,
    default_reward_names,
    resolve_reward_functions,
)
from mlx_grpo.generation.calculator import CalculatorTool
from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.models import ModelLoadError, load_model, save_model_folder
from mlx_grpo.nanochat.tokenizer import nanochat_tokenizer
from mlx_grpo.training.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint, save_checkpoint
from mlx_grpo.training.distributed import (
    DistributedError,
    broadcast_trainable,
    check_data_split,
    evaluate_sharded,
    group_advantages_across,
    init_world,
    process_states,
    quiet_unless_main,
    reduce_step_metrics,
    restore_process_state,
)
from mlx_grpo.training.lora import (
    add_adapters,
    base_policy,
    load_adapter_weights,
    rollout_copy,
    save_adapters,
    trainable_summary,
)
from mlx_grpo.training.loss import finalize_stats, frac_reward_zero_std, group_reward_stats
from mlx_grpo.training.metrics import MetricsLogger, format_console_line
from mlx_grpo.training.update import (
    FusedAdamW,
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

# Errors caused by the user's input (config, data, model folder, rewards, checkpoints).
USER_ERRORS = (ConfigError, DataError, ModelLoadError, RewardError, CheckpointError, FileNotFoundError,
               DistributedError)

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.toml"
DEMO_MODEL = "demo/model"  # configs/demo.toml's model, made by utils/demo/build.py


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GRPO training on GSM8K with MLX.")
    parser.add_argument("--config", help="TOML config (default: $MLX_GRPO_CONFIG, else configs/demo.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable); wins over the TOML")
    parser.add_argument("--eval-only", action="store_true", help="evaluate model_name on the eval split and exit")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue from the newest checkpoint of the run, or from CHECKPOINT")
    return parser.parse_args(argv)


def resolve_config(args):
    path = args.config or os.environ.get("MLX_GRPO_CONFIG") or str(DEFAULT_CONFIG)
    return load_config(path, args.set)


# ----------------------------------------------------------------------------------------------
# The task: prompts, answers, rewards, and what counts as correct

class Task:
    """GSM8K in the chosen prompt format, tokenized once."""

    def __init__(self, cfg, tokenizer, split, limit=0):
        self.tokenizer = tokenizer
        examples = load_gsm8k(cfg.dataset, cfg.dataset_config, cfg.dataset_path, split)
        if limit:
            examples = examples[:limit]
        self.prompt_format = cfg.prompt_format
        prompts, kept, skipped = [], [], 0
        for example in examples:
            ids = encode_prompt(tokenizer, build_messages(example.question, self.prompt_format, cfg.system_prompt))
            if len(ids) > cfg.max_prompt_length:
                skipped += 1
                continue
            prompts.append(ids)
            kept.append(example)
        if skipped:
            print(f"[data] {split}: skipped {skipped} prompts longer than max_prompt_length={cfg.max_prompt_length}")
        if not kept:
            raise DataError(f"no {split} examples left (max_prompt_length={cfg.max_prompt_length}?)")
        self.examples, self.prompts = kept, prompts
        self.answers = [e.answer for e in kept]
        self.questions = [e.question for e in kept]
        check = "gsm8k" if self.prompt_format == "nanochat" else "correctness"
        self._check = BUILTIN_REWARDS[check]

    def is_correct(self, text, answer):
        return self._check([text], answer=[answer])[0] > 0


def completion_text(tokenizer, completion, stop_token_ids):
    tokens = completion.tokens[:-1] if completion.stopped and completion.tokens[-1] in stop_token_ids else completion.tokens
    return tokenizer.decode(tokens)


def resolve_prompt_format(cfg, nano):
    """Fill the 'auto' choices from the model: nanochat's own format and calculator, or XML."""
    cfg.prompt_format = cfg.resolved_prompt_format(nano is not None)
    cfg.use_calculator = cfg.calculator_enabled(nano is not None)
    if cfg.use_calculator and nano is None:
        raise ConfigError("use_calculator needs a nanochat model (its tokenizer has the python/output tokens); "
                          "set use_calculator = false")
    if not cfg.reward_funcs:
        cfg.reward_funcs = default_reward_names(cfg.prompt_format)


def peak_memory_gb():
    return mx.get_peak_memory() / 1e9


def step_metrics(cfg, task, completions, texts, answers, rewards, update_result, rollout_stats):
    """Everything logged for one update (names follow TRL's where one exists)."""
    _, group_stds = group_reward_stats(mx.array(rewards.total, dtype=mx.float32), cfg.num_generations)
    lengths = [len(c.tokens) for c in completions]
    trained_tokens = update_result.stats.get("num_tokens", 0.0)
    return {
        "loss": update_result.loss,
        "reward": float(rewards.total.mean()),
        "reward_std": float(group_stds.mean()),
        **{f"rewards/{name}/mean": float(values.mean()) for name, values in rewards.per_function.items()},
        "reward_failures": int(sum(rewards.failures.values())),
        "frac_reward_zero_std": frac_reward_zero_std(group_stds),
        "train/accuracy": float(np.mean([task.is_correct(t, a) for t, a in zip(texts, answers)])),
        **finalize_stats(update_result.stats),
        "completions/mean_length": float(np.mean(lengths)),
        "completions/min_length": int(min(lengths)),
        "completions/max_length": int(max(lengths)),
        "completions/clipped_ratio": float(np.mean([c.truncated for c in completions])),
        "tools/calls": sum(c.tool_calls for c in completions),
        "tools/failures": sum(c.tool_failures for c in completions),
        "grad_norm": update_result.grad_norm,
        "tokens_per_sec/rollout": rollout_stats.tokens_per_sec,
        "tokens_per_sec/train": trained_tokens / max(update_result.seconds, 1e-9),
        "time/rollout": rollout_stats.seconds,
        "time/rollout_prefill": rollout_stats.prefill_seconds,
        "time/update": update_result.seconds,
    }


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as error:
        sys.exit(f"config error: {error}")

    # Data-parallel when started by mlx.launch (utils/training/distributed.py); a plain run is one process.
    world = init_world()
    quiet_unless_main(world)
    seed = cfg.seed + world.rank  # each process samples its own rollouts; the data order uses cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)

    # The policy: float32 master weights, with the tokenizer it was trained with. LoRA/DoRA
    # (utils/training/lora.py): float32 adapters on a frozen base in compute_dtype, quantized for QLoRA.
    model, tokenizer = load_model(cfg.model_name)
    nano = nanochat_tokenizer(tokenizer)
    resolve_prompt_format(cfg, nano)
    adapters = add_adapters(model, cfg) if cfg.train_type != "full" else None
    ensure_float32(model, adapters_only=adapters is not None)
    compute_dtype = getattr(mx, cfg.compute_dtype)
    stop_ids = set(tokenizer.eos_token_ids)
    calculator = CalculatorTool.for_tokenizer(nano) if cfg.use_calculator else None
    decode = lambda completion: completion_text(tokenizer, completion, stop_ids)

    # Evaluation: greedy accuracy (and pass@k) on held-out questions, batched like rollouts.
    eval_task = Task(cfg, tokenizer, cfg.eval_split, limit=cfg.eval_samples)

    def run_eval(update):
        result = evaluate_sharded(world, model, eval_task.prompts, eval_task.answers, decode=decode,
                                  is_correct=eval_task.is_correct, stop_token_ids=stop_ids,
                                  max_new_tokens=cfg.eval_max_new_tokens, calculator=calculator,
                                  pass_k=cfg.eval_pass_k, temperature=cfg.eval_temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, questions=eval_task.questions)
        metrics = {"eval/accuracy": result.accuracy, "eval/seconds": result.seconds,
                   **{f"eval/pass@{k}": v for k, v in result.pass_at_k.items()}}
        print(f"[eval] update {update}: accuracy {result.accuracy:.2%} on {result.num_questions} questions"
              + "".join(f", pass@{k} {v:.2%}" for k, v in result.pass_at_k.items()))
        return metrics

    if args.eval_only:
        return run_eval(0)

    # The run folder, the training data, the rewards.
    run_dir = Path(cfg.output_dir) / cfg.resolved_run_name
    if (run_dir / "metrics.jsonl").exists() and not args.resume:
        sys.exit(f"{run_dir} already holds a run: pass --resume to continue it, or choose another run_name")
    if world.is_main:  # rank 0 alone writes files
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run_dir)
    train_task = Task(cfg, tokenizer, cfg.train_split, limit=cfg.max_train_samples)
    reward_fns = resolve_reward_functions(cfg.reward_funcs, cfg.reward_file)
    prompts_per_step = cfg.effective_prompts_per_step
    data = PromptSampler(len(train_task.prompts), seed=cfg.seed, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs)
    total_steps = data.num_steps(prompts_per_step)
    total_updates = total_steps * cfg.num_iterations
    check_data_split(world, data.size * data.num_epochs, prompts_per_step)
    broadcast_trainable(world, model)  # every process starts from rank 0's weights

    # The reference policy exists only with a KL term; it is the starting weights (quantized if asked).
    # With adapters it is the base itself: the policy with its adapters switched off, no copy.
    reference = None
    if cfg.beta > 0 and adapters is not None:
        reference = base_policy(model)
    elif cfg.beta > 0:
        reference = frozen_copy(model, cfg.rollout_quant_bits if cfg.quantize_for_rollouts else None,
                                cfg.rollout_quant_group_size, dtype=compute_dtype)
    rollouts_quantized = cfg.quantize_for_rollouts

    # The optimizer: AdamW with warmup and decay sized on the real number of updates.
    schedule = make_lr_schedule(cfg.learning_rate, total_updates, cfg.warmup_ratio, cfg.lr_scheduler_type)
    optimizer = FusedAdamW(learning_rate=schedule, betas=[cfg.adam_beta1, cfg.adam_beta2],
                           weight_decay=cfg.weight_decay)
    loss_and_grad = make_loss_and_grad(
        model, temperature=cfg.temperature, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
        epsilon_high=cfg.effective_epsilon_high, beta=cfg.beta,
        importance_sampling_level=cfg.importance_sampling_level, max_completion_length=cfg.generation_limit,
        compute_dtype=compute_dtype, use_compile=cfg.use_compile)
    rollout_sampler = make_rollout_sampler(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p)
    logger = MetricsLogger(run_dir, log_jsonl=cfg.log_jsonl, report_to=cfg.report_to, config=config_to_dict(cfg),
                           is_main=world.is_main)

    step, update, nan_streak, nan_events, eval_history = 0, 0, 0, 0, []
    if args.resume:
        path = find_latest_checkpoint(run_dir) if args.resume == "latest" else Path(args.resume)
        if path is None:
            sys.exit(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; start without --resume")
        if adapters is not None:
            load_adapter_weights(model, path)
        else:
            model.load_weights(str(path / "model.safetensors"))
        ensure_float32(model, adapters_only=adapters is not None)
        optimizer.init(model.trainable_parameters())
        state = load_checkpoint(path, optimizer=optimizer)
        restore_process_state(world, state, path)  # same world size; each process's own RNG state
        step, update = state["step"], state["update"]
        nan_streak, nan_events = state["nan_streak"], state["nan_events"]
        rollouts_quantized = state["rollouts_quantized"]
        data.load_state_dict(state["data"])
        eval_history = state["eval_history"]
        logger.truncate_after(update)
        print(f"[resume] {path}: continuing after step {step} (update {update})")

    print(f"[run] {run_dir}: {len(train_task.prompts)} train prompts, {total_steps} steps x "
          f"{prompts_per_step} prompts x {cfg.num_generations} samples = {total_updates} updates; "
          f"format {cfg.prompt_format}, calculator {'on' if calculator else 'off'}, loss {cfg.loss_type}, "
          f"rewards {', '.join(cfg.reward_funcs)}")
    if adapters is not None:
        print(f"[{cfg.train_type}] {trainable_summary(model)}")

    def evaluate_and_log(update):
        metrics = run_eval(update)
        eval_history.append({"update": update, **metrics})
        logger.log(update, metrics)

    def save(step):
        processes = process_states(world, model)  # every process takes part; rank 0 alone writes
        if not world.is_main:
            return
        save_checkpoint(
            run_dir, step, model=model, optimizer=optimizer, config=config_to_dict(cfg), keep_last=cfg.keep_last,
            trainer_state={"step": step, "update": update, "nan_streak": nan_streak, "nan_events": nan_events,
                           "rollouts_quantized": rollouts_quantized, "data": data.state_dict(),
                           "eval_history": eval_history, **processes},
            write_model_files=(lambda folder: save_adapters(folder, model, adapters)) if adapters is not None
            else (lambda folder: save_model_folder(folder, model, tokenizer, cfg.model_name)))

    if step == 0:
        evaluate_and_log(0)

    from tqdm import tqdm

    progress = tqdm(total=total_updates, initial=update, desc="GRPO", unit="update", dynamic_ncols=True,
                    disable=not world.is_main)
    while step < total_steps:
        step_start = time.perf_counter()
        mx.reset_peak_memory()
        indices = world.shard(data.next_batch(prompts_per_step))  # this process's share of the step
        prompts = [train_task.prompts[i] for i in indices]
        answers = [train_task.answers[i] for i in indices for _ in range(cfg.num_generations)]
        questions = [train_task.questions[i] for i in indices for _ in range(cfg.num_generations)]

        # 1. Rollouts: every prompt x num_generations in one batch, from a quantized or compute_dtype
        #    copy of the float32 policy (decode is memory-bound: fewer bytes are faster), or the policy.
        while True:
            if rollouts_quantized or (compute_dtype != mx.float32 and adapters is None):  # a LoRA base is in compute_dtype already
                rollout_policy = rollout_copy(model, cfg.rollout_quant_bits if rollouts_quantized else None,
                                              cfg.rollout_quant_group_size, compute_dtype)
            else:
                rollout_policy = model
            completions, rollout_stats = generate_completions(
                rollout_policy, prompts, group_size=cfg.num_generations, max_new_tokens=cfg.generation_limit,
                sampler=rollout_sampler, stop_token_ids=stop_ids, calculator=calculator)
            slices, batches = pack_micro_batches(prompts, completions, cfg.effective_micro_batch_size,
                                                 cfg.mask_truncated_completions, pad_multiple=cfg.pad_to_multiple_of)
            # 2. Old-policy log-probs: the policy that sampled (a quantized copy), or the policy
            #    before this step's first update when it is reused num_iterations times.
            old_logp = None
            if rollouts_quantized:
                old_logp = frozen_logprobs(rollout_policy, batches, cfg.temperature)
                if not world.all_true(masked_all_finite(old_logp, batches)):  # all processes redo it
                    print("[nan] the quantized rollout copy gave non-finite log-probs: rollouts switch to "
                          "full precision for the rest of the run; redoing the step")
                    rollouts_quantized, nan_events = False, nan_events + 1
                    continue
            elif cfg.num_iterations > 1:
                old_logp = frozen_logprobs(model, batches, cfg.temperature)
            break
        del rollout_policy
        ref_logp = frozen_logprobs(reference, batches, cfg.temperature) if reference is not None else None
        if ref_logp is not None and not masked_all_finite(ref_logp, batches):
            sys.exit("the quantized reference model gave non-finite log-probs; set quantize_for_rollouts = false")

        # 3. Rewards and group-relative advantages.
        texts = [decode(c) for c in completions]
        rewards = compute_rewards(reward_fns, cfg.reward_weights, texts, questions, answers, errors=cfg.reward_errors)
        advantages = group_advantages_across(world, mx.array(rewards.total, dtype=mx.float32),
                                             cfg.num_generations, cfg.scale_rewards)
        # Loss normalizers of the whole (global) batch, so the processes' gradients add up to its gradient.
        normalizers = world.sum_values(loss_normalizers(completions, batches))

        # 4. num_iterations optimizer steps on this generation batch.
        for _ in range(cfg.num_iterations):
            lr = float(schedule(optimizer.step))
            model.train()  # only the loss forward runs in train mode (LoRA dropout)
            result = policy_update(model, optimizer, loss_and_grad, batches, slices, advantages, old_logp,
                                   ref_logp, normalizers, cfg.max_grad_norm, all_sum=world.sum_tree)
            model.eval()
            update += 1
            if result.applied:
                nan_streak = 0
            else:
                nan_streak, nan_events = nan_streak + 1, nan_events + 1
                progress.write(f"[nan] non-finite loss or gradients at update {update}: skipped "
                               f"({nan_streak} in a row; the run stops at max_nan_steps={cfg.max_nan_steps})")
                if nan_streak >= cfg.max_nan_steps:
                    sys.exit(f"stopping: {nan_streak} updates in a row had non-finite loss or gradients; "
                             "lower learning_rate or use compute_dtype = \"float32\"")
            metrics = {"step": step + 1, "epoch": data.epoch, "lr": lr, "nan_events": nan_events,
                       **step_metrics(cfg, train_task, completions, texts, answers, rewards, result, rollout_stats),
                       "time/step": time.perf_counter() - step_start, "memory/peak_gb": peak_memory_gb()}
            metrics = reduce_step_metrics(world, metrics, len(completions))
            logger.log(update, metrics)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['train/accuracy']:.2f}",
                                 tok_s=f"{metrics['tokens_per_sec/rollout']:.0f}")
            if cfg.logging_steps and update % cfg.logging_steps == 0:
                progress.write(format_console_line(update, metrics))
        step += 1

        # 5. Sample completions, evaluation and checkpoints along the way.
        if cfg.completions_log_steps and step % cfg.completions_log_steps == 0:
            logger.log_completions(update, [
                {"prompt": questions[i], "completion": texts[i], "answer": answers[i],
                 "reward": float(rewards.total[i])} for i in range(min(cfg.completions_log_count, len(texts)))])
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps:
            evaluate_and_log(update)
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps:
            save(step)
    progress.close()
    logger.close()

    before, after = eval_history[0]["eval/accuracy"], eval_history[-1]["eval/accuracy"]
    print(f"[done] {cfg.eval_split} accuracy {before:.2%} -> {after:.2%} on {len(eval_task.prompts)} questions; "
          f"run folder {run_dir}")
    if cfg.plot and world.is_main:
        from mlx_grpo.plot import plot_run

        for path in plot_run(run_dir):
            print(f"[plot] {path}")
    if cfg.model_name == DEMO_MODEL:
        print("[next] That was the demo model. Train a real nanochat: pip install -e \".[convert]\", then "
              "python convert_nanochat.py && python mlx-grpo.py --config configs/nanochat_d32.toml")
    return eval_history


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:  # bad input: one line naming the problem, no traceback
        sys.exit(f"error: {error}")
