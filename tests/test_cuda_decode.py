"""utils/cuda_kernels/decode.py: the kernel's math (emulated here) against MLX's own ops; the kernel itself and
the decoder that uses it only where MLX's CUDA backend runs (the GPU machine)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import bench_main

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import decode as cuda_decode
from mlx_grpo.models import load_model
from mlx_grpo.nanochat import decoder as nanochat_decode

on_cuda = pytest.mark.skipif(not cuda_kernels.runs_on_cuda_gpu(), reason="needs MLX's CUDA backend")


def emulate(qkv, inv_freq, t, row_prompt, prompt_len, prompt_k, prompt_v, generated_kv, heads, kv_heads, head_dim,
            window=None, scale=None, pre_rope_norm=None):
    """The kernel's arithmetic in float64 NumPy: (attention output, new keys, new values). window: the query at
    position p reads the keys p-window..p (None: all); scale: the softmax scale (None: 1/sqrt(head_dim));
    pre_rope_norm: (q weight, k weight) of RMSNorms before RoPE (Qwen3's) instead of nanochat's after it."""
    rows, half, group = qkv.shape[0], head_dim // 2, heads // kv_heads
    x = qkv.reshape(rows, heads + 2 * kv_heads, head_dim).astype(np.float64)
    eps = nanochat_decode.RMS_NORM_EPS
    if pre_rope_norm is not None:
        qk = x[:, :heads + kv_heads] / np.sqrt((x[:, :heads + kv_heads] ** 2).mean(-1, keepdims=True) + eps)
        weights = np.concatenate([np.tile(pre_rope_norm[0], (heads, 1)), np.tile(pre_rope_norm[1], (kv_heads, 1))])
        x = np.concatenate([qk * weights, x[:, heads + kv_heads:]], axis=1)
    angle = (prompt_len[row_prompt] + t)[:, None, None] * inv_freq[None, None, :].astype(np.float64)
    a, b = x[:, :heads + kv_heads, :half], x[:, :heads + kv_heads, half:]
    rotated = np.concatenate([a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)], -1)
    normed = rotated if pre_rope_norm is not None else rotated / np.sqrt((rotated ** 2).mean(-1, keepdims=True) + eps)
    q, k_new, v_new = normed[:, :heads], normed[:, heads:], x[:, heads + kv_heads:]
    out = np.zeros((rows, heads, head_dim))
    scale = head_dim ** -0.5 if scale is None else scale
    for r in range(rows):
        p = row_prompt[r]
        n = prompt_len[p]
        first = 0 if window is None else max(0, n + t - window)  # the positions of keys read: first .. n + t
        for h in range(heads):
            kvh = h // group
            keys = np.concatenate([prompt_k[p, kvh, :n], generated_kv[r, 0, kvh, :t], k_new[r, kvh][None]])[first:]
            values = np.concatenate([prompt_v[p, kvh, :n], generated_kv[r, 1, kvh, :t], v_new[r, kvh][None]])[first:]
            scores = keys.astype(np.float64) @ q[r, h] * scale
            weights = np.exp(scores - scores.max())
            out[r, h] = weights @ values.astype(np.float64) / weights.sum()
    return out.reshape(rows, -1), k_new, v_new


def random_case(dtype=np.float32, heads=4, kv_heads=2, head_dim=32, prompts=3, group=2, t=5, seed=0,
                prompt_lens=(7, 0, 4), capacity=9):
    rng = np.random.default_rng(seed)
    rows, lmax = prompts * group, max(prompt_lens)
    case = dict(
        qkv=rng.normal(size=(rows, (heads + 2 * kv_heads) * head_dim)).astype(dtype),
        inv_freq=(1.0 / -np.exp(np.arange(head_dim // 2) * np.log(10000.0) / (head_dim // 2))).astype(np.float32),
        t=t, row_prompt=np.repeat(np.arange(prompts), group).astype(np.int32),
        prompt_len=np.array(prompt_lens[:prompts], dtype=np.int32),
        prompt_k=rng.normal(size=(prompts, kv_heads, lmax, head_dim)).astype(dtype),
        prompt_v=rng.normal(size=(prompts, kv_heads, lmax, head_dim)).astype(dtype),
        generated_kv=rng.normal(size=(rows, 2, kv_heads, capacity, head_dim)).astype(dtype),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    return case


@pytest.mark.parametrize("window, scale", [(None, None), (3, 0.3)])
def test_emulation_matches_mlx_rope_norm_and_attention(window, scale):
    """The kernel's formulas (RoPE from inverse frequencies, QK norm, attention over prompt + own keys, a
    window, a scale) are those of the nanochat attentions: checked against mx.fast.rope / rms_norm / sdpa."""
    c = random_case()
    out, k_new, v_new = emulate(**c, window=window, scale=scale)
    heads, kv_heads, hd = c["heads"], c["kv_heads"], c["head_dim"]
    rows = c["qkv"].shape[0]
    x = mx.array(c["qkv"]).reshape(rows, heads + 2 * kv_heads, 1, hd)
    freqs = mx.array(1.0 / c["inv_freq"])  # mlx-lm's nanochat passes (negated) periods as freqs
    positions = mx.array(c["prompt_len"][c["row_prompt"]] + c["t"])
    qk = mx.fast.rms_norm(mx.fast.rope(x[:, :heads + kv_heads], hd, traditional=False, base=None, scale=1.0,
                                       offset=positions, freqs=freqs), None, nanochat_decode.RMS_NORM_EPS)
    np.testing.assert_allclose(np.array(qk[:, heads:, 0]), k_new, atol=2e-5)
    for r in range(rows):
        p = c["row_prompt"][r]
        n = c["prompt_len"][p]
        keys = mx.concatenate([mx.array(c["prompt_k"][p, :, :n]), mx.array(c["generated_kv"][r, 0, :, :c["t"]]),
                               qk[r, heads:]], axis=1)
        values = mx.concatenate([mx.array(c["prompt_v"][p, :, :n]), mx.array(c["generated_kv"][r, 1, :, :c["t"]]),
                                 x[r, heads + kv_heads:]], axis=1)
        if window is not None:  # the query sits at position n + t: it reads n + t - window .. n + t
            keys, values = keys[:, max(0, n + c["t"] - window):], values[:, max(0, n + c["t"] - window):]
        ref = mx.fast.scaled_dot_product_attention(qk[r:r + 1, :heads], keys[None], values[None],
                                                   scale=hd ** -0.5 if scale is None else scale)
        np.testing.assert_allclose(np.array(ref).reshape(-1), out[r], atol=2e-5)


def test_use_kernel_true_needs_cuda_and_the_switch_on(tiny_model_dir):
    model = load_model(tiny_model_dir)[0]
    cuda_kernels.set_enabled(False)  # off on every backend, so this runs on the GPU machine too
    try:
        with pytest.raises(ValueError, match="use_kernel=True needs MLX's CUDA backend"):
            nanochat_decode.NanochatDecoder(model, [[1, 2, 3]], 2, 4, use_kernel=True)
    finally:
        cuda_kernels.set_enabled(True)


@on_cuda
@pytest.mark.parametrize("dtype, window, scale", [(np.float32, None, None), ("bfloat16", None, None),
                                                  (np.float32, 3, 0.3), (np.float32, 9, 0.3), ("bfloat16", 4, None)])
def test_kernel_matches_emulation_and_writes_its_column(dtype, window, scale):
    check_kernel_against_emulation(random_case(np.float32), dtype, window, scale)


@on_cuda
@pytest.mark.parametrize("dtype, head_dim, window", [("bfloat16", 128, None), (np.float32, 128, None),
                                                     ("bfloat16", 64, 70), (np.float32, 256, None)])
def test_kernel_matches_emulation_over_many_passes_of_keys(dtype, head_dim, window):
    """Contexts of hundreds of keys: many passes of the kernel's 16 key slots, with the next pass's loads in
    flight, at the lane-group widths of several head dims."""
    case = random_case(np.float32, head_dim=head_dim, t=170, prompt_lens=(150, 0, 97), capacity=200)
    check_kernel_against_emulation(case, dtype, window, None)


def check_kernel_against_emulation(c, dtype, window, scale):
    arrays = {k: mx.array(v) for k, v in c.items() if isinstance(v, np.ndarray)}
    if dtype == "bfloat16":
        for k in ("qkv", "prompt_k", "prompt_v", "generated_kv"):
            arrays[k] = arrays[k].astype(mx.bfloat16)
            c[k] = np.array(arrays[k].astype(mx.float32))
    generated = arrays["generated_kv"]
    out = cuda_decode.decode_attention(arrays["qkv"], arrays["inv_freq"], mx.array([c["t"]], dtype=mx.int32),
                                       arrays["row_prompt"], arrays["prompt_len"], arrays["prompt_k"],
                                       arrays["prompt_v"], generated, mx.array([cuda_decode.window_arg(window)]),
                                       c["heads"], c["kv_heads"], c["head_dim"], nanochat_decode.RMS_NORM_EPS,
                                       c["head_dim"] ** -0.5 if scale is None else scale)
    mx.eval(out)
    expected, k_new, v_new = emulate(**c, window=window, scale=scale)
    tol = 1e-4 if dtype == np.float32 else 3e-2
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=tol, rtol=tol)
    written = np.array(generated.astype(mx.float32))
    np.testing.assert_allclose(written[:, 0, :, c["t"]], k_new, atol=tol, rtol=tol)
    np.testing.assert_allclose(written[:, 1, :, c["t"]], v_new, atol=tol, rtol=tol)
    np.testing.assert_array_equal(written[:, :, :, :c["t"]], c["generated_kv"][:, :, :, :c["t"]])


def test_emulation_of_the_norms_before_rope_matches_mlx():
    """The pre_rope_norm formulas are mx.fast.rms_norm with the weights, then mx.fast.rope (mlx-lm's Qwen3)."""
    c = random_case()
    heads, kv_heads, hd = c["heads"], c["kv_heads"], c["head_dim"]
    weights = [np.linspace(0.5, 1.5, hd, dtype=np.float32), np.linspace(1.5, 0.5, hd, dtype=np.float32)]
    _, k_new, v_new = emulate(**c, pre_rope_norm=weights)
    rows = c["qkv"].shape[0]
    x = mx.array(c["qkv"]).reshape(rows, heads + 2 * kv_heads, 1, hd)
    k = mx.fast.rms_norm(x[:, heads:heads + kv_heads], mx.array(weights[1]), nanochat_decode.RMS_NORM_EPS)
    positions = mx.array(c["prompt_len"][c["row_prompt"]] + c["t"])
    k = mx.fast.rope(k, hd, traditional=False, base=None, scale=1.0, offset=positions,
                     freqs=mx.array(1.0 / c["inv_freq"]))
    np.testing.assert_allclose(np.array(k[:, :, 0]), k_new, atol=2e-5)
    np.testing.assert_allclose(np.array(x[:, heads + kv_heads:, 0]), v_new, atol=0)


@on_cuda
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_kernel_norms_before_rope_with_weights(dtype):
    """Qwen3's layout: q and k RMSNormed with their weights before RoPE, no norm after it."""
    c = random_case(np.float32)
    rng = np.random.default_rng(1)
    weights = [rng.uniform(0.5, 1.5, size=c["head_dim"]).astype(np.float32) for _ in range(2)]
    arrays = {k: mx.array(v) for k, v in c.items() if isinstance(v, np.ndarray)}
    mx_weights = [mx.array(w) for w in weights]
    if dtype == "bfloat16":
        for k in ("qkv", "prompt_k", "prompt_v", "generated_kv"):
            arrays[k] = arrays[k].astype(mx.bfloat16)
            c[k] = np.array(arrays[k].astype(mx.float32))
        mx_weights = [w.astype(mx.bfloat16) for w in mx_weights]
        weights = [np.array(w.astype(mx.float32)) for w in mx_weights]
    out = cuda_decode.decode_attention(arrays["qkv"], arrays["inv_freq"], mx.array([c["t"]], dtype=mx.int32),
                                       arrays["row_prompt"], arrays["prompt_len"], arrays["prompt_k"],
                                       arrays["prompt_v"], arrays["generated_kv"],
                                       mx.array([cuda_decode.NO_WINDOW]), c["heads"], c["kv_heads"], c["head_dim"],
                                       nanochat_decode.RMS_NORM_EPS, c["head_dim"] ** -0.5, qk_norm=False,
                                       pre_rope_norm=tuple(mx_weights))
    mx.eval(out)
    expected, k_new, _ = emulate(**c, pre_rope_norm=weights)
    tol = 1e-4 if dtype == np.float32 else 3e-2
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=tol, rtol=tol)
    written = np.array(arrays["generated_kv"].astype(mx.float32))
    np.testing.assert_allclose(written[:, 0, :, c["t"]], k_new, atol=tol, rtol=tol)


