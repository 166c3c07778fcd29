"""One full GRPO step of the trainer's own code on a random-weight nanochat model, timed by phase.

    python bench/grpo_step.py --depth 20 --compile --micro-batch-size 64   # nanochat's RL shape, as the trainer runs it
    python bench/grpo_step.py --depth 32 --micro-batch-size 8  # d32 at the same shape
    python bench/grpo_step.py --depth 4 --prompts 2 --group 4 --new-tokens 16   # a CPU smoke run

Reports rollout and training tokens/s, model TFLOP/s, step seconds split into rollout / old policy /
reference / update, peak memory, and rollout speed against the memory-bandwidth bound (weights and
KV cache read once per decode step). Sampling never stops early: no stop tokens are given.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.nanochat import Model, ModelArgs

from mlx_grpo.config import GRPOConfig
from mlx_grpo.cuda_kernels import decode as cuda_decode
from mlx_grpo.cuda_kernels import sampling as cuda_sampling
from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.training.lora import add_adapters, base_policy, rollout_copy
from mlx_grpo.training.loss import group_advantages
from mlx_grpo.training.update import (
    FusedAdamW,
    frozen_copy,
    frozen_logprobs,
    loss_normalizers,
    make_loss_and_grad,
    pack_micro_batches,
    policy_update,
)

VOCAB = 65536


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20, help="nanochat depth: width 64*depth, heads depth/2")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
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
    p.add_argument("--compile", action="store_true", help="compile the loss and gradient")
    p.add_argument("--mlx-lm-decode", action="store_true", help="rollouts through mlx-lm's model call, not the fast nanochat decoder")
    p.add_argument("--no-cuda-kernels", action="store_true", help="rollouts without utils/cuda_kernels/decode.py's and utils/cuda_kernels/sampling.py's kernels")
    p.add_argument("--train-type", default="full", choices=["full", "lora", "dora"], help="adapters on a frozen base")
    p.add_argument("--base-quant-bits", type=int, default=0, help="QLoRA: quantize the frozen base (0 = no)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--bandwidth-tbs", type=float, default=3.35, help="memory bandwidth for the bound (H100: 3.35)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def build_model(depth):
    width = 64 * depth
    args = ModelArgs(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 128,
                     num_key_value_heads=width // 128, vocab_size=VOCAB, intermediate_size=4 * width)
    model = Model(args)
    model.set_dtype(mx.float32)  # the trainer's float32 master weights
    mx.eval(model.parameters())
    return model


def count_params(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def decode_bound_seconds(args, depth, params, prompt_lens, bytes_per_weight):
    """Seconds to read the weights (minus the embedding table) and the KV cache once per decode step."""
    width, rows = 64 * depth, args.prompts * args.group
    weight_bytes = (params - VOCAB * width) * bytes_per_weight
    mean_prompt = float(np.mean(prompt_lens))
    total = 0.0
    for step in range(args.new_tokens):
        context = mean_prompt + step
        kv_bytes = 2 * depth * rows * context * width * 2  # K and V in bf16
        total += (weight_bytes + kv_bytes) / (args.bandwidth_tbs * 1e12)
    return total


def main(argv=None):
    args = parse_args(argv)
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    compute_dtype = getattr(mx, args.compute_dtype)
    if args.no_cuda_kernels:
        cuda_decode.available = cuda_sampling.available = lambda: False
    model = build_model(args.depth)
    params = count_params(model)
    lora = args.train_type != "full"
    if lora:  # the trainer's LoRA setup: float32 adapters on a frozen compute_dtype (or quantized) base
        add_adapters(model, GRPOConfig(train_type=args.train_type, compute_dtype=args.compute_dtype,
                                       base_quant_bits=args.base_quant_bits))
    reference = None
    if args.beta > 0:
        reference = base_policy(model) if lora else frozen_copy(model, args.quant_bits or None, 64, dtype=compute_dtype)
    sampler = make_rollout_sampler(args.temperature, top_k=args.top_k)
    loss_and_grad = make_loss_and_grad(
        model, temperature=args.temperature, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=args.beta,
        importance_sampling_level="token", max_completion_length=args.new_tokens, compute_dtype=compute_dtype,
        use_compile=args.compile)
    optimizer = FusedAdamW(learning_rate=1e-6)
    if lora:
        model.train()
    width = 64 * args.depth

    results = []
    for step in range(args.steps + 1):
        prompt_lens = rng.integers(int(args.prompt_len * 0.8), int(args.prompt_len * 1.2) + 1, size=args.prompts)
        prompts = [rng.integers(0, VOCAB - 9, size=n).tolist() for n in prompt_lens]
        mx.synchronize()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        # Rollouts from a bf16 (or quantized) copy of the float32 master weights, as the trainer does.
        copy_needed = args.quant_bits or (compute_dtype != mx.float32 and not lora)
        policy = rollout_copy(model, args.quant_bits or None, 64, dtype=compute_dtype) if copy_needed else model
        completions, rollout_stats = generate_completions(
            policy, prompts, group_size=args.group, max_new_tokens=args.new_tokens, sampler=sampler,
            stop_token_ids=set(), fast_decode=not args.mlx_lm_decode)
        slices, batches = pack_micro_batches(prompts, completions, args.micro_batch_size, pad_multiple=args.pad_multiple)
        mx.synchronize()
        t1 = time.perf_counter()
        old_logp = None
        if args.quant_bits or args.num_iterations > 1:  # a bf16 copy samples what the bf16 update scores
            old_logp = frozen_logprobs(policy, batches, args.temperature)
        del policy
        mx.synchronize()
        t2 = time.perf_counter()
        ref_logp = frozen_logprobs(reference, batches, args.temperature) if reference is not None else None
        mx.synchronize()
        t3 = time.perf_counter()
        rollout_peak = mx.get_peak_memory()  # rollout, old policy and reference
        mx.reset_peak_memory()
        rewards = mx.array(rng.random(len(completions)), dtype=mx.float32)
        advantages = group_advantages(rewards, args.group, "group")
        normalizers = loss_normalizers(completions, batches)
        for _ in range(args.num_iterations):
            policy_update(model, optimizer, loss_and_grad, batches, slices, advantages, old_logp, ref_logp,
                          normalizers, max_grad_norm=1.0)
        mx.synchronize()
        t4 = time.perf_counter()

        generated = rollout_stats.generated_tokens
        # Model FLOPs count the real tokens of each row (prompt + completion), not the padding.
        trained = sum(len(prompts[c.prompt_index]) + len(c.tokens) - 1 for c in completions) * args.num_iterations
        seq_len = args.prompt_len + args.new_tokens
        flops_per_token = 6 * (params - VOCAB * width) + 12 * args.depth * width * seq_len  # nanochat's estimate
        bound = decode_bound_seconds(args, args.depth, params, prompt_lens, 2 if not args.quant_bits else args.quant_bits / 8)
        row = {
            "step": step, "depth": args.depth, "params": params,
            "shape": f"{args.prompts}x{args.group}x{args.new_tokens}",
            "step_s": t4 - t0, "rollout_s": t1 - t0, "prefill_s": rollout_stats.prefill_seconds,
            "generate_s": rollout_stats.seconds, "generate_tok_s": generated / rollout_stats.seconds, "old_policy_s": t2 - t1, "reference_s": t3 - t2,
            "update_s": t4 - t3,
            "rollout_tok_s": generated / (t1 - t0),
            "rollout_vs_bandwidth_bound": bound / (t1 - t0),
            "train_tok_s": trained / (t4 - t3),
            "train_tflops": flops_per_token * trained / (t4 - t3) / 1e12,
            "train_frac_of_peak": flops_per_token * trained / (t4 - t3) / 1e12 / args.peak_tflops,
            "peak_memory_gb": max(rollout_peak, mx.get_peak_memory()) / 1e9,
            "rollout_ref_peak_gb": rollout_peak / 1e9, "update_peak_gb": mx.get_peak_memory() / 1e9,
        }
        label = "warm-up" if step == 0 else f"step {step}"
        print(f"[{label}] " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        if step > 0:
            results.append(row)

    summary = {k: float(np.mean([r[k] for r in results])) for k in results[0] if isinstance(results[0][k], float)}
    summary.update({"device": str(mx.default_device()), "mlx": mx.__version__, "args": vars(args)})
    print("[mean] " + json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "steps": results}, indent=2))
    return summary


if __name__ == "__main__":
    main()
