"""Where a batched decode step spends its time: forward, sampling, host sync (random nanochat weights).

    python bench/decode_parts.py --depth 20 --rows 256 --context 100 --steps 64
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from model_families import build_model
from mlx_lm.models.cache import BatchKVCache

from mlx_grpo import cuda_kernels
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.nanochat.decoder import RMS_NORM_EPS


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
    p.add_argument("--part", default="steps",
                   choices=["steps", "attention", "context", "sampling", "decoder", "ops", "loop", "capacity", "write"])
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary of --part capacity's model")
    p.add_argument("--capacities", default="256,1024", help="--part capacity: decoder capacities (max_new_tokens)")
    p.add_argument("--buffers", default="1,2,3", help="--part capacity: KV buffers per layer to time (alternate_buffers)")
    p.add_argument("--no-cuda-kernels", action="store_true",
                   help="MLX ops instead of the custom CUDA kernels (all three; as MLX_GRPO_CUDA_KERNELS=0)")
    args = p.parse_args()
    if args.no_cuda_kernels:
        cuda_kernels.set_enabled(False)
    if args.part == "write":
        return cache_write(rows=args.rows, steps=args.steps, capacities=[int(c) for c in args.capacities.split(",")])
    if args.part == "capacity":
        return step_by_capacity(depth=args.depth, rows=args.rows, context=args.context, steps=args.steps,
                                vocab=args.vocab, capacities=[int(c) for c in args.capacities.split(",")],
                                buffer_counts=[int(n) for n in args.buffers.split(",")])
    if args.part == "loop":
        return rollout_loop(depth=args.depth, rows=args.rows, steps=args.steps)
    if args.part == "ops":
        return op_costs(depth=args.depth, rows=args.rows, context=args.context)
    if args.part == "sampling":
        return sampling_variants(rows=args.rows, steps=args.steps)
    if args.part == "decoder":
        return decoder_by_context(depth=args.depth, rows=args.rows)
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
    additive = mx.zeros((rows, 1, 1, context), dtype=mx.bfloat16)
    timed("sdpa, additive bf16 mask (x layers)", lambda: mx.eval([sdpa(q, ks, vs, scale=scale, mask=additive) for _ in range(layers)]), steps)
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


def sampling_variants(rows=256, vocab=65536, steps=32, k=50):
    """Temperature + top-k sampling of one decode step's logits, three ways."""
    from mlx_lm.sample_utils import make_sampler

    logits = (15 * mx.tanh(mx.random.normal((rows, vocab)) * 3 / 15)).astype(mx.bfloat16)
    mlx_lm_top_k = make_sampler(temp=1.0, top_k=k)
    fused = make_rollout_sampler(1.0, top_k=k)

    def topk_threshold():
        kth = mx.topk(logits, k, axis=-1).min(axis=-1, keepdims=True)
        return mx.random.categorical(mx.where(logits >= kth, logits.astype(mx.float32), -mx.inf))

    timed("mlx-lm top-k sampler (argpartition)", lambda: mx.eval(mlx_lm_top_k(logits - mx.logsumexp(logits, -1, keepdims=True))), steps)
    timed("mx.topk threshold + categorical", lambda: mx.eval(topk_threshold()), steps)
    timed("fused (chunked threshold, compiled)", lambda: mx.eval(fused(logits)), steps)
    timed("greedy (compiled argmax)", lambda: mx.eval(make_rollout_sampler(0.0)(logits)), steps)