def test_the_kernel_takes_one_qk_norm():
    c = random_case(np.float32)
    with pytest.raises(ValueError, match="pre_rope_norm replaces"):
        cuda_decode.decode_attention(mx.array(c["qkv"]), None, None, None, None, None, None, None, None, 4, 2, 32,
                                     1e-5, 0.1, qk_norm=True, pre_rope_norm=(mx.ones(32), mx.ones(32)))


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decoder_with_kernel_matches_portable_decoder(tiny_model_dir, dtype):
    model = load_model(tiny_model_dir)[0]
    model.set_dtype(dtype)
    assert_kernel_decodes_as_portable(model, [[1, 5, 9, 11, 3], [2, 7], [4]], dtype, steps=8, filter_at=4)


def assert_kernel_decodes_as_portable(model, prompts, dtype, steps, filter_at, group=2):
    """NanochatDecoder with the kernel and without (model in `dtype`), stepped on the portable one's greedy
    tokens; rows 0, 3, 5 leave the batch at step filter_at."""
    decoders = [nanochat_decode.NanochatDecoder(model, prompts, group, steps, use_kernel=k) for k in (True, False)]
    assert decoders[0].use_kernel and not decoders[1].use_kernel
    tokens = mx.array([p[-1] for p in prompts for _ in range(group)], dtype=mx.int32)
    # MLX's CUDA attention and matmuls run float32 at TF32-like precision
    tol = 1e-2 if dtype == mx.float32 else 0.15
    for t in range(steps):
        if t == filter_at:
            keep = mx.array([0, 3, 5])
            tokens = tokens[keep]
            for d in decoders:
                d.filter(keep)
        fast, slow = (d.step(tokens) for d in decoders)
        np.testing.assert_allclose(np.array(fast.astype(mx.float32)), np.array(slow.astype(mx.float32)), atol=tol)
        tokens = mx.argmax(slow, axis=-1).astype(mx.int32)


