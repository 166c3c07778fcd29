"""One full GRPO step of the trainer's own code on a random-weight nanochat model, timed by phase.

    python bench/grpo_step.py --depth 20 --compile --micro-batch-size 64   # nanochat's RL shape, as the trainer runs it
    python bench/grpo_step.py --depth 32 --micro-batch-size 8  # d32 at the same shape
    python bench/grpo_step.py --depth 4 --prompts 2 --group 4 --new-tokens 16   # a CPU smoke run
    python bench/grpo_step.py --family nanochat_2026 --depth 24 --window-pattern SSSL --compile --micro-batch-size 64
    python bench/grpo_step.py --depth 20 --compare --compile --micro-batch-size 64   # every rollout path side by side
    python bench/grpo_step.py --depth 20 --compile --micro-batch-size 64 --no-share-prompts  # prompt once per row
    python bench/grpo_step.py --family qwen3 --rollout-paths   # Qwen3-0.6B's shape: the three rollout paths
    python bench/grpo_step.py --family llama --compile --micro-batch-size 64   # the whole step on Llama-3.2-1B's shape
    mlx.launch -n 8 --backend nccl python bench/grpo_step.py --depth 20 --prompts 128   # data-parallel, 8 GPUs

The step is the trainer's (utils/training/step.py: the rollout copy, the old-policy and reference
log-probs, advantages, the global loss normalizers, num_iterations updates), on random prompts and
rewards. Under mlx.launch each process takes its share of the step's prompts and the gradients are
summed, as in the trainer (--prompts is the global batch). Reports rollout and training tokens/s
(summed over processes), model TFLOP/s, step seconds split into rollout / old policy / reference /
update, peak memory, and rollout speed against the memory-bandwidth bound (weights and KV cache read
once per decode step). Sampling never stops early: no stop tokens are given.

--family picks the architecture (bench/model_families.py's BUILDERS: random weights of nanochat's shape
for --depth, or of Qwen3-0.6B's / Llama-3.2-1B's config); --compare runs the rollout paths one after another in this process (PATHS: the
fast decoder with and without the CUDA kernels, mlx-lm's model call, LoRA) and prints them side by side.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import mlx.core as mx
import model_families as families
import numpy as np

import mlx_grpo.cuda_kernels as cuda_kernels
from mlx_grpo.config import GRPOConfig, validate
from mlx_grpo.nanochat import eras
from mlx_grpo.training.distributed import broadcast_trainable, init_world, quiet_unless_main, weights_digest
from mlx_grpo.training.lora import add_adapters
from mlx_grpo.training.step import TrainState, build_step, grpo_updates, sample_rollouts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="nanochat", choices=list(families.BUILDERS),
                   help="nanochat / nanochat_2026 (--depth), or random weights in Qwen3-0.6B's (qwen3) or "
                   "Llama-3.2-1B's (llama) shape")
    p.add_argument("--depth", type=int, default=None, help="nanochat depth: width 64*depth, heads depth/2 "
                   "(default 20); qwen3/llama: the number of layers (default the config's)")
    p.add_argument("--vocab", type=int, help=f"vocabulary size (default nanochat's: {families.VOCAB}, "
                   f"2026: {families.VOCAB_2026}; qwen3/llama: the config's)")
    p.add_argument("--model-args", type=json.loads, default=None,
                   help="qwen3/llama: ModelArgs overrides as JSON, e.g. a tiny shape for a CPU smoke run")
    p.add_argument("--rollout-paths", action="store_true", help="time rollouts only, side by side: our fast decoder, "
                   "mlx-lm's model call, mlx-lm's BatchGenerator (bench/model_families.py)")
    p.add_argument("--window-pattern", default=eras.DEFAULT_WINDOW_PATTERN,
                   help="nanochat_2026: S/L per layer, tiled (S = sequence_len / 4 rounded up to 128, "
                   "L = sequence_len)")
    p.add_argument("--sequence-len", type=int, default=2048, help="nanochat_2026: the training length the windows "
                   "come from (nanochat's 2048; 512 makes S = 128 bind at the default shape)")
    p.add_argument("--compare", action="store_true",
                   help="run every rollout path (PATHS) in this process, side by side")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (under mlx.launch: of all processes)")
    p.add_argument("--group", type=int, default=16, help="samples per prompt (num_generations)")
    p.add_argument("--prompt-len", type=int, default=100, help="mean prompt length (varied +-20%%)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--micro-batch-size", type=int, default=16, help="completions per forward/backward")
    p.add_argument("--pad-multiple", type=int, default=64, help="row widths rounded up to this (pad_to_multiple_of)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 runs a reference model)")
    p.add_argument("--num-iterations", type=int, default=1, help="> 1 takes old-policy log-probs")
    p.add_argument("--quant-bits", type=int, default=0, help="rollouts from a quantized copy (0 = off)")
    p.add_argument("--is-mode", default="token_truncate", help="quantized rollouts: vllm_importance_sampling_mode, "
                   "or 'off' (no correction: the quantized copy's log-probs are the old policy)")
    p.add_argument("--compile", action="store_true", help="compile the loss and gradient")
    p.add_argument("--no-share-prompts", action="store_true",
                   help="the update runs each prompt once per completion (share_prompt_forward = false)")
    p.add_argument("--mlx-lm-decode", action="store_true", help="rollouts through mlx-lm's model call, not the fast decoder")
    p.add_argument("--no-cuda-kernels", action="store_true", help="all three custom CUDA kernels off (decode attention, sampling, log-probs)")
    p.add_argument("--alternate-buffers", type=int, nargs="?", const=2, default=None, metavar="N",
                   help="the portable decode path with N KV buffers per layer written in turn (the decoders' "
                   "alternate_buffers, the trainer's rollout_kv_buffers; default: the decoders' 2; 1: one buffer, "
                   "which a decode step copies whole while the step before still runs)")
    p.add_argument("--train-type", default="full", choices=["full", "lora", "dora"], help="adapters on a frozen base")
    p.add_argument("--base-quant-bits", type=int, default=0, help="QLoRA: quantize the frozen base (0 = no)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="muon: nanochat's MuonAdamW at chat_rl.py's rates (learning_rate 0.05)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--bandwidth-tbs", type=float, default=3.35, help="memory bandwidth for the bound (H100: 3.35)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        args.window_pattern = eras.check_window_pattern(args.window_pattern, "--window-pattern")
    except eras.NanochatCheckpointError as e:
        p.error(str(e))
    if args.family in families.NANOCHAT_FAMILIES:
        args.depth = args.depth or 20
        args.vocab = args.vocab or (families.VOCAB_2026 if args.family == "nanochat_2026" else families.VOCAB)
        if args.model_args is not None:
            p.error("--model-args is for --family qwen3 or llama; nanochat's shape is --depth")
    return args


# The rollout paths --compare runs, as flag settings on top of the command line's.
PATHS = {
    "fast decoder + CUDA kernels": {},
    "fast decoder, --no-cuda-kernels": {"no_cuda_kernels": True},
    "fast decoder, --no-cuda-kernels --alternate-buffers 1": {"no_cuda_kernels": True, "alternate_buffers": 1},
    "mlx-lm model call": {"mlx_lm_decode": True},
    "LoRA (fast decoder on the merged copy)": {"train_type": "lora"},
}


def step_config(args) -> GRPOConfig:
    """The trainer's config for these flags (constant learning rate 1e-6, clipping at 1, loss dapo)."""
    return validate(GRPOConfig(
        run_name="bench", learning_rate=1e-6, lr_scheduler_type="constant", warmup_ratio=0.0, max_grad_norm=1.0,
        prompts_per_step=args.prompts, num_generations=args.group, max_new_tokens=args.new_tokens,
        max_completion_length=args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=args.top_k,
        micro_batch_size=args.micro_batch_size, pad_to_multiple_of=args.pad_multiple, compute_dtype=args.compute_dtype,
        beta=args.beta, num_iterations=args.num_iterations, quantize_for_rollouts=args.quant_bits > 0,
        rollout_quant_bits=args.quant_bits or 4, use_compile=args.compile, train_type=args.train_type,
        base_quant_bits=args.base_quant_bits, loss_type="dapo", epsilon=0.2,
        share_prompt_forward=not args.no_share_prompts,
        vllm_importance_sampling_correction=args.is_mode != "off",
        vllm_importance_sampling_mode="token_truncate" if args.is_mode == "off" else args.is_mode))


