"""One decode step's attention (the cache write included) with MLX's ops only, in the two cache layouts a
portable decoder can keep, timed side by side at a few steps t. Random bf16 keys; d20's shape by default.

    python bench/portable_attention.py --rows 256 --prompts 16 --steps 32,128,224

- per row: each prompt's keys copied to its group's rows, left-padded to the longest prompt, and MLX's fused
  attention over the row's cache with a mask over the padding (the per-row layout of utils/nanochat/decoder.py,
  but with keys and values in buffers of their own; the decoders' one buffer is the GEMM variant's);
  "no mask" is the same with equal prompts, the fastest MLX has for one query;
- GEMM scores: the per-row layout's masked attention written out (utils/nanochat/decoder.py's gemm_queries and
  attention_by_gemm, what the decoders run on CUDA): the row's query twice so MLX's CUDA backend scores with
  cuBLAS rather than the one-row GEMV of MLX's own fallback, the scale and the mask applied by the score matmul,
  over columns rounded up to GEMM_COLUMNS_ALIGN;
- by runs: the per-row layout with one fused call per run of rows of equal padding (a prompt's group), each over
  its rows' own columns, so no mask and MLX's one-query fused kernel on CUDA too;
- 2 queries: the per-row layout with the row's query twice, so MLX's CUDA backend takes cuDNN's fused attention,
  which accepts an array mask (its one-query kernel does not), over columns rounded up to 64 or the whole buffer
  (cuDNN plans each new shape anew);
- per prompt: each prompt's keys stored once, its group's queries scored against them in one matmul per group,
  the rows' generated keys scored on their own, one softmax over both; "keys^T" keeps the generated keys
  transposed, so their scores are the same matrix-vector product as the values'.

Times are ms per step of `--layers` layers (each its own cache), wall with the host waiting; on MLX's CUDA backend
also GPU-busy time and kernels per layer from torch's CUDA profiler (so there it needs torch with CUDA). Each
variant's largest difference from the per-row, masked output is printed (and returned by main, keyed by
(t, variant)).
"""

import argparse
import time

import cuda_profiler
import mlx.core as mx
import numpy as np

from mlx_grpo import cuda_kernels
from mlx_grpo.nanochat import decoder as nanochat_decoder


def per_row_attention(q, k, v, keys, values, column, mask, scale):
    keys[..., column:column + 1, :] = k
    values[..., column:column + 1, :] = v
    return mx.fast.scaled_dot_product_attention(q, keys[..., :column + 1, :], values[..., :column + 1, :],
                                                scale=scale, mask=mask)


def padding_runs(left_padding):
    """(first row, end row, left padding) of each run of consecutive rows with the same left padding."""
    runs = []
    for row, pad in enumerate(int(p) for p in left_padding):
        if runs and runs[-1][2] == pad:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1, pad])
    return [tuple(run) for run in runs]


def attend_by_runs(q, keys, values, column, runs, scale):
    """One fused attention per run of rows, over the run's columns [padding, column]: no mask. The calls read
    disjoint slices, so MLX's CUDA graph may run them side by side."""
    out = [mx.fast.scaled_dot_product_attention(q[a:b], keys[a:b, :, pad:column + 1], values[a:b, :, pad:column + 1],
                                                scale=scale) for a, b, pad in runs]
    return out[0] if len(out) == 1 else mx.concatenate(out, axis=0)