def test_the_kernel_takes_the_decoders_epsilon_and_scale():
    source = cuda_decode.kernel_source(nanochat_decode.RMS_NORM_EPS, 0.125)
    assert "constexpr float EPS_ = 1e-05f;" in source and "RMS_NORM_EPS" not in source
    assert "constexpr float SCALE_ = 0.125f;" in source and "SOFTMAX_SCALE" not in source
    assert cuda_decode.kernel_source(1e-6, 0.125) != source != cuda_decode.kernel_source(1e-5, 0.1)


@pytest.mark.skipif(cuda_kernels.runs_on_cuda_gpu(), reason="off CUDA only")
def test_kernel_profile_says_in_one_line_what_it_needs():
    with pytest.raises(SystemExit, match="kernel_profile.py: needs"):
        bench_main("kernel_profile.py", ["--depth", "2"])


@pytest.mark.skipif(cuda_kernels.runs_on_cuda_gpu(), reason="off CUDA only")
def test_capacity_profile_says_in_one_line_what_it_needs():
    with pytest.raises(SystemExit, match="capacity_profile.py: needs"):
        bench_main("capacity_profile.py", ["--depth", "2"])


@pytest.mark.skipif(cuda_kernels.runs_on_cuda_gpu(), reason="off CUDA only")
def test_decode_kernel_bench_says_in_one_line_what_it_needs():
    with pytest.raises(SystemExit, match="decode_kernel.py: needs"):
        bench_main("decode_kernel.py", ["--cases", "none:0"])


