"""Which masked attention shapes MLX's fused attention backward survives (the shared-prompt update's completion pass).

    python bench/attention_backward_probe.py                 # every case, each in its own process
    python bench/attention_backward_probe.py --case 448      # one prompt width

The completion pass of utils/training/shared_prompt.py attends T completion queries to P prompt keys and T
own keys through an additive mask. On MLX's CUDA backend the backward runs cuDNN when T is a multiple of 128,
and with a key length P + T off that multiple it read out of bounds (d20, 400-token prompts on an H200: "an
illegal memory access was encountered"), so the trainer pads P + T to a multiple of 128 on CUDA
(shared_prompt.CUDA_KEY_MULTIPLE). This probe runs d20's shape (64 rows, 10 heads of 128, T = 256, bf16)
for several P, one process per case (a crash ends only its own), and prints ok or the error per case.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

PROMPT_WIDTHS = (128, 192, 256, 320, 384, 448, 512)  # P + 256 keys: a multiple of 128 or not, in turn


def run_case(prompt_width: int, rows: int = 64, heads: int = 10, head_dim: int = 128, queries: int = 256) -> float:
    import mlx.core as mx

    q = mx.random.normal((rows, heads, queries, head_dim)).astype(mx.bfloat16)
    k, v = (mx.random.normal((rows, heads, prompt_width + queries, head_dim)).astype(mx.bfloat16) for _ in range(2))
    lengths = mx.random.randint(prompt_width // 2, prompt_width, (rows,))
    sees_prompt = mx.arange(prompt_width)[None, None] < lengths[:, None, None]
    sees_own = mx.arange(queries)[None, None, :] <= mx.arange(queries)[None, :, None]
    sees = mx.concatenate([mx.broadcast_to(sees_prompt, (rows, queries, prompt_width)),
                           mx.broadcast_to(sees_own, (rows, queries, queries))], axis=-1)[:, None]
    mask = mx.where(sees, mx.array(0.0, mx.bfloat16), mx.array(-float("inf"), mx.bfloat16))

    def loss(q, k, v):
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim ** -0.5, mask=mask)
        return out.astype(mx.float32).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    mx.eval(grads)
    return float(grads[1].astype(mx.float32).abs().sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=int, help="one prompt width P, in this process")
    args = parser.parse_args(argv)
    if args.case is not None:
        print(f"P {args.case}, keys {args.case + 256}: ok ({run_case(args.case):.4g})", flush=True)
        return 0
    for width in PROMPT_WIDTHS:
        done = subprocess.run([sys.executable, __file__, "--case", str(width)], capture_output=True, text=True,
                              timeout=120)
        lines = (done.stdout + done.stderr).strip().splitlines()
        error = next((line for line in lines if "Error" in line or "error" in line), None)
        print(lines[-1] if done.returncode == 0 and lines else
              f"P {width}, keys {width + 256}: failed, rc {done.returncode}: {error or (lines[-1] if lines else '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
