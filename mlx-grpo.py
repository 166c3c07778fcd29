"""MLX-GRPO: train a language model on GSM8K with Group Relative Policy Optimization.

    python mlx-grpo.py                                   # the offline demo (configs/demo.toml)
    python mlx-grpo.py --config configs/nanochat_d32.toml [--set key=value ...]
    python mlx-grpo.py --config X --eval-only            # score a model and exit
    python mlx-grpo.py --config X --resume [CHECKPOINT]  # continue a run exactly, with its saved config
    mlx.launch -n 2 python mlx-grpo.py --config X        # data-parallel (utils/training/distributed.py)

The story of a run, top to bottom: configuration, the policy and its copies, data and rewards,
evaluation before training, then per step (utils/training/step.py): rollouts -> rewards ->
advantages -> loss and update, with evaluation, logging and checkpoints along the way, and a
summary at the end.
"""

import argparse
import dataclasses
import errno
import random
import shlex
import sys
import time

try:
    from mlx_grpo import REPO_ROOT
except ModuleNotFoundError as missing:  # run from a checkout that was never installed
    if missing.name != "mlx_grpo":
        raise
    sys.exit("error: the package mlx_grpo is not installed in this Python: run pip install -e . in the checkout")

import mlx.core as mx
import numpy as np

from mlx_grpo.config import (
    ConfigError,
    GRPOConfig,
    add_config_arguments,
    check_resume_changes,
    config_changes,
    config_from_values,
    config_to_dict,
    config_warnings,
    load_resolved_config,
    read_config_values,
    resolve_for_model,
    save_resolved_config,
)
from mlx_grpo.cuda_kernels import KernelSwitchError
from mlx_grpo.cuda_kernels import enabled as cuda_kernels_enabled
from mlx_grpo.data.gsm8k import DataError, PromptSampler, build_messages, check_data_files, encode_prompt, load_gsm8k
from mlx_grpo.data.rewards import RewardError, compute_rewards, resolve_reward_functions
from mlx_grpo.data.task import PromptTask
from mlx_grpo.generation.calculator import CalculatorTool
from mlx_grpo.models import ModelLoadError, check_model_folder, load_model, save_model_folder
from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError
from mlx_grpo.nanochat.tokenizer import nanochat_tokenizer
from mlx_grpo.training.backend import (
    BACKEND_KEYS,
    current_backend,
    generation_options,
    resolve_for_backend,
    resolve_headroom,
    resolve_kv_buffers,
)
from mlx_grpo.training.checkpoint import CheckpointError, resume_point
from mlx_grpo.training.distributed import (
    DistributedError,
    broadcast_trainable,
    check_data_split,
    evaluate_sharded,
    init_world,
    quiet_unless_main,
    reduce_step_metrics,
)
from mlx_grpo.training.interrupt import stop_on_signals
from mlx_grpo.training.lora import add_adapters, eval_policy, save_adapters, trainable_summary
from mlx_grpo.training.memory import (
    MemoryPlanError,
    check_fits,
    memory_metrics,
    model_dims,
    plan_memory,
    read_model_config,
    record_peak,
    wired_limit,
)
from mlx_grpo.training.metrics import METRICS_FILE, MetricsLogger, check_loggers, format_console_line
from mlx_grpo.training.run_lock import RunLockError, lock_run_dir
from mlx_grpo.training.update import ensure_float32
from mlx_grpo.vlm import VlmError, check_vlm_config, is_vlm_source, require_mlx_vlm

# Errors caused by the user's input (config, data, model folder, rewards, checkpoints, settings, run folder,
# vision-language requests, a memory plan that does not fit).
USER_ERRORS = (ConfigError, DataError, ModelLoadError, NanochatCheckpointError, RewardError, CheckpointError,
               FileNotFoundError, DistributedError, KernelSwitchError, RunLockError, VlmError, MemoryPlanError)

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.toml"
DEMO_MODEL = "demo/model"  # configs/demo.toml's model, made by utils/demo/build.py


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GRPO training on GSM8K with MLX.")
    add_config_arguments(parser, default="configs/demo.toml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate model_name on the eval split and exit")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue a run with its saved config, from its newest checkpoint or from CHECKPOINT: "
                             "the run run_name, else the newest run in output_dir")
    parser.add_argument("--accept-changes", action="store_true",
                        help="with --resume: continue with the keys given now where they change the run's math")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan (peak of each phase, what this machine can use) and exit; "
                             "reads only config.json files")
    args = parser.parse_args(argv)
    if args.accept_changes and not args.resume:
        parser.error("--accept-changes goes with --resume")
    return args


