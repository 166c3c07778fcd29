"""The portable decode step (utils/nanochat/decoder.py, MLX's ops only) at one context for several cache capacities,
run as the engine runs it (the host one step ahead), with its GPU-busy time per step from torch's CUDA profiler
(CUPTI). Needs MLX's CUDA backend and torch with CUDA.

    python bench/capacity_profile.py --depth 20 --rows 256 --context 100 --capacities 256,1024

Wall time that grows with the capacity while GPU-busy time does not is time the GPU waits for the host, not a
copy of the cache; the largest kernels are listed so a copy would show. MLX_MAX_MB_PER_BUFFER in the environment
sets how many megabytes of inputs MLX's CUDA backend puts in one graph before it submits it (BENCHMARKS.md).
"""

import argparse
import os
import time

import cuda_profiler
import mlx.core as mx
from model_families import build_model

from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.nanochat.decoder import NanochatDecoder


def run_steps(decoder, sampler, tokens, steps):
    """`steps` decode steps, each queued before the one before it is read back (as the engine does)."""
    pending = None
    for _ in range(steps):
        tokens = sampler(decoder.step(tokens))
        mx.async_eval(tokens)
        if pending is not None:
            pending.tolist()
        pending = tokens
    mx.eval(tokens)
    return tokens


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--context", type=int, default=100, help="prompt tokens (prompts differ by up to 2: a mask)")
    p.add_argument("--capacities", default="256,1024", help="decoder capacities (max_new_tokens)")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed, and then profiled")
    p.add_argument("--top", type=int, default=6, help="kernels listed")
    args = p.parse_args(argv)
    torch, profile, ProfilerActivity = cuda_profiler.start("capacity_profile.py")
    model = build_model(args.depth, args.vocab)
    prompt_ids = [[1 + i] * (args.context - i % 3) for i in range(args.prompts)]
    sampler = make_rollout_sampler(0.0)
    print(f"d{args.depth} {model.lm_head.weight.dtype}, {args.rows} rows, MLX_MAX_MB_PER_BUFFER "
          f"{os.environ.get('MLX_MAX_MB_PER_BUFFER', 'unset (MLX default)')}", flush=True)
    for capacity in (int(c) for c in args.capacities.split(",")):
        decoder = NanochatDecoder(model, prompt_ids, args.rows // args.prompts, capacity, use_kernel=False)
        tokens = run_steps(decoder, sampler, mx.zeros((args.rows,), dtype=mx.int32), 16)  # warm-up, compiles
        start = time.perf_counter()
        tokens = run_steps(decoder, sampler, tokens, args.steps)
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_steps(decoder, sampler, tokens, args.steps)
        totals = cuda_profiler.gpu_time_by_kernel(prof, torch)
        busy_ms = sum(us for _, us in totals.values()) / args.steps / 1e3
        print(f"capacity {capacity:>5}: {wall_ms:.2f} ms per decode step unprofiled, GPU busy {busy_ms:.2f} ms",
              flush=True)
        for name, (n, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {us / args.steps / 1e3:7.3f} ms per step  {n / args.steps:5.1f} x {us / n:8.1f} us  {name[:80]}")
        decoder = None


if __name__ == "__main__":
    main()