def per_prompt_attention(q, k, v, prompt_k, prompt_v, prompt_bias, gen_k, gen_v, t, scale, keys_transposed=False):
    """q, k, v: (rows, heads, 1, head_dim); prompt_k/v: (prompts, kv_heads, width, head_dim) from column 0;
    prompt_bias: (prompts, 1, 1, width), 0 on a prompt's keys and -inf past them; gen_k/v: (rows, kv_heads,
    capacity, head_dim), or gen_k (rows, kv_heads, head_dim, capacity) with keys_transposed. Rows are
    prompt-major, `rows // prompts` per prompt."""
    rows, heads, _, dim = q.shape
    prompts, kv_heads, width, _ = prompt_k.shape
    group, rep = rows // prompts, heads // kv_heads
    if keys_transposed:
        gen_k[..., t:t + 1] = k.swapaxes(-1, -2)
    else:
        gen_k[..., t:t + 1, :] = k
    gen_v[..., t:t + 1, :] = v
    q = q * scale
    # The group's queries against its prompt's keys: (prompts, kv_heads, group * rep, width).
    q_group = q.reshape(prompts, group, kv_heads, rep, dim).transpose(0, 2, 1, 3, 4).reshape(
        prompts, kv_heads, group * rep, dim)
    s_prompt = (q_group @ prompt_k.swapaxes(-1, -2)).astype(mx.float32) + prompt_bias
    s_prompt = s_prompt.reshape(prompts, kv_heads, group, rep, width).transpose(0, 2, 1, 3, 4).reshape(
        rows, kv_heads, rep, width)
    q_row = q.reshape(rows, kv_heads, rep, dim)
    keys = gen_k[..., :t + 1] if keys_transposed else gen_k[..., :t + 1, :].swapaxes(-1, -2)
    s_gen = (q_row @ keys).astype(mx.float32)
    w = mx.softmax(mx.concatenate([s_prompt, s_gen], axis=-1), axis=-1).astype(q.dtype)
    w_prompt = w[..., :width].reshape(prompts, group, kv_heads, rep, width).transpose(0, 2, 1, 3, 4).reshape(
        prompts, kv_heads, group * rep, width)
    o_prompt = (w_prompt @ prompt_v).reshape(prompts, kv_heads, group, rep, dim).transpose(0, 2, 1, 3, 4)
    o_gen = w[..., width:] @ gen_v[..., :t + 1, :]
    return (o_prompt.reshape(rows, kv_heads, rep, dim) + o_gen).reshape(rows, heads, 1, dim)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--kv-heads", type=int, default=10)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--capacity", type=int, default=256, help="generated tokens the cache holds")
    p.add_argument("--steps", default="32,128,224", help="decode steps t to time at")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    profiler = cuda_profiler.start("portable_attention.py") if cuda_kernels.runs_on_cuda_gpu() else None

    rng = np.random.default_rng(0)
    R, P, H, KV, D = args.rows, args.prompts, args.heads, args.kv_heads, args.head_dim
    lens = rng.integers(80, 121, size=P)
    width, scale, dtype = int(lens.max()), D ** -0.5, mx.bfloat16
    row_lens = np.repeat(lens, R // P)

    def rand(*shape):
        return mx.random.normal(shape).astype(dtype)

    prompt_k = [rand(P, KV, width, D) for _ in range(args.layers)]
    prompt_v = [rand(P, KV, width, D) for _ in range(args.layers)]
    prompt_bias = mx.where(mx.arange(width)[None] < mx.array(lens)[:, None], 0.0, -mx.inf)[:, None, None, :]
    cap = args.capacity
    gen_k = [mx.zeros((R, KV, cap, D), dtype) for _ in range(args.layers)]
    gen_v = [mx.zeros((R, KV, cap, D), dtype) for _ in range(args.layers)]
    gen_kt = [mx.zeros((R, KV, D, cap), dtype) for _ in range(args.layers)]
    # The per-row layout: each prompt's keys rolled to end at column `width`, then room for the generated ones.
    source = ((mx.arange(width)[None] - mx.array(width - lens)[:, None]) % width)[:, None, :, None]
    row_k, row_v = [], []
    for pk, pv in zip(prompt_k, prompt_v):
        rolled = [mx.repeat(mx.take_along_axis(x, source, axis=2), R // P, axis=0) for x in (pk, pv)]
        free = mx.zeros((R, KV, cap + nanochat_decoder.GEMM_COLUMNS_ALIGN - 1, D), dtype)  # room to round up
        row_k.append(mx.concatenate([rolled[0], free], axis=2))
        row_v.append(mx.concatenate([rolled[1], free], axis=2))
    left_padding = mx.array(width - row_lens)
    mx.eval(prompt_k, prompt_v, prompt_bias, gen_k, gen_v, gen_kt, row_k, row_v)
    q = [rand(R, H, 1, D) for _ in range(args.layers)]
    kv = [(rand(R, KV, 1, D), rand(R, KV, 1, D)) for _ in range(args.layers)]
    mx.eval(q, kv)

    def per_row(t, masked=True):
        column = width + t
        mask = (mx.arange(column + 1) >= left_padding[:, None])[:, None, None, :] if masked else None
        return [per_row_attention(q[i], *kv[i], row_k[i], row_v[i], column, mask, scale) for i in range(args.layers)]

    def write(i, column):
        k, v = kv[i]
        row_k[i][..., column:column + 1, :] = k
        row_v[i][..., column:column + 1, :] = v

    def rounded_columns(column, round_to, limit):
        """The columns read, rounded up to a multiple of round_to (at most limit), and the (rows, columns) mask."""
        n = min(-(-(column + 1) // round_to) * round_to, limit)
        cols = mx.arange(n)
        return n, (cols >= left_padding[:, None]) & (cols <= column)

    def per_row_gemm(t):
        # As the decoders do it: keys and values in one buffer per layer, the mask made once per step.
        column = width + t
        end, allowed = rounded_columns(column, nanochat_decoder.GEMM_COLUMNS_ALIGN, row_k[0].shape[2])
        bias = nanochat_decoder.padding_bias(allowed, KV, nanochat_decoder.query_rows(H, KV), dtype)
        out = []
        for i in range(args.layers):
            k, v = kv[i]
            row_kv[i][0, ..., column:column + 1, :] = k
            row_kv[i][1, ..., column:column + 1, :] = v
            out.append(nanochat_decoder.attention_by_gemm(nanochat_decoder.gemm_queries(q[i], KV),
                                                          row_kv[i][0, ..., :end, :], row_kv[i][1, ..., :end, :],
                                                          bias, scale, H))
        return out

    runs = padding_runs(width - row_lens)

    def per_row_by_runs(t):
        column = width + t
        out = []
        for i in range(args.layers):
            write(i, column)
            out.append(attend_by_runs(q[i], row_k[i], row_v[i], column, runs, scale))
        return out

    def per_prompt(t):
        return [per_prompt_attention(q[i], *kv[i], prompt_k[i], prompt_v[i], prompt_bias, gen_k[i], gen_v[i], t,
                                     scale) for i in range(args.layers)]

    def per_prompt_transposed(t):
        return [per_prompt_attention(q[i], *kv[i], prompt_k[i], prompt_v[i], prompt_bias, gen_kt[i], gen_v[i], t,
                                     scale, keys_transposed=True) for i in range(args.layers)]

    def per_row_pair(t, round_to):
        # Two queries (the row's twice) and the mask: MLX's CUDA backend then runs cuDNN's fused attention, which
        # takes an array mask (its one-query kernel does not). Columns rounded up so a shape serves many steps.
        column = width + t
        n, allowed = rounded_columns(column, round_to, width + cap)
        mask = allowed[:, None, None, :]
        out = []
        for i in range(args.layers):
            write(i, column)
            pair = mx.concatenate([q[i], q[i]], axis=2)
            out.append(mx.fast.scaled_dot_product_attention(pair, row_k[i][..., :n, :], row_v[i][..., :n, :],
                                                            scale=scale, mask=mask)[:, :, :1])
        return out

    variants = {"per row, mask": per_row, "per row, GEMM scores": per_row_gemm, "per row, by runs": per_row_by_runs,
                "2 queries, /64": lambda t: per_row_pair(t, 64), "2 queries, whole": lambda t: per_row_pair(t, 1 << 20),
                "per row, no mask": lambda t: per_row(t, masked=False), "per prompt": per_prompt,
                "per prompt, keys^T": per_prompt_transposed}
    differences = {}
    print(f"{R} rows, {P} prompts of {lens.min()}-{lens.max()} tokens, heads {H}/{KV} x {D}, {args.layers} layers")
    for t in [int(s) for s in args.steps.split(",")]:
        # The generated columns before t hold keys of their own (the same in both layouts).
        for i in range(args.layers):
            fill_k, fill_v = rand(R, KV, t, D), rand(R, KV, t, D)
            gen_k[i][..., :t, :] = fill_k
            gen_v[i][..., :t, :] = fill_v
            gen_kt[i][..., :t] = fill_k.swapaxes(-1, -2)
            row_k[i][..., width:width + t, :] = fill_k
            row_v[i][..., width:width + t, :] = fill_v
        row_kv = [mx.stack([k, v]) for k, v in zip(row_k, row_v)]  # the decoders' one buffer per layer
        mx.eval(gen_k, gen_v, gen_kt, row_k, row_v, row_kv)
        reference = per_row(t)
        mx.eval(reference)
        for name, fn in variants.items():
            start = time.perf_counter()
            out = fn(t)
            mx.eval(out)
            first_call = (time.perf_counter() - start) * 1e3
            if name != "per row, no mask":
                err = max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
                          for a, b in zip(out, reference))
                differences[(t, name)] = err
            else:
                err = float("nan")
            mx.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                mx.eval(fn(t))
            wall = (time.perf_counter() - start) / args.repeats * 1e3
            line = f"t={t:<4} {name:<20} wall {wall:7.3f} ms/step"
            if profiler is not None:
                torch, profile, activity = profiler
                with profile(activities=[activity.CUDA]) as prof:
                    for _ in range(args.repeats):
                        mx.eval(fn(t))
                    mx.synchronize()
                per_kernel = cuda_profiler.gpu_time_by_kernel(prof, torch)
                busy = sum(us for _, us in per_kernel.values()) / args.repeats / 1e3
                kernels = sum(n for n, _ in per_kernel.values()) / args.repeats / args.layers
                line += f"  GPU busy {busy:7.3f} ms/step  {kernels:5.1f} kernels/layer"
            print(line + f"  max |diff| vs per row {err:.2e}  first call {first_call:.0f} ms")
    return differences


if __name__ == "__main__":
    main()