# ----------------------------------------------------------------------------------------------
# The task: prompts, answers, rewards, and what counts as correct

class Task(PromptTask):
    """GSM8K in the chosen prompt format, tokenized once."""

    def __init__(self, cfg, tokenizer, split, limit=0):
        examples = load_gsm8k(cfg.dataset, cfg.dataset_config, cfg.dataset_path, split)
        messages = lambda e: build_messages(e.question, cfg.prompt_format, cfg.system_prompt)  # noqa: E731
        super().__init__(
            cfg, tokenizer, split, examples[:limit] if limit else examples,
            encode=lambda e: encode_prompt(tokenizer, messages(e)),
            question_answer=lambda e: (e.question, e.answer),
            check="gsm8k" if cfg.prompt_format == "nanochat" else "correctness")


def evaluate(cfg, world, model, task, calculator, update, plan=None):
    """Greedy accuracy (and pass@k) on the held-out questions, batched like rollouts."""
    mx.reset_peak_memory()
    policy = eval_policy(model, getattr(mx, cfg.compute_dtype), cfg.merge_adapters_for_decoding)  # freed after
    result = evaluate_sharded(world, policy, task.prompts, task.answers, decode=task.text, is_correct=task.is_correct,
                              stop_token_ids=task.stop_token_ids, max_new_tokens=cfg.eval_max_new_tokens,
                              calculator=calculator, pass_k=cfg.eval_pass_k, temperature=cfg.eval_temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, questions=task.questions, batch_size=cfg.eval_batch_size,
                              **generation_options(cfg))
    peaks = {}
    record_peak(peaks, "eval")
    print(f"[eval] update {update}: accuracy {result.accuracy:.2%} on {result.num_questions} questions"
          + "".join(f", pass@{k} {v:.2%}" for k, v in result.pass_at_k.items()))
    return {"eval/accuracy": result.accuracy, "eval/seconds": result.seconds,
            **{f"eval/pass@{k}": v for k, v in result.pass_at_k.items()}, **memory_metrics(plan, peaks)}


def evaluate_and_log(cfg, world, model, task, calculator, state, logger, plan=None):
    """evaluate() after state.update updates, kept in the run's eval history and metrics."""
    metrics = evaluate(cfg, world, model, task, calculator, state.update, plan)
    state.eval_history.append({"update": state.update, **metrics})
    logger.log(state.update, metrics)


def model_writer(cfg, model, tokenizer, adapter_config):
    """What a checkpoint holds of the policy: its adapters (LoRA/DoRA), else the whole model folder."""
    if adapter_config is not None:
        return lambda folder: save_adapters(folder, model, adapter_config)
    return lambda folder: save_model_folder(folder, model, tokenizer, cfg.model_name)


def resume_command(args, cfg):
    """The command line that continues this run from its newest checkpoint."""
    config = ["--config", args.config] if args.config else []
    return shlex.join(["python", "mlx-grpo.py", *config, "--set", f"output_dir={cfg.output_dir}",
                       "--set", f"run_name={cfg.run_name}", "--resume"])


# ----------------------------------------------------------------------------------------------

def user_errors():
    """USER_ERRORS, and the step's TrainingError once train() has imported the step."""
    step = sys.modules.get("mlx_grpo.training.step")
    return USER_ERRORS + ((step.TrainingError,) if step else ())