def main(argv=None):
    args = parse_args(argv)
    world = init_world()
    quiet_unless_main(world)
    if not args.compare:
        return run(args, world)
    table = {}
    for name, settings in PATHS.items():
        print(f"[path] {name}", flush=True)
        table[name] = run(argparse.Namespace(**{**vars(args), **settings, "json": None}), world)
        cuda_kernels.set_enabled(True)
    print(f"[compare] {args.family} {args.depth or 'default'} layers, {args.prompts}x{args.group}x{args.new_tokens}, "
          f"top_k {args.top_k}, {mx.default_device()}")
    print(f"{'path':<54} {'rollout tok/s':>14} {'of bound':>9} {'rollout s':>10} {'step s':>8}")
    for name, summary in table.items():
        print(f"{name:<54} {summary['rollout_tok_s']:>14,.0f} {summary['rollout_vs_bandwidth_bound']:>9.1%} "
              f"{summary['rollout_s']:>10.3f} {summary['step_s']:>8.3f}")
    if args.json and world.is_main:
        Path(args.json).write_text(json.dumps({"compare": table}, indent=2))
    return table


def run(args, world):
    """One configuration: a warm-up step and args.steps timed steps; the mean of the timed ones."""
    cfg = step_config(args)
    if args.optimizer == "muon":
        cfg = validate(dataclasses.replace(cfg, optimizer="muon", learning_rate=0.05))
    mx.random.seed(0)
    rng = np.random.default_rng(0)  # the prompts: the same global batch on every process
    reward_rng = np.random.default_rng(1 + world.rank)
    if args.no_cuda_kernels:
        cuda_kernels.set_enabled(False)
    if args.alternate_buffers is not None:
        cfg = validate(dataclasses.replace(cfg, rollout_kv_buffers=args.alternate_buffers))
    model = families.BUILDERS[args.family](args)
    if args.rollout_paths:
        return families.compare_rollout_paths(args, model, rng)
    params, decode_shape = families.count_params(model), families.decode_shape(model)
    read_params = decode_shape[0]
    layers, width, vocab = len(model.layers), model.args.hidden_size, model.args.vocab_size
    if cfg.train_type != "full":  # the trainer's LoRA: float32 adapters on a frozen compute_dtype (or quantized) base
        add_adapters(model, cfg)
    broadcast_trainable(world, model)
    mx.random.seed(world.rank)  # each process samples its own rollouts
    setup = build_step(cfg, world, model, total_updates=(args.steps + 1) * cfg.num_iterations, stop_token_ids=set(),
                       fast_decode=not args.mlx_lm_decode)
    state = TrainState(rollouts_quantized=cfg.quantize_for_rollouts)

    results = []
    for step in range(args.steps + 1):
        prompt_lens = rng.integers(int(args.prompt_len * 0.8), int(args.prompt_len * 1.2) + 1, size=args.prompts)
        prompts = world.shard([rng.integers(0, vocab - 9, size=n).tolist() for n in prompt_lens])
        mx.synchronize()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        rollouts = sample_rollouts(setup, state, prompts)
        t1 = time.perf_counter()
        grpo_updates(setup, state, rollouts, reward_rng.random(len(rollouts.completions)))
        mx.synchronize()
        t2 = time.perf_counter()
        # The step records each phase's peak (and resets MLX's counter after each): rollouts.peaks
        rollout_peak = max(v for phase, v in rollouts.peaks.items() if phase != "update")
        update_peak = rollouts.peaks["update"]

        # Model FLOPs count the real tokens of each row (prompt + completion), not the padding.
        totals = world.sum_values({
            "generated": rollouts.stats.generated_tokens,
            "trained": sum(len(prompts[c.prompt_index]) + len(c.tokens) - 1 for c in rollouts.completions)
            * args.num_iterations})
        seq_len = args.prompt_len + args.new_tokens
        flops_per_token = 6 * read_params + 12 * layers * width * seq_len  # nanochat's estimate
        bound = families.decode_bound_seconds(decode_shape, len(prompts) * args.group, [len(p) for p in prompts],
                                              args.new_tokens, 2 if not args.quant_bits else args.quant_bits / 8,
                                              args.bandwidth_tbs)
        phases = rollouts.seconds  # rollout (copy, generation, packing), old policy, reference
        rollout_s, train_s = phases["rollout"], t2 - t1
        row = {
            "step": step, "family": args.family, "depth": layers, "params": params, "processes": world.size,
            "share_prompts": setup.share_prompts,
            "shape": f"{args.prompts}x{args.group}x{args.new_tokens}",
            "step_s": t2 - t0, "rollout_s": rollout_s, "prefill_s": rollouts.stats.prefill_seconds,
            "generate_s": rollouts.stats.seconds,
            "generate_tok_s": totals["generated"] / rollouts.stats.seconds,
            "old_policy_s": phases["old_policy"], "reference_s": phases["reference"], "update_s": train_s,
            "rollout_tok_s": totals["generated"] / rollout_s,
            "rollout_vs_bandwidth_bound": bound / rollout_s,
            "train_tok_s": totals["trained"] / train_s,
            "train_tflops": flops_per_token * totals["trained"] / train_s / 1e12,
            "train_frac_of_peak": flops_per_token * totals["trained"] / train_s / 1e12 / args.peak_tflops / world.size,
            "peak_memory_gb": max(rollout_peak, update_peak) / 1e9,
            "rollout_ref_peak_gb": rollout_peak / 1e9, "update_peak_gb": update_peak / 1e9,
        }
        label = "warm-up" if step == 0 else f"step {step}"
        print(f"[{label}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        if step > 0:
            results.append(row)

    summary = {k: float(np.mean([r[k] for r in results])) for k in results[0] if isinstance(results[0][k], float)}
    digests = world.gather_json(weights_digest(model))  # the data-parallel step keeps every process's weights equal
    summary.update({"device": str(mx.default_device()), "mlx": mx.__version__, "processes": world.size,
                    "identical_weights": len(set(digests)) == 1, "args": vars(args)})
    print("[mean] " + json.dumps(summary))
    if args.json and world.is_main:
        Path(args.json).write_text(json.dumps({"summary": summary, "steps": results}, indent=2))
    return summary


if __name__ == "__main__":
    main()
