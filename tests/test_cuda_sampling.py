"""mlx_grpo.cuda_kernels.sampling: a NumPy emulation of the kernel's algorithm (same radix select, same Philox
draws) checked against mlx_grpo.generation.sampling here, and the real kernel checked against the emulation on a
CUDA machine (skipped elsewhere)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import sampling as cuda_sampling
from mlx_grpo.cuda_kernels.sampling import sample_top_k
from mlx_grpo.generation.sampling import ordered_keys, top_k_mask

from conftest import bench_main

PHILOX_KEY_HI = np.uint32(cuda_sampling._PHILOX_KEY_HI)
on_cuda = pytest.mark.skipif(not cuda_kernels.runs_on_cuda_gpu(),
                             reason="needs MLX's CUDA backend with the GPU as default device")


def chi2_critical(dof, z=4.7534):
    """The chi-square quantile at 1 - 1e-6 (z is the normal one) by Wilson-Hilferty: no scipy needed."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


# ---- NumPy emulation of the kernel ----

def philox4x32_10(counters: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """(n, 4) uint32 counters -> (n, 4) uint32 outputs (Random123's Philox-4x32-10)."""
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    mask = np.uint64(0xFFFFFFFF)
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return np.stack(c, axis=1).astype(np.uint32)


def bits_and_values(logits: mx.array):
    """(raw bits as uint32, values as float32, key width) of MLX logits."""
    if logits.dtype == mx.float32:
        bits = np.array(logits.view(mx.uint32))
        return bits, bits.view(np.float32), 32
    bits = np.array(logits.view(mx.uint16)).astype(np.uint32)
    if logits.dtype == mx.bfloat16:
        return bits, (bits << np.uint32(16)).view(np.float32), 16
    return bits, bits.astype(np.uint16).view(np.float16).astype(np.float32), 16


def keys_of(logits: mx.array) -> np.ndarray:
    bits, _, width = bits_and_values(logits)
    sign, full = np.uint32(1 << (width - 1)), np.uint32((1 << width) - 1)
    inf_bits = np.uint32({mx.bfloat16: 0x7F80, mx.float16: 0x7C00, mx.float32: 0x7F800000}[logits.dtype])
    bits = np.where(bits == sign, np.uint32(0), bits)  # -0.0 -> +0.0
    keys = np.where(bits & sign, ~bits & full, bits | sign).astype(np.uint32)
    return np.where((bits & (sign - np.uint32(1))) > inf_bits, np.uint32(0), keys)  # NaN -> 0


def radix_thresholds(keys: np.ndarray, k: int, width: int) -> np.ndarray:
    """The kernel's radix select per row: 8-bit digits from the top, the bin holding the k-th largest."""
    rows = keys.shape[0]
    prefix = np.zeros((rows, 1), dtype=np.int64)
    prefix_mask, k_left = 0, np.full(rows, k, dtype=np.int64)
    keys = keys.astype(np.int64)
    for shift in range(width - 8, -1, -8):
        counted = (keys & prefix_mask) == prefix
        slots = (np.arange(rows)[:, None] * 256 + ((keys >> shift) & 255))[counted]
        totals = np.bincount(slots, minlength=rows * 256).reshape(rows, 256)
        above = np.cumsum(totals[:, ::-1], axis=1)[:, ::-1] - totals  # count in higher bins
        hit = (above < k_left[:, None]) & (k_left[:, None] <= above + totals)
        assert (hit.sum(axis=1) == 1).all()
        chosen = hit.argmax(axis=1)
        prefix |= (chosen << shift)[:, None]
        prefix_mask |= 255 << shift
        k_left -= above[np.arange(rows), chosen]
    return prefix[:, 0]


def emulated_kept(logits: mx.array, top_k: int) -> np.ndarray:
    keys = keys_of(logits)
    if not 0 < top_k < keys.shape[1]:
        return np.ones(keys.shape, dtype=bool)
    width = 32 if logits.dtype == mx.float32 else 16
    return keys >= radix_thresholds(keys, top_k, width)[:, None]


def gumbel(r: np.ndarray) -> np.ndarray:
    u = ((r >> np.uint32(9)).astype(np.float32) * np.float32(2.0**-23) + np.float32(2.0**-24)).astype(np.float32)
    return -np.log(-np.log(u))


def emulated_sample(logits: mx.array, temperature: float, top_k: int, seed: int) -> np.ndarray:
    _, values, _ = bits_and_values(logits)
    kept = emulated_kept(logits, top_k)
    rows, idx = np.nonzero(kept)
    counters = np.zeros((len(idx), 4), dtype=np.uint32)
    counters[:, 0], counters[:, 1] = idx >> 2, rows
    r = philox4x32_10(counters, seed, PHILOX_KEY_HI)[np.arange(len(idx)), idx & 3]
    scores = np.full(values.shape, np.nan, dtype=np.float32)
    scores[rows, idx] = (values[rows, idx] * np.float32(1.0 / temperature)).astype(np.float32) + gumbel(r)
    valid = ~np.isnan(scores)  # NaN logits and dropped ones never win
    best = np.where(valid, scores, -np.inf).max(axis=1, keepdims=True)
    return (valid & (scores == best)).argmax(axis=1).astype(np.int32)  # lowest index on ties; 0 if none


def tied_logits(rows, vocab, dtype, seed=0):
    """Random logits with many exact ties and both zeros."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0, 3, (rows, vocab)) * 2) / 2
    x[:, ::7] = 0.0
    x[:, 3::11] = -0.0
    return mx.array(x.astype(np.float32)).astype(dtype)


def expected_probabilities(logits_row: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    logits = mx.array(logits_row[None])
    mask = np.array(top_k_mask(logits, top_k))[0] if 0 < top_k < logits_row.size else np.ones(logits_row.size, bool)
    z = np.where(mask, logits_row.astype(np.float64) / temperature, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


def assert_frequencies(tokens: np.ndarray, probabilities: np.ndarray):
    counts = np.bincount(tokens, minlength=probabilities.size)
    assert counts[probabilities == 0].sum() == 0, "drew a token outside the kept set"
    support = probabilities > 0
    expected = probabilities[support] * tokens.size
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    assert statistic < chi2_critical(max(1, support.sum() - 1)), (counts, expected)


# ---- the emulation against mlx_grpo.generation.sampling (runs everywhere) ----

def test_philox_matches_random123_known_answers():
    counters = np.array([[0, 0, 0, 0], [0xFFFFFFFF] * 4], dtype=np.uint32)
    assert philox4x32_10(counters[:1], 0, 0).tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]]
    assert philox4x32_10(counters[1:], 0xFFFFFFFF, 0xFFFFFFFF).tolist() == [
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]]
    pi_digits = np.array([[0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]], dtype=np.uint32)
    assert philox4x32_10(pi_digits, 0xA4093822, 0x299F31D0).tolist() == [
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_emulated_keys_are_utils_sampling_keys(dtype):
    logits = tied_logits(3, 500, dtype)
    np.testing.assert_array_equal(keys_of(logits), np.array(ordered_keys(logits)).astype(np.uint32))


def test_gumbel_uniforms_stay_strictly_inside_zero_one():
    extremes = gumbel(np.array([0, 0xFFFFFFFF], dtype=np.uint32))
    assert np.all(np.isfinite(extremes)) and extremes[0] < extremes[1]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("top_k", [1, 2, 5, 50, 299, 300, 0])
def test_radix_select_keeps_what_top_k_mask_keeps(dtype, top_k):
    logits = tied_logits(6, 300, dtype, seed=top_k)
    expected = np.array(top_k_mask(logits, top_k)) if 0 < top_k < 300 else np.ones((6, 300), bool)
    np.testing.assert_array_equal(emulated_kept(logits, top_k), expected)


def test_radix_select_on_negative_and_extreme_rows():
    x = np.array([[-0.0, 0.0, -1e-30, 1e-30, -np.inf, np.inf, -3.0, 3.0],
                  [-5.0, -5.0, -5.0, -6.0, -np.inf, -np.inf, -7.0, -5.0]], dtype=np.float32)
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        logits = mx.array(x).astype(dtype)
        for k in range(1, 8):
            np.testing.assert_array_equal(emulated_kept(logits, k), np.array(top_k_mask(logits, k)))


def test_nan_never_takes_a_place_nor_gets_drawn():
    x = np.array([[np.nan, 1.0, 2.0, -np.nan, 0.5], [np.nan] * 5], dtype=np.float32)
    for dtype in (mx.float32, mx.bfloat16):
        logits = mx.array(x).astype(dtype)
        np.testing.assert_array_equal(emulated_kept(logits, 2)[0], [False, True, True, False, False])
        tokens = [emulated_sample(logits, 1.0, 2, seed)[0] for seed in range(40)]
        assert set(tokens) == {1, 2}
        assert emulated_sample(logits, 1.0, 2, 0)[1] == 0  # a row of only NaN gives token 0


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("top_k,temperature", [(2, 0.7), (5, 1.3), (0, 1.0), (12, 2.0), (1, 1.0)])
def test_emulated_draws_follow_the_top_k_softmax(dtype, top_k, temperature):
    row = np.array([3.0, 2.5, 2.5, 2.5, 1.0, 0.0, -0.0, -1.0, 0.5, 0.0, -2.0, 2.0], dtype=np.float32)
    rows = 20000
    logits = mx.array(np.tile(row, (rows, 1))).astype(dtype)  # rows draw independently (row is in the counter)
    tokens = emulated_sample(logits, temperature, top_k, seed=1234 + top_k)
    assert_frequencies(tokens, expected_probabilities(np.array(logits[0].astype(mx.float32)), temperature, top_k))


def test_seeds_give_different_draws():
    logits = mx.zeros((64, 32))
    assert not np.array_equal(emulated_sample(logits, 1.0, 0, 1), emulated_sample(logits, 1.0, 0, 2))


# ---- the Python API (runs everywhere) ----

def test_available_says_whether_mlx_runs_on_its_cuda_backends_gpu(monkeypatch):
    monkeypatch.delenv(cuda_kernels.ENV_VAR, raising=False)
    cuda = getattr(mx, "cuda", None)
    on_cuda_gpu = cuda is not None and cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu
    assert cuda_kernels.runs_on_cuda_gpu() is on_cuda_gpu
    assert cuda_kernels.available() is on_cuda_gpu  # on by default wherever the kernels can run
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # the CPU as default device: never the kernels, on any backend
    try:
        assert cuda_kernels.runs_on_cuda_gpu() is False and cuda_kernels.available() is False
    finally:
        mx.set_default_device(device)


@pytest.mark.skipif(cuda_kernels.runs_on_cuda_gpu(), reason="off CUDA only")
def test_sampling_blocks_bench_says_in_one_line_what_it_needs():
    with pytest.raises(SystemExit, match="sampling_blocks.py: needs"):
        bench_main("sampling_blocks.py", ["--rows", "4"])


def test_launch_bounds_header_puts_the_bounds_on_the_kernel_that_follows():
    header = cuda_kernels.launch_bounds_header(512, 2)
    assert header.startswith("#undef __global__\n")  # MLX writes the kernel's signature with __global__
    assert "#define __global__ __attribute__((global)) __launch_bounds__(512, 2)" in header


@pytest.mark.parametrize("args,message", [
    ((mx.zeros((4,)), 1.0, 5), "rows, vocab"),
    ((mx.zeros((2, 4), dtype=mx.int32), 1.0, 5), "dtype"),
    ((mx.zeros((2, 4)), 0.0, 5), "temperature"),
    ((mx.zeros((2, 4)), -1.0, 5), "temperature"),
    ((mx.zeros((2, 4)), float("nan"), 5), "temperature"),
    ((mx.zeros((2, 4)), 1.0, -1), "top_k"),
    ((mx.zeros((2, 0)), 1.0, 5), "vocab"),
])
def test_bad_inputs_raise_value_errors(args, message):
    with pytest.raises(ValueError, match=message):
        sample_top_k(*args, seed=mx.array([1], dtype=mx.uint32))


def test_bad_seed_raises_value_error():
    with pytest.raises(ValueError, match="seed"):
        sample_top_k(mx.zeros((2, 4)), 1.0, 2, seed=mx.array([1, 2], dtype=mx.uint32))
    with pytest.raises(ValueError, match="seed"):
        sample_top_k(mx.zeros((2, 4)), 1.0, 2, seed=mx.array([1], dtype=mx.int32))


# ---- the real kernel (CUDA only) ----

@on_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("top_k", [50, 1, 0, 3000])
def test_kernel_matches_the_emulation(dtype, top_k):
    logits = tied_logits(48, 65536, dtype, seed=7)
    seed = 987654321
    tokens = np.array(sample_top_k(logits, 0.8, top_k, mx.array([seed], dtype=mx.uint32)))
    expected = emulated_sample(logits, 0.8, top_k, seed)
    assert (tokens != expected).sum() <= 1  # a last-ulp difference of logf may flip a near-tie
    if 0 < top_k < 65536:
        assert np.array(top_k_mask(logits, top_k))[np.arange(48), tokens].all()


@on_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_kernel_matches_the_emulation_with_many_rows(dtype):
    logits = tied_logits(300, 65536, dtype, seed=11)  # many rows: the smaller thread blocks
    tokens = np.array(sample_top_k(logits, 1.0, 50, mx.array([4242], dtype=mx.uint32)))
    assert (tokens != emulated_sample(logits, 1.0, 50, 4242)).sum() <= 1


@on_cuda
@pytest.mark.parametrize("block", [256, 512, 1024])
def test_kernel_gives_the_same_draws_at_every_block_size(block, monkeypatch):
    monkeypatch.setattr(cuda_sampling, "_block_size", lambda rows: block)  # 1024 needs the launch bounds
    logits = tied_logits(64, 1001, mx.bfloat16, seed=5)
    tokens = np.array(sample_top_k(logits, 0.9, 20, mx.array([77], dtype=mx.uint32)))
    np.testing.assert_array_equal(tokens, emulated_sample(logits, 0.9, 20, 77))


@on_cuda
@pytest.mark.parametrize("vocab", [12, 1001])
def test_kernel_handles_odd_vocab_and_offset_rows(vocab):
    big = tied_logits(65, vocab, mx.bfloat16, seed=3)
    logits = big[1:]  # starts one row in: an unaligned start when vocab * 2 is not a multiple of 16
    tokens = np.array(sample_top_k(logits, 1.1, 7, mx.array([5], dtype=mx.uint32)))
    np.testing.assert_array_equal(tokens, emulated_sample(logits, 1.1, 7, 5))


@on_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("top_k,temperature", [(2, 0.7), (5, 1.3), (0, 1.0)])
def test_kernel_draws_follow_the_top_k_softmax(dtype, top_k, temperature):
    row = np.array([3.0, 2.5, 2.5, 2.5, 1.0, 0.0, -0.0, -1.0, 0.5, 0.0, -2.0, 2.0], dtype=np.float32)
    logits = mx.array(np.tile(row, (20000, 1))).astype(dtype)
    tokens = np.array(sample_top_k(logits, temperature, top_k, mx.array([99], dtype=mx.uint32)))
    assert_frequencies(tokens, expected_probabilities(np.array(logits[0].astype(mx.float32)), temperature, top_k))


@on_cuda
def test_kernel_nan_rows_and_fresh_seeds():
    x = mx.array(np.array([[np.nan, 1.0, 2.0, -np.nan, 0.5], [np.nan] * 5], dtype=np.float32))
    draws = {int(sample_top_k(x, 1.0, 2, mx.array([s], dtype=mx.uint32))[0]) for s in range(40)}
    assert draws == {1, 2}
    assert int(sample_top_k(x, 1.0, 2, mx.array([0], dtype=mx.uint32))[1]) == 0
    flat = mx.zeros((256, 65536), dtype=mx.bfloat16)
    a = sample_top_k(flat, 1.0, 50, mx.array([1], dtype=mx.uint32))
    b = sample_top_k(flat, 1.0, 50, mx.array([2], dtype=mx.uint32))
    assert not mx.array_equal(a, b).item()
