"""GPU time per kernel of one rollout (nanochat, random weights), read by torch's CUDA profiler (CUPTI), which
records every kernel the process launches, MLX's included. Needs MLX's CUDA backend and torch with CUDA.

    python bench/kernel_profile.py --depth 20                     # the decode kernels
    python bench/kernel_profile.py --depth 20 --no-cuda-kernels   # the portable path (MLX's ops only)
    python bench/kernel_profile.py --depth 20 --no-cuda-kernels --equal-prompts   # no padding mask
    python bench/kernel_profile.py --depth 20 --no-cuda-kernels --alternate-buffers 1   # one buffer: whole-cache copies

It prints kernels and GPU-busy milliseconds per decode step against the wall time (busy close to wall: the
GPU is the limit, not launching), then the kernels taking the most time.
"""

import argparse
import time

import cuda_profiler
import mlx.core as mx
import numpy as np
from model_families import build_model

from mlx_grpo import cuda_kernels
from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--equal-prompts", action="store_true", help="every prompt 100 tokens (else 80-120)")
    p.add_argument("--no-cuda-kernels", action="store_true", help="MLX's ops only (the path Metal runs)")
    p.add_argument("--alternate-buffers", type=int, default=None, metavar="N",
                   help="the portable path's KV buffers per layer, written in turn (the decoder's alternate_buffers; "
                   "default: the decoder's own choice)")
    p.add_argument("--top", type=int, default=12, help="kernels listed")
    args = p.parse_args(argv)
    torch, profile, ProfilerActivity = cuda_profiler.start("kernel_profile.py")
    cuda_kernels.set_enabled(not args.no_cuda_kernels)
    model = build_model(args.depth)
    model.set_dtype(mx.bfloat16)
    rng = np.random.default_rng(0)
    lengths = [100] * args.prompts if args.equal_prompts else rng.integers(80, 121, size=args.prompts)
    prompts = [rng.integers(0, 65_000, size=n).tolist() for n in lengths]
    sampler = make_rollout_sampler(1.0, top_k=50)

    def rollout():
        return generate_completions(model, prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                                    sampler=sampler, stop_token_ids=set(), kv_buffers=args.alternate_buffers)[1]

    rollout()  # compiles
    stats = rollout()
    tokens = args.prompts * args.group * args.new_tokens
    print(f"d{args.depth}, CUDA kernels {cuda_kernels.enabled()}: rollout {stats.seconds:.3f} s "
          f"({tokens / stats.seconds:,.0f} tok/s) unprofiled")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        rollout()
        wall = time.perf_counter() - start
    per_kernel = cuda_profiler.gpu_time_by_kernel(prof, torch)
    launches = sum(n for n, _ in per_kernel.values())
    busy = sum(us for _, us in per_kernel.values())
    steps = args.new_tokens
    print(f"per decode step: {launches / steps:.1f} kernels, GPU busy {busy / 1e3 / steps:.3f} ms, "
          f"wall {wall * 1e3 / steps:.3f} ms (profiled)")
    for name, (n, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{us / 1e3:9.2f} ms {100 * us / max(busy, 1):5.1f}% {n:7d} x {us / n:7.2f} us  {name[:100]}")


if __name__ == "__main__":
    main()
