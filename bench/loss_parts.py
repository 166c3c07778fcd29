"""Where one training micro-batch spends its time: the model's forward and backward vs. the loss head.

    python bench/loss_parts.py --depth 20 --rows 64 --length 356

Times (after a warm-up call each): the bf16 forward alone, forward + per-token log-probs, the
backward of a trivial loss (the model alone), and the trainer's compiled GRPO loss and gradient.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from bench.grpo_step import VOCAB, build_model  # noqa: E402
from utils.grpo_loss import token_logprobs, token_logprobs_and_entropy  # noqa: E402
from utils.training import make_loss_and_grad  # noqa: E402


def timed(label, fn, repeats=3, flops=None):
    mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    mx.synchronize()
    ms = (time.perf_counter() - start) / repeats * 1e3
    rate = f"  {flops / ms / 1e9:7.1f} TFLOP/s" if flops else ""
    print(f"{label:<52} {ms:9.2f} ms{rate}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--rows", type=int, default=64, help="completions per micro-batch")
    p.add_argument("--length", type=int, default=356, help="tokens per row (prompt + completion)")
    args = p.parse_args()
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
