"""Where the GRPO update's time goes: the micro-batches' loss and gradient vs. the optimizer step.

    python bench/update_parts.py --depth 20                      # nanochat's RL shape, micro-batch 64
    python bench/update_parts.py --depth 4 --prompts 2 --group 4 --new-tokens 16 --micro-batch-size 4 --steps 1

Rollouts are not run: each step packs random prompts (80-120% of --prompt-len) and random
completions of --new-tokens, as a random-weight model would sample them. For each --pad-multiple
it times `policy_update` whole (fresh prompt lengths each step, so row widths change as in
training), then the same update phase by phase with a host sync between phases.
"""

import argparse
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from model_families import VOCAB, build_model, count_params
from mlx.utils import tree_map

from mlx_grpo import cuda_kernels
from mlx_grpo.generation.engine import Completion
from mlx_grpo.training.loss import group_advantages
from mlx_grpo.training.update import (
    FusedAdamW,
    add_grads,
    all_finite,
    clip_by_norm,
    eval_update_in_chunks,
    global_norm,
    loss_normalizers,
    make_loss_and_grad,
    pack_micro_batches,
    policy_update,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--pad-multiple", type=int, nargs="+", default=[1, 64], help="row-width multiples to compare")
    p.add_argument("--steps", type=int, default=3, help="timed updates per setting (after one warm-up)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--fused", action="store_true", help="time the whole updates with FusedAdamW")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--no-cuda-kernels", action="store_true",
                   help="MLX ops instead of the custom CUDA kernels (all three; as MLX_GRPO_CUDA_KERNELS=0)")
    return p.parse_args(argv)


def random_batches(args, rng, pad_multiple):
    lens = rng.integers(int(args.prompt_len * 0.8), int(args.prompt_len * 1.2) + 1, size=args.prompts)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in lens]
    completions = []
    for i in range(args.prompts * args.group):
        tokens = rng.integers(0, VOCAB, size=args.new_tokens).tolist()
        completions.append(Completion(prompt_index=i // args.group, tokens=tokens, sampled=[1] * len(tokens)))
    slices, batches = pack_micro_batches(prompts, completions, args.micro_batch_size, pad_multiple=pad_multiple)
    real_tokens = sum(len(prompts[c.prompt_index]) + len(c.tokens) - 1 for c in completions)
    return slices, batches, real_tokens, loss_normalizers(completions, batches)


def plain_add_grads(accumulated, grads):
    """add_grads before it was compiled: a cast and an add per weight."""
    if accumulated is None:
        return tree_map(lambda g: g.astype(mx.float32), grads)
    return tree_map(lambda a, g: a + g.astype(mx.float32), accumulated, grads)


def phased_update(model, optimizer, loss_and_grad, batches, slices, advantages, norms, add_grads=add_grads):
    """policy_update's phases, synchronised one by one; returns seconds per phase."""
    times = {}

    def mark(name, start):
        mx.synchronize()
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - start
        return now

    norm_args = [mx.array(norms[k], dtype=mx.float32)
                 for k in ("num_sequences_total", "num_tokens_total", "num_micro_batches")]
    t = time.perf_counter()
    grads = None
    with loss_and_grad.compute_weights():
        t = mark("cast_weights", t)
        for rows, batch in zip(slices, batches):
            (loss, stats), mb_grads = loss_and_grad(batch.inputs, batch.targets, batch.mask, advantages[rows],
                                                    None, None, *norm_args)
            mx.eval(mb_grads, loss, stats)
            t = mark("loss_and_grad", t)
            grads = add_grads(grads, mb_grads)
            del mb_grads
            mx.eval(grads)
            t = mark("sum_grads", t)
    grad_norm = global_norm(grads)
    ok = bool(all_finite(grads)) and bool(mx.isfinite(grad_norm))
    t = mark("norm_and_finite", t)
    grads = clip_by_norm(grads, grad_norm, 1.0)
    mx.eval(grads)
    t = mark("clip", t)
    optimizer.update(model, grads)
    del grads
    eval_update_in_chunks(model, optimizer)
    mark("adamw", t)
    assert ok
    return times


def main(argv=None):
    args = parse_args(argv)
    if args.no_cuda_kernels:
        cuda_kernels.set_enabled(False)
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    model = build_model(args.depth)
    params, width = count_params(model), 64 * args.depth
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
        importance_sampling_level="token", max_completion_length=args.new_tokens, compute_dtype=mx.bfloat16,
        use_compile=not args.no_compile)
    optimizer = FusedAdamW(learning_rate=1e-6) if args.fused else optim.AdamW(learning_rate=1e-6)
    plain, fused = optim.AdamW(learning_rate=1e-6), FusedAdamW(learning_rate=1e-6)  # for the phases
    seq_len = args.prompt_len + args.new_tokens
    flops_per_token = 6 * (params - VOCAB * width) + 12 * args.depth * width * seq_len
    for pad in args.pad_multiple:
        for step in range(args.steps + 1):
            slices, batches, real, norms = random_batches(args, rng, pad)
            rewards = mx.array(rng.random(args.prompts * args.group), dtype=mx.float32)
            advantages = group_advantages(rewards, args.group, "group")
            mx.synchronize()
            start = time.perf_counter()
            policy_update(model, optimizer, loss_and_grad, batches, slices, advantages, None, None, norms, 1.0)
            mx.synchronize()
            seconds = time.perf_counter() - start
            padded = sum(b.inputs.size for b in batches)
            print(f"[pad {pad} {'warm-up' if step == 0 else f'step {step}'}] update {seconds:.3f} s, widths "
                  f"{sorted({b.inputs.shape[1] for b in batches})}, {real / seconds:,.0f} real tok/s, "
                  f"{flops_per_token * real / seconds / 1e12:.0f} TFLOP/s on real tokens "
                  f"({flops_per_token * real / seconds / 1e12 / args.peak_tflops:.1%} of peak), "
                  f"{flops_per_token * padded / seconds / 1e12:.0f} on padded", flush=True)
        # The same update, phase by phase, on batches of widths already seen (no retrace): mlx's AdamW
        # and a cast-and-add per weight, then the compiled ones.
        variants = {"plain": (plain, plain_add_grads), "fused": (fused, add_grads)}
        for name, (opt, add) in variants.items():
            for step in range(2):
                times = phased_update(model, opt, loss_and_grad, batches, slices, advantages, norms, add)
                print(f"[pad {pad} {name} phases {step}] " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items())
                      + f", total {sum(times.values()):.3f} s", flush=True)
    print(f"peak memory {mx.get_peak_memory() / 1e9:.1f} GB, mlx {mx.__version__}, {mx.default_device()}")


if __name__ == "__main__":
    main()