def test_decode_kernel_bench_reads_another_copy_of_the_kernel(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    from decode_kernel import load_source

    assert load_source(cuda_decode.__file__) == (cuda_decode._HEADER, cuda_decode._SOURCE)


def test_rollout_alternation_takes_turns_and_restores_the_switches():
    before = nanochat_decode.masked_attention_by_hand
    argv = ["--paths", "portable,portable-fused", "--depth", "2", "--vocab", "512", "--prompts", "2", "--group", "2",
            "--new-tokens", "3", "--rounds", "1"]
    rates = bench_main("rollout_alternation.py", argv)
    assert set(rates) == {"portable", "portable-fused"} and all(len(v) == 1 and v[0] > 0 for v in rates.values())
    assert nanochat_decode.masked_attention_by_hand is before and cuda_kernels.enabled()


def test_rollout_alternation_compares_another_checkouts_portable_path(tmp_path):
    argv = ["--paths", "portable,portable-compared", "--compare-tree", str(Path(__file__).parents[1]), "--depth", "2",
            "--vocab", "512", "--prompts", "2", "--group", "2", "--new-tokens", "3", "--rounds", "1"]
    rates = bench_main("rollout_alternation.py", argv)
    assert set(rates) == {"portable", "portable-compared"} and all(v[0] > 0 for v in rates.values())
    with pytest.raises(SystemExit, match="has no utils/generation/engine.py"):
        bench_main("rollout_alternation.py", ["--paths", "portable-compared", "--compare-tree", str(tmp_path)])


@pytest.mark.skipif(cuda_kernels.runs_on_cuda_gpu(), reason="off CUDA only")
def test_rollout_alternation_says_what_the_kernel_paths_need():
    with pytest.raises(SystemExit, match="kernel paths need MLX's CUDA backend"):
        bench_main("rollout_alternation.py", ["--paths", "kernel,portable", "--depth", "2"])


def test_rollout_in_step_times_the_steps_rollouts_and_direct_ones():
    argv = ["--depth", "2", "--vocab", "512", "--prompts", "2", "--group", "2", "--new-tokens", "3",
            "--micro-batch-size", "4", "--no-cuda-kernels"]
    rates = bench_main("rollout_in_step.py", argv)
    assert len(rates) == 17 and all(rate > 0 for _, rate in rates)
    assert rates[0][0].startswith("direct") and rates[3][0].startswith("sample_rollouts")
    assert cuda_kernels.enabled()
