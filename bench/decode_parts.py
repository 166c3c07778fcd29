"""Where a batched decode step spends its time: forward, sampling, host sync (random nanochat weights).

    python bench/decode_parts.py --depth 20 --rows 256 --context 100 --steps 64
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402

from bench.grpo_step import build_model  # noqa: E402
from utils.rollout import make_rollout_sampler  # noqa: E402


def timed(label, fn, steps):
    fn()  # warm-up
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    mx.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    print(f"{label:<40} {ms:8.3f} ms/step")
    return ms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--part", default="steps", choices=["steps", "attention", "context"])
    args = p.parse_args()
    if args.part == "attention":
        return attention_variants(rows=args.rows, context=args.context)
    if args.part == "context":
        return forward_by_context(depth=args.depth, rows=args.rows)
    model = build_model(args.depth)
    model.set_dtype(mx.bfloat16)
    rows = args.rows

    def fresh_cache():
        cache = [BatchKVCache([0] * rows) for _ in model.layers]
        model(mx.zeros((rows, args.context), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    tokens = mx.zeros((rows,), dtype=mx.int32)
    sampler = make_rollout_sampler(1.0, top_k=50)
    plain = make_rollout_sampler(1.0)

    cache = fresh_cache()
    timed("forward only (eval logits)", lambda: mx.eval(model(tokens[:, None], cache=cache)), args.steps)
    cache = fresh_cache()

    def fwd_sample(s):
        logits = model(tokens[:, None], cache=cache)[:, -1, :]
        return s(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    timed("forward + top-k 50 sampling", lambda: mx.eval(fwd_sample(sampler)), args.steps)
    cache = fresh_cache()
    timed("forward + plain sampling", lambda: mx.eval(fwd_sample(plain)), args.steps)
    cache = fresh_cache()
    timed("forward + top-k sampling + tolist", lambda: fwd_sample(sampler).tolist(), args.steps)
    logits = mx.random.normal((rows, 65536)).astype(mx.bfloat16)
    timed("top-k 50 sampling alone", lambda: mx.eval(sampler(logits - mx.logsumexp(logits, -1, keepdims=True))), args.steps)
    timed("plain sampling alone", lambda: mx.eval(plain(logits)), args.steps)
    cache = fresh_cache()
    timed("mask creation", lambda: mx.eval(cache[0].make_mask(1)), args.steps)




def attention_variants(rows=256, heads=10, context=200, layers=20, steps=32):
    """The attention of one decode step alone, with and without the left-padding mask."""
    q = mx.random.normal((rows, heads, 1, 128)).astype(mx.bfloat16)
    k = mx.random.normal((rows, heads, 512, 128)).astype(mx.bfloat16)
    v = mx.random.normal((rows, heads, 512, 128)).astype(mx.bfloat16)
    ks, vs = k[..., :context, :], v[..., :context, :]
    mask = mx.ones((rows, 1, 1, context), dtype=mx.bool_)
    scale = 128 ** -0.5
    sdpa = mx.fast.scaled_dot_product_attention
    timed("sdpa, no mask (x layers)", lambda: mx.eval([sdpa(q, ks, vs, scale=scale) for _ in range(layers)]), steps)
    timed("sdpa, bool mask (x layers)", lambda: mx.eval([sdpa(q, ks, vs, scale=scale, mask=mask) for _ in range(layers)]), steps)
    kc, vc = mx.contiguous(ks), mx.contiguous(vs)
    mx.eval(kc, vc)
    timed("sdpa, contiguous kv, mask (x layers)", lambda: mx.eval([sdpa(q, kc, vc, scale=scale, mask=mask) for _ in range(layers)]), steps)
    timed("sdpa, contiguous kv, no mask (x layers)", lambda: mx.eval([sdpa(q, kc, vc, scale=scale) for _ in range(layers)]), steps)

    def manual():
        s = (q * scale) @ ks.swapaxes(-1, -2)
        s = mx.where(mask, s, -1e9)
        return mx.softmax(s.astype(mx.float32), axis=-1).astype(mx.bfloat16) @ vs
    timed("matmul attention, mask (x layers)", lambda: mx.eval([manual() for _ in range(layers)]), steps)


def forward_by_context(depth=20, rows=256, steps=16):
    model = build_model(depth)
    model.set_dtype(mx.bfloat16)
    tokens = mx.zeros((rows,), dtype=mx.int32)
    for context in (8, 100, 200, 300):
        cache = [BatchKVCache([0] * rows) for _ in model.layers]
        model(mx.zeros((rows, context), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])

        def step():
            mx.eval(model(tokens[:, None], cache=cache))
            for c in cache:
                c.trim(1)
        timed(f"forward, context {context}", step, steps)


if __name__ == "__main__":
    main()
