"""Device time per call of the top-k sampling kernel (utils/cuda_kernels/sampling.py) at each block size, read by
torch's CUDA profiler. Needs MLX's CUDA backend and torch with CUDA.

    python bench/sampling_blocks.py                 # 256 rows x 65,536 bf16 logits, top-k 50 (the RL shape)
    python bench/sampling_blocks.py --rows 64
"""

import argparse

import cuda_profiler
import mlx.core as mx

from mlx_grpo.cuda_kernels import sampling


def device_us(fn, calls, torch, profile, activity):
    """Mean device time of the sampling kernel over `calls` calls."""
    mx.eval(fn())  # compiles
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            mx.eval(fn())
    runs = [(n, us) for name, (n, us) in cuda_profiler.gpu_time_by_kernel(prof, torch).items() if "topk_sample" in name]
    return sum(us for _, us in runs) / max(sum(n for n, _ in runs), 1)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    torch, profile, ProfilerActivity = cuda_profiler.start("sampling_blocks.py")
    seed = mx.array([7], dtype=mx.uint32)
    shape = (args.rows, args.vocab)
    logits = {"narrow N(0, 0.58)": mx.random.normal(shape) * 0.58,  # a random-weight d20's spread
              "spread 15 tanh(3N / 15)": 15 * mx.tanh(mx.random.normal(shape) * 3 / 15)}
    rule = sampling._block_size
    print(f"{args.rows} rows x {args.vocab} bf16 logits, top-k {args.top_k}; the rule picks {rule(args.rows)}")
    try:
        for name, x in logits.items():
            x = x.astype(mx.bfloat16)
            mx.eval(x)
            cells = []
            for block in (256, 512, 1024):
                sampling._block_size = lambda rows, b=block: b
                us = device_us(lambda: sampling.sample_top_k(x, 1.0, args.top_k, seed), args.calls, torch, profile,
                               ProfilerActivity.CUDA)
                cells.append(f"{block}: {us:6.1f} us")
            print(f"{name:>24}  " + "  ".join(cells))
    finally:
        sampling._block_size = rule


if __name__ == "__main__":
    main()