def main(argv=None):
    args = parse_args(argv)
    try:
        with wired_limit():  # Metal: the run's memory stays wired; the previous limit comes back after
            return train(args)
    except user_errors() as error:  # bad input: one line naming the problem, no traceback
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one (the first stops after the step)
        print("stopped by Ctrl-C, without saving: --resume continues from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except OSError as error:  # the disk, not the code: a full disk, a read-only or vanished folder
        if error.errno not in DISK_ERRNOS:
            raise
        sys.exit(f"error: {error.strerror}: {error.filename or 'a file of the run'}: free space or fix the "
                 f"folder's permissions, then --resume continues from the last checkpoint")


def plan_run(cfg, world, stop_if_too_large=True, vlm=False):
    """The backend's "auto" keys chosen (each printed once) and the memory plan printed, from config.json
    files only; stops (MemoryPlanError, one line) when the plan does not fit and memory_check is on.
    Vision-language models have no plan yet."""
    backend = current_backend()
    cfg, notes = resolve_for_backend(cfg, backend)
    config = None if vlm else read_model_config(cfg.model_name)
    plan_for = None
    if config is not None:
        dims = model_dims(config, cfg)
        plan_for = lambda c: plan_memory(dims, c, world.size)  # noqa: E731
    cfg, kv_notes = resolve_kv_buffers(cfg, plan_for)
    notes += kv_notes
    plan = plan_for(cfg) if plan_for is not None else None
    rollout_bytes = plan.phases["rollout"] - sum(plan.resident.values()) if plan else None
    cfg, more = resolve_headroom(cfg, backend, rollout_bytes)
    for line in notes + more:
        print(line)
    if plan is None:
        print(f"[memory] no plan: {cfg.model_name} is a vision-language model" if vlm else
              f"[memory] no plan: {cfg.model_name} has no config.json on this machine yet")
        return cfg, None
    for line in plan.lines():
        print(line)
    if stop_if_too_large and cfg.memory_check:
        check_fits(config, cfg, plan, world.size)
    elif not plan.fits:
        try:
            check_fits(config, cfg, plan, world.size)
        except MemoryPlanError as error:
            print(f"[memory] {error}")
    return cfg, plan


def train(args):
    # Data-parallel when started by mlx.launch (utils/training/distributed.py); a plain run is one process.
    world = init_world()
    quiet_unless_main(world)

    # The config: the keys given now (TOML < --set) on the defaults, or on the saved config of the
    # run that --resume continues (the run run_name, else the newest run in output_dir).
    given = read_config_values(args.config, args.set, default_path=DEFAULT_CONFIG)
    checkpoint, saved = None, None
    if args.resume:
        run_dir, checkpoint = resume_point(given.get("output_dir", GRPOConfig.output_dir), given.get("run_name", ""),
                                           None if args.resume == "latest" else args.resume)
        if not given.get("run_name"):
            print(f"[resume] no run_name given: continuing {run_dir}")
        given.update(output_dir=str(run_dir.parent), run_name=run_dir.name)  # where the run lives now
        saved = load_resolved_config(checkpoint)
    requested = config_from_values(given, base=saved)
    # What can be checked with nothing loaded is checked now, so bad input fails in a second: the data
    # files, the model folder, the memory plan (--plan prints it and exits), then the run folder, locked
    # while this run writes it (a default name is made unique here).
    vlm = is_vlm_source(requested.model_name)
    if vlm:  # a vision-language model: mlx-vlm, the settings it supports, image rows
        from mlx_grpo.vlm.data import check_image_data_files

        require_mlx_vlm()
        check_vlm_config(requested)
        check_image_data_files(requested, eval_only=args.eval_only)
    else:
        check_data_files(requested, eval_only=args.eval_only)
    check_model_folder(requested.model_name)
    check_loggers(requested.report_to)
    cuda_kernels_enabled()  # a bad MLX_GRPO_CUDA_KERNELS stops the run now, not at its first rollout
    requested, plan = plan_run(requested, world, stop_if_too_large=not args.plan, vlm=vlm)
    if saved is not None:  # a run saved before a backend key existed: the choice made now, not a change
        saved = dataclasses.replace(saved, **{key: getattr(requested, key) for key in BACKEND_KEYS
                                              if getattr(saved, key) is None})
    if args.plan:
        return plan
    if not args.eval_only and world.is_main:
        requested.run_name = lock_run_dir(requested.output_dir, requested.run_name,
                                          unique_name=not given.get("run_name"))
    if not checkpoint and not args.eval_only and (requested.run_dir / METRICS_FILE).exists():
        raise ConfigError(f"{requested.run_dir} already holds a run: pass --resume to continue it, "
                          "or choose another run_name")
    for warning in config_warnings(requested):  # what TRL warns about: it runs, but not as the paper does
        print(f"[config] warning: {warning}")
    # The step's machinery imports mlx-lm and transformers (seconds), so it loads after the checks.
    from mlx_grpo.training.step import (
        TrainState,
        build_step,
        every,
        grpo_updates,
        load_training_checkpoint,
        sample_rollouts,
        save_training_checkpoint,
        update_metrics,
    )

    seed = requested.seed + world.rank  # each process samples its own rollouts; the data order uses cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)

    # The policy: float32 master weights, with the tokenizer it was trained with. Its "auto" choices
    # (prompt format, calculator, rewards) are made once, here, into the config the run uses and saves.
    # LoRA/DoRA (utils/training/lora.py): float32 adapters on a frozen base in compute_dtype, quantized for QLoRA.
    model, tokenizer = load_model(requested.model_name)
    nano = nanochat_tokenizer(tokenizer)
    cfg = resolve_for_model(requested, nano is not None)
    changes = config_changes(saved, cfg) if saved else []  # a resume may change only the safe keys unasked
    check_resume_changes(changes, accept=args.accept_changes)
    make_task = Task
    if hasattr(model, "processor"):  # a vision-language model (utils/vlm/): image questions, its own prompts
        from mlx_grpo.vlm.data import VlmTask
        from mlx_grpo.vlm.training import prepare_vlm_policy

        prepare_vlm_policy(model, cfg)
        make_task = lambda cfg, tokenizer, split, limit=0: VlmTask(cfg, model, tokenizer, split, limit)  # noqa: E731
    adapter_config = add_adapters(model, cfg) if cfg.train_type != "full" else None
    ensure_float32(model, adapters_only=adapter_config is not None)
    calculator = CalculatorTool.for_tokenizer(nano) if cfg.use_calculator else None

    # Evaluation: greedy accuracy (and pass@k) on held-out questions.
    eval_task = make_task(cfg, tokenizer, cfg.eval_split, limit=cfg.eval_samples)
    if args.eval_only:
        return evaluate(cfg, world, model, eval_task, calculator, 0, plan)

    # The training data and the rewards.
    train_task = make_task(cfg, tokenizer, cfg.train_split, limit=cfg.max_train_samples)
    reward_fns = resolve_reward_functions(cfg.reward_funcs, cfg.reward_file)
    prompts_per_step = cfg.effective_prompts_per_step
    data = PromptSampler(len(train_task.prompts), seed=cfg.seed, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs)
    total_steps = data.num_steps(prompts_per_step)
    total_updates = total_steps * cfg.num_iterations
    check_data_split(world, data.size * data.num_epochs, prompts_per_step)
    broadcast_trainable(world, model)  # every process starts from rank 0's weights

    # The step's pieces (utils/training/step.py): the reference policy (beta > 0), AdamW with warmup
    # and decay sized on the real number of updates, the loss, the rollout sampler.
    setup = build_step(cfg, world, model, total_updates, train_task.stop_token_ids, calculator)
    state = TrainState(rollouts_quantized=cfg.quantize_for_rollouts)
    if checkpoint:  # weights, optimizer, RNG states and counters; nothing is written before they all fit
        state = load_training_checkpoint(setup, checkpoint)
        data.load_state_dict(state.data)
        changed = [change.record(state.update + 1) for change in changes]  # from the next update on
        state.config_changes += changed
        for change in changes:
            why = "a safe key" if change.safe else "accepted with --accept-changes"
            print(f"[resume] {change} from update {state.update + 1} ({why})")
        print(f"[resume] {checkpoint}: continuing after step {state.step} (update {state.update})")

    # The run folder: the resolved config, once; metrics from here on.
    run_dir = cfg.run_dir
    if world.is_main:  # rank 0 alone writes files
        save_resolved_config(cfg, run_dir)
    logger = MetricsLogger(run_dir, log_jsonl=cfg.log_jsonl, report_to=cfg.report_to, config=config_to_dict(cfg),
                           is_main=world.is_main)
    if checkpoint:
        logger.truncate_after(state.update)
        logger.log_config_changes(state.update + 1, changed)
    write_model_files = model_writer(cfg, model, tokenizer, adapter_config)
    print(f"[run] {run_dir}: {len(train_task.prompts)} train prompts, {total_steps} steps x "
          f"{prompts_per_step} prompts x {cfg.num_generations} samples = {total_updates} updates; "
          f"format {cfg.prompt_format}, calculator {'on' if calculator else 'off'}, loss {cfg.loss_type}, "
          f"rewards {', '.join(cfg.reward_funcs)}")
    if adapter_config is not None:
        print(f"[{cfg.train_type}] {trainable_summary(model)}")

    if state.step == 0:
        evaluate_and_log(cfg, world, model, eval_task, calculator, state, logger, plan)

    from tqdm import tqdm

    stop, stopping = stop_on_signals(), False  # Ctrl-C / SIGTERM: the step's updates finish, a checkpoint, exit 0
    progress = tqdm(total=total_updates, initial=state.update, desc="GRPO", unit="update", dynamic_ncols=True,
                    disable=not world.is_main)
    while state.step < total_steps:
        step_start = time.perf_counter()
        mx.reset_peak_memory()
        indices = world.shard(data.next_batch(prompts_per_step))  # this process's share of the step
        state.data = data.state_dict()
        prompts = [train_task.prompts[i] for i in indices]
        answers = [train_task.answers[i] for i in indices for _ in range(cfg.num_generations)]
        questions = [train_task.questions[i] for i in indices for _ in range(cfg.num_generations)]

        # 1. Rollouts: every prompt x num_generations in one batch, from the rollout copy of the
        #    policy, with the old-policy and reference log-probs the loss compares to.
        rollouts = sample_rollouts(setup, state, prompts)

        # 2. Rewards, then group-relative advantages and num_iterations updates on this batch.
        texts = [train_task.text(c) for c in rollouts.completions]
        rewards = compute_rewards(reward_fns, cfg.reward_weights, texts, questions, answers, errors=cfg.reward_errors)
        accuracy = float(np.mean([train_task.is_correct(t, a) for t, a in zip(texts, answers)]))
        updates = grpo_updates(setup, state, rollouts, rewards.total,
                               reward_parts=np.stack(list(rewards.per_function.values()), axis=1))

        # 3. Metrics of every update, sample completions, evaluation and checkpoints along the way.
        for update in updates:
            metrics = {"step": state.step, "epoch": data.epoch,
                       **update_metrics(cfg, rollouts, rewards, update, accuracy),
                       "time/step": time.perf_counter() - step_start,
                       "memory/peak_gb": max(rollouts.peaks.values()) / 1e9, **memory_metrics(plan, rollouts.peaks)}
            metrics = reduce_step_metrics(world, metrics, len(rollouts.completions))
            logger.log(update.update, metrics)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['train/accuracy']:.2f}",
                                 tok_s=f"{metrics['tokens_per_sec/rollout']:.0f}")
            if every(cfg.logging_steps, state.step):
                progress.write(format_console_line(update.update, metrics))
        if every(cfg.completions_log_steps, state.step):
            logger.log_completions(state.update, [
                {"prompt": questions[i], "completion": texts[i], "answer": answers[i],
                 "reward": float(rewards.total[i])} for i in range(min(cfg.completions_log_count, len(texts)))])
        if every(cfg.eval_steps, state.step) or state.step == total_steps:
            evaluate_and_log(cfg, world, model, eval_task, calculator, state, logger, plan)
        stopping = not world.all_true(not stop.requested)  # a signal to any process stops them all here
        if every(cfg.save_steps, state.step) or state.step == total_steps or stopping:
            save_training_checkpoint(setup, state, run_dir, write_model_files, keep_last=cfg.keep_last)
        if stopping:
            break
    stop.restore()
    progress.close()
    logger.close()
    if stopping and state.step < total_steps:
        print(f"[stopped] by {stop.requested or 'a signal to another process'} after step {state.step} "
              f"(update {state.update}), checkpoint saved; continue with: {resume_command(args, cfg)}")
        return state.eval_history

    before, after = state.eval_history[0]["eval/accuracy"], state.eval_history[-1]["eval/accuracy"]
    print(f"[done] {cfg.eval_split} accuracy {before:.2%} -> {after:.2%} on {len(eval_task.prompts)} questions; "
          f"run folder {run_dir}")
    if cfg.plot and world.is_main:
        from mlx_grpo.plot import plot_run

        for path in plot_run(run_dir):
            print(f"[plot] {path}")
    if cfg.model_name == DEMO_MODEL:
        print("[next] That was the demo model. Train a real nanochat: pip install -e \".[convert]\", then "
              "python convert_nanochat.py && python mlx-grpo.py --config configs/nanochat_d32.toml")
    return state.eval_history


if __name__ == "__main__":
    main()
