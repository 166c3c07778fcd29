"""GPU time per call of the decode-attention kernel (utils/cuda_kernels/decode.py) at one head shape, for a few
cases of keys to read, optionally side by side with another version of the kernel. Random bf16 inputs: 256 rows
of 16 prompts of 80-120 cached tokens, a generated-token cache of 256 columns, 20 layers' buffers (so no call
reads another's keys from L2). Needs MLX's CUDA backend and torch with CUDA (its profiler reads the kernels).

    python bench/decode_kernel.py                                  # d20's shape: 10 heads x 128
    python bench/decode_kernel.py --heads 32 --kv-heads 8 --head-dim 64   # Llama-3.2-1B's
    git show 7a6101b:utils/cuda_kernels/decode.py > /tmp/old_decode.py
    python bench/decode_kernel.py --compare /tmp/old_decode.py     # that version's kernel too (repeatable)

A case is `prompt:T` (the row's prompt, then T generated keys) or `none:T` (no prompt). Each kernel's time is
the mean over 3 x 20 calls, printed for two runs, with its largest difference from this version's output.
"""

import argparse
import importlib.util
from pathlib import Path

import cuda_profiler
import mlx.core as mx
import numpy as np

from mlx_grpo.cuda_kernels import decode as cuda_decode
from mlx_grpo.nanochat.decoder import RMS_NORM_EPS


def load_source(path):
    """The kernel source (_HEADER, _SOURCE) of another copy of utils/cuda_kernels/decode.py."""
    spec = importlib.util.spec_from_file_location("decode_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._HEADER, module._SOURCE


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--kv-heads", type=int, default=10)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--cases", default="none:0,prompt:32,prompt:128,prompt:224")
    p.add_argument("--compare", metavar="FILE", action="append", default=[],
                   help="another copy of utils/cuda_kernels/decode.py to time as well (repeatable)")
    args = p.parse_args(argv)
    torch, profile, activity = cuda_profiler.start("decode_kernel.py")
    rows, prompts, H, KV, HD, capacity, prompt_capacity, layers = (256, 16, args.heads, args.kv_heads, args.head_dim,
                                                                   256, 128, 20)
    rng = np.random.default_rng(0)
    dtype = mx.bfloat16
    lens = mx.array(rng.integers(80, 121, size=prompts).astype(np.int32))
    no_prompt = mx.zeros((prompts,), mx.int32)
    row_prompt = mx.array(np.repeat(np.arange(prompts), rows // prompts).astype(np.int32))
    inv_freq = 1.0 / (10000 ** (mx.arange(0, HD, 2).astype(mx.float32) / HD))
    prompt_k = [mx.random.normal((prompts, KV, prompt_capacity, HD)).astype(dtype) for _ in range(layers)]
    prompt_v = [mx.random.normal((prompts, KV, prompt_capacity, HD)).astype(dtype) for _ in range(layers)]
    generated = [mx.random.normal((rows, 2, KV, capacity, HD)).astype(dtype) for _ in range(layers)]
    qkv = [mx.random.normal((rows, (H + 2 * KV) * HD)).astype(dtype) for _ in range(layers)]
    window = mx.array([cuda_decode.NO_WINDOW], mx.int32)
    unit = mx.ones((HD,), dtype)
    mx.eval(prompt_k, prompt_v, generated, qkv, lens, inv_freq)
    kernels = {"this": cuda_decode.make_kernel(RMS_NORM_EPS, HD ** -0.5)}
    for path in args.compare:
        kernels[Path(path).stem] = cuda_decode.make_kernel(RMS_NORM_EPS, HD ** -0.5, *load_source(path))

    def calls(kernel, with_prompt, t):
        step = mx.array([t], mx.int32)
        prompt_len = lens if with_prompt else no_prompt
        return [kernel(inputs=[qkv[i], inv_freq, step, row_prompt, prompt_len, prompt_k[i], prompt_v[i], generated[i],
                               window, unit, unit],
                       template=[("T", dtype), ("H", H), ("KV", KV), ("HD", HD), ("QK_NORM", 1)],
                       grid=(H * HD, rows, 1), threadgroup=(HD, 1, 1), output_shapes=[(rows, H * HD)],
                       output_dtypes=[dtype])[0] for i in range(layers)]

    print(f"{rows} rows, heads {H}/{KV} x {HD}, prompts of {int(lens.min())}-{int(lens.max())} tokens")
    for case in args.cases.split(","):
        kind, t = case.split(":")
        if kind not in ("prompt", "none"):
            raise SystemExit(f"decode_kernel.py: case {case!r} is not prompt:T or none:T")
        t, line, reference = int(t), f"{case:<12}", None
        for name, kernel in kernels.items():
            out = calls(kernel, kind == "prompt", t)
            mx.eval(out)
            reference = out if reference is None else reference
            diff = max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() for a, b in zip(out, reference))
            times = []
            for _ in range(2):
                with profile(activities=[activity.CUDA]) as prof:
                    for _ in range(3):
                        mx.eval(calls(kernel, kind == "prompt", t))
                    mx.synchronize()
                timed = [(n, us) for k, (n, us) in cuda_profiler.gpu_time_by_kernel(prof, torch).items()
                         if "nanochat_decode_attention_" in k]
                times.append(sum(us for _, us in timed) / max(sum(n for n, _ in timed), 1))
            line += f" | {name}: {times[0]:6.1f}, {times[1]:6.1f} us per call (max |diff| {diff:.1e})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
