"""Where one training micro-batch spends its time: the model's forward and backward vs. the loss head.

    python bench/loss_parts.py --depth 20 --rows 64 --length 356
    python bench/loss_parts.py --depth 20 --rows 64 --length 384 --ops   # one layer's ops, one by one

Times (after a warm-up call each): the bf16 forward alone, forward + per-token log-probs, the
backward of a trivial loss (the model alone), and the trainer's compiled GRPO loss and gradient.
With --ops: each kind of op of a nanochat layer and of the loss head, forward and forward + backward
(mx.vjp), at the micro-batch's shape, so the model's time can be split into GEMMs and the rest.
"""

import argparse
import math
import time

import mlx.core as mx
import mlx.nn as nn
from model_families import VOCAB, build_model
from mlx.utils import tree_flatten

from mlx_grpo import cuda_kernels
from mlx_grpo.nanochat.decoder import RMS_NORM_EPS
from mlx_grpo.training.loss import token_logprobs, token_logprobs_and_entropy
from mlx_grpo.training.update import make_loss_and_grad


def timed(label, fn, repeats=3, flops=None):
    mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    mx.synchronize()
    ms = (time.perf_counter() - start) / repeats * 1e3
    rate = f"  {flops / ms / 1e9:7.1f} TFLOP/s" if flops else ""
    print(f"{label:<64} {ms:9.2f} ms{rate}", flush=True)


def time_ops(rows, length, depth):
    """Forward and forward+backward of each op kind at [rows, length] tokens, bf16."""
    width, heads, hidden, tokens = 64 * depth, depth // 2, 4 * 64 * depth, rows * length
    head_dim = width // heads
    bf16 = mx.bfloat16

    def rand(*shape):
        return (mx.random.normal(shape) * 0.02).astype(bf16)

    x, x_hidden = rand(rows, length, width), rand(rows, length, hidden)
    heads_layout = rand(rows, length, heads, head_dim).transpose(0, 2, 1, 3)  # as the model makes it
    q, k, v = (rand(rows, heads, length, head_dim) for _ in range(3))
    freqs = -mx.exp(mx.arange(0.0, head_dim // 2) * (math.log(10000.0) / (head_dim // 2)))
    logits, targets = rand(rows, length, VOCAB) * 50, mx.random.randint(0, VOCAB, (rows, length))
    cases = {
        # name: (function, inputs, FLOPs of the forward or None)
        f"matmul {tokens} x {width} x {width} (q, k, v, attn proj)": (lambda a, w: a @ w, [x, rand(width, width)], 2 * tokens * width * width),
        f"matmul {tokens} x {width} x {hidden} (mlp up)": (lambda a, w: a @ w, [x, rand(width, hidden)], 2 * tokens * width * hidden),
        f"matmul {tokens} x {hidden} x {width} (mlp down)": (lambda a, w: a @ w, [x_hidden, rand(hidden, width)], 2 * tokens * width * hidden),
        f"matmul {tokens} x {width} x {VOCAB} (lm head)": (lambda a, w: a @ w, [x, rand(width, VOCAB)], 2 * tokens * width * VOCAB),
        "sdpa causal": (lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=head_dim ** -0.5, mask="causal"),
                        [q, k, v], 2 * 2 * rows * heads * length * length * head_dim // 2),
        "rms_norm [B, T, D]": (lambda a: mx.fast.rms_norm(a, None, RMS_NORM_EPS), [x], None),
        "rope, heads layout": (lambda a: mx.fast.rope(a, head_dim, traditional=False, base=None, freqs=freqs, scale=1.0, offset=0),
                               [heads_layout], None),
        "rms_norm, heads layout (QK norm)": (lambda a: mx.fast.rms_norm(a, None, RMS_NORM_EPS), [q], None),
        "relu^2 [B, T, 4D]": (lambda a: mx.square(mx.maximum(a, 0)), [x_hidden], None),
        "residual add": (lambda a, b: a + b, [x, x], None),
        "attention output to [B, T, D] (transpose copy)": (lambda a: a.transpose(0, 2, 1, 3).reshape(rows, length, width), [q], None),
        "log-probs: float32 logsumexp + take": (lambda z: token_logprobs(z, targets), [logits], None),
        "log-probs + entropy": (lambda z: sum(token_logprobs_and_entropy(z, targets)), [logits], None),
    }
    for name, (fn, inputs, flops) in cases.items():
        timed(f"{name} forward", lambda: fn(*inputs), repeats=10, flops=flops)
        outputs = fn(*inputs)
        cotangent = mx.ones_like(outputs)
        timed(f"{name} forward + backward", lambda: mx.vjp(fn, inputs, [cotangent]), repeats=10,
              flops=flops and 3 * flops)
        print(f"  (x {depth} layers)" if "lm head" not in name and "log-probs" not in name else "", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--rows", type=int, default=64, help="completions per micro-batch")
    p.add_argument("--length", type=int, default=356, help="tokens per row (prompt + completion)")
    p.add_argument("--ops", action="store_true", help="time each op kind of a layer instead")
    p.add_argument("--no-cuda-kernels", action="store_true",
                   help="MLX ops instead of the custom CUDA kernels (all three; as MLX_GRPO_CUDA_KERNELS=0)")
    args = p.parse_args()
    if args.no_cuda_kernels:
        cuda_kernels.set_enabled(False)
    if args.ops:
        return time_ops(args.rows, args.length, args.depth)
    model = build_model(args.depth)  # float32 master weights, as the trainer keeps them
    width = 64 * args.depth
    matmul_params = sum(v.size for k, v in tree_flatten(model.parameters()) if "wte" not in k)
    tokens = args.rows * args.length
    forward_flops = (2 * matmul_params + 4 * args.depth * width * args.length) * tokens  # nanochat-style estimate
    inputs = mx.random.randint(0, VOCAB, (args.rows, args.length))
    targets = mx.random.randint(0, VOCAB, (args.rows, args.length))
    mask = mx.ones((args.rows, args.length), dtype=mx.float32)
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
        importance_sampling_level="token", max_completion_length=args.length, compute_dtype=mx.bfloat16,
        use_compile=True)
    norms = [mx.array(float(args.rows)), mx.array(float(tokens)), mx.array(1.0)]
    advantages = mx.random.normal((args.rows,))
    with loss_and_grad.compute_weights():
        timed("forward (bf16 logits)", lambda: model(inputs), flops=forward_flops)
        timed("forward + token log-probs (float32 logsumexp)", lambda: token_logprobs(model(inputs), targets))
        timed("forward + log-probs + entropy", lambda: token_logprobs_and_entropy(model(inputs), targets))
        trivial = nn.value_and_grad(model, lambda x: model(x)[..., 0].astype(mx.float32).sum())
        timed("forward + backward, trivial loss (the model alone)", lambda: trivial(inputs), flops=3 * forward_flops)
        log_probs_only = nn.value_and_grad(model, lambda x, y: token_logprobs(model(x), y).sum())
        timed("forward + backward, sum of log-probs", lambda: log_probs_only(inputs, targets), flops=3 * forward_flops)
        timed("trainer's compiled GRPO loss and gradient", lambda: loss_and_grad(
            inputs, targets, mask, advantages, None, None, *norms), flops=3 * forward_flops)


if __name__ == "__main__":
    main()