def rollout_loop(depth=20, rows=256, steps=256, prompts=16):
    """The rollout's decode loop with and without the host's per-row bookkeeping."""
    from mlx_grpo.generation.engine import generate_completions
    from mlx_grpo.nanochat.decoder import NanochatDecoder

    model = build_model(depth)
    model.set_dtype(mx.bfloat16)
    prompt_ids = [[1 + i] * (100 - i % 5) for i in range(prompts)]
    sampler = make_rollout_sampler(1.0, top_k=50)
    for _ in range(2):
        _, stats = generate_completions(model, prompt_ids, group_size=rows // prompts, max_new_tokens=steps,
                                        sampler=sampler, stop_token_ids=set())
    print(f"CUDA kernels: {cuda_kernels.available()}")
    print(f"generate_completions: {stats.seconds:.3f} s, prefill {stats.prefill_seconds:.3f} s, "
          f"{(stats.seconds - stats.prefill_seconds) / steps * 1e3:.3f} ms per decode step")
    rng = np.random.default_rng(0)
    for _ in range(3):  # as bench/grpo_step.py: new random prompts of 80-120 tokens each call
        random_prompts = [rng.integers(0, 65_000, size=n).tolist() for n in rng.integers(80, 121, size=prompts)]
        _, stats = generate_completions(model, random_prompts, group_size=rows // prompts, max_new_tokens=steps,
                                        sampler=sampler, stop_token_ids=set())
        print(f"generate_completions, random prompts of 80-120 tokens: {stats.seconds:.3f} s, "
              f"prefill {stats.prefill_seconds:.3f} s")
    for read_back in (True, False):
        decoder = NanochatDecoder(model, prompt_ids, rows // prompts, steps)
        tokens = mx.zeros((rows,), dtype=mx.int32)
        mx.synchronize()
        start = time.perf_counter()
        pending = None
        for _ in range(steps):
            tokens = sampler(decoder.step(tokens))
            mx.async_eval(tokens)
            if read_back and pending is not None:
                pending.tolist()
            pending = tokens
        mx.eval(tokens)
        label = "bare loop, tokens read back" if read_back else "bare loop, no read-back"
        print(f"{label:<40} {(time.perf_counter() - start) / steps * 1e3:8.3f} ms per decode step")


def op_costs(depth=20, rows=256, context=100, repeats=50):
    """GPU time of each op of a decode step (a chain of `repeats` copies evaluated at once), and the
    host time to build one step's graph, to tell launch/host cost from device work."""
    from mlx_grpo.nanochat.decoder import NanochatDecoder

    width = 64 * depth
    x = mx.random.normal((rows, 1, width)).astype(mx.bfloat16)
    w = {n: (mx.random.normal((o, i)) * 0.02).astype(mx.bfloat16)
         for n, (o, i) in {"qkv": (3 * width, width), "proj": (width, width), "fc": (4 * width, width),
                           "fc_proj": (width, 4 * width), "head": (65536, width)}.items()}
    h = mx.random.normal((rows, 1, 4 * width)).astype(mx.bfloat16)
    mx.eval(x, w, h)

    def chain(label, fn):
        timed(f"{label} (one op)", lambda: mx.eval([fn(i) for i in range(repeats)]), 5)

    # Each op's result depends on i so copies are not merged; the ms printed are for `repeats` ops.
    chain(f"x{repeats} qkv matmul", lambda i: (x + i) @ w["qkv"].T)
    chain(f"x{repeats} proj matmul", lambda i: (x + i) @ w["proj"].T)
    chain(f"x{repeats} fc matmul", lambda i: (x + i) @ w["fc"].T)
    chain(f"x{repeats} fc_proj matmul", lambda i: (h + i) @ w["fc_proj"].T)
    chain(f"x{repeats} lm_head matmul", lambda i: (x + i) @ w["head"].T)
    chain(f"x{repeats} add", lambda i: x + i)
    chain(f"x{repeats} rms_norm", lambda i: mx.fast.rms_norm(x + i, None, RMS_NORM_EPS))
    model = build_model(depth)
    model.set_dtype(mx.bfloat16)
    prompt_ids = [[1] * (context - i % 3) for i in range(16)]
    decoder = NanochatDecoder(model, prompt_ids, rows // 16, 64)
    tokens = mx.zeros((rows,), dtype=mx.int32)
    mx.eval(decoder.step(tokens))
    start = time.perf_counter()
    for _ in range(10):
        out = decoder.step(tokens)
    build = (time.perf_counter() - start) / 10 * 1e3
    mx.eval(out)
    print(f"host time to build one step's graph        {build:8.3f} ms")
    pipelined = []
    for _ in range(3):
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            out = decoder.step(tokens)
            mx.async_eval(out)
        mx.eval(out)
        pipelined.append((time.perf_counter() - start) / 10 * 1e3)
    print(f"decode step, async (pipelined)             {min(pipelined):8.3f} ms")


def cache_write(rows, steps, capacities, head_dim=128):
    """One column written into a (rows, 1, capacity, head_dim) buffer per step, then read: with the host waiting
    for each step, and with the host one step ahead (as the engine runs). MLX writes a slice in place only when
    nothing else holds the buffer; a step still in flight does, so then every write copies the whole buffer.
    "two buffers": written in turn, each write the step before's column and its own (NanochatDecoder's
    alternate_buffers): the buffer written was read two steps ago."""
    for ahead, alternate in ((False, False), (True, False), (True, True)):
        for capacity in capacities:
            buffers = [mx.zeros((rows, 1, capacity, head_dim)) for _ in range(2 if alternate else 1)]
            column = mx.ones((rows, 1, 1, head_dim))
            mx.eval(buffers)
            pending, previous = None, None
            start = time.perf_counter()
            for i in range(steps):
                new = column + i
                buffer = buffers[i % len(buffers)]
                if alternate and previous is not None:
                    buffer[..., i - 1:i + 1, :] = mx.concatenate([previous, new], axis=2)
                else:
                    buffer[..., i:i + 1, :] = new
                previous = new
                read = buffer[..., :i + 1, :].sum()
                if ahead:
                    mx.async_eval(read)
                    if pending is not None:
                        pending.item()
                    pending = read
                else:
                    mx.eval(read)
            mx.eval(buffer)
            label = "host one step ahead" if ahead else "host waits each step"
            label += ", two buffers" if alternate else ""
            print(f"{label}, capacity {capacity:>5}: {(time.perf_counter() - start) / steps * 1e3:8.3f} ms per write",
                  flush=True)
            buffers = buffer = None


def step_by_capacity(depth, rows, context, steps, vocab, capacities, buffer_counts=(1, 2, 3), prompts=4):
    """utils/nanochat/decoder.py's decode step at the same context for several cache capacities, run as the
    engine runs it (step t queued before step t-1 is read back): a per-step cost that grows with the
    capacity is a cache write copying the whole buffer. Each capacity with each count of cache buffers per layer
    written in turn (NanochatDecoder's alternate_buffers; 1: one buffer), then with one buffer and the host
    waiting for every step (nothing in flight holds the buffer, so a write never copies it)."""
    from mlx_grpo.nanochat.decoder import NanochatDecoder

    model = build_model(depth, vocab)
    prompt_ids = [[1 + i] * (context - i % 3) for i in range(prompts)]
    sampler = make_rollout_sampler(0.0)
    runs = [(c, n, False) for n in buffer_counts for c in capacities] + [(c, 1, True) for c in capacities]
    for capacity, buffers, host_waits in runs:
        decoder = NanochatDecoder(model, prompt_ids, rows // prompts, capacity, alternate_buffers=buffers)
        tokens = mx.zeros((rows,), dtype=mx.int32)
        timings = []
        for phase in range(3):  # warm-up, then two timed runs of `steps` steps
            mx.synchronize()
            start, pending = time.perf_counter(), None
            for _ in range(steps):
                tokens = sampler(decoder.step(tokens))
                mx.async_eval(tokens)
                if host_waits:
                    mx.synchronize()
                if pending is not None:
                    pending.tolist()
                pending = tokens
            mx.eval(tokens)
            timings.append((time.perf_counter() - start) / steps * 1e3)
        how = "host waits each step" if host_waits else "host one step ahead"
        print(f"capacity {capacity:>5}, context {context}-{context + 3 * steps}, {buffers} buffer(s), {how}: "
              f"{min(timings[1:]):8.3f} ms per decode step (kernel: {decoder.use_kernel})", flush=True)
        decoder = None


def decoder_by_context(depth=20, rows=256, steps=16, prompts=16):
    """One decode step (logits only) of utils/nanochat/decoder.py against mlx-lm's model call."""
    from mlx_grpo.generation.engine import MlxLmDecoder
    from mlx_grpo.nanochat.decoder import NanochatDecoder

    model = build_model(depth)
    model.set_dtype(mx.bfloat16)
    tokens = mx.zeros((rows,), dtype=mx.int32)
    for context in (8, 100, 200, 300):
        prompt_ids = [[1] * (context - i % 3) for i in range(prompts)]  # a little left padding
        for name, make in (("mlx-lm", lambda: MlxLmDecoder(model, prompt_ids, rows // prompts)),
                           ("fast", lambda: NanochatDecoder(model, prompt_ids, rows // prompts, steps + 2))):
            decoder = make()
            timed(f"{name} decode step, context {context}", lambda: mx.eval(decoder.step(tokens)), steps)
            decoder = None  # free this cache before the next is built


if __name__ == "__main__":
    main()
