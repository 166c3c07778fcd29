"""Rollout sampling: the exact k-th largest logit (chunk maxima, then the chosen chunks), top-k masks, sampled
frequencies."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.generation.sampling import chunk_size, kth_largest_keys, make_rollout_sampler, ordered_keys, top_k_mask


def test_ordered_keys_sort_like_the_floats():
    x = mx.array([3.5, -0.0, 0.0, -1e-30, 1e-30, -2.0, float("inf"), -float("inf"), 7.25], dtype=mx.float32)
    keys = np.array(ordered_keys(x)).astype(np.int64)
    values = np.array(x)
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:
                assert keys[i] < keys[j]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_kth_largest_is_exact_for_every_k(dtype):
    mx.random.seed(1)
    logits = (mx.random.normal((3, 200)) * 4).astype(dtype)
    values = np.array(logits.astype(mx.float32))
    for k in (1, 2, 7, 50, 199, 200):
        kth = np.sort(values, axis=-1)[:, -k]
        mask = np.array(top_k_mask(logits, k))
        np.testing.assert_array_equal(mask, values >= kth[:, None])
        assert (mask.sum(-1) >= k).all()


@pytest.mark.parametrize("kind", ["normal", "few values", "mostly equal", "infinities"])
def test_kth_largest_keys_equal_a_sort_over_vocabularies_and_ks(kind):
    # Vocabularies that are not a multiple of the chunk (padded), every k up to the vocabulary, heavy ties.
    rng = np.random.default_rng(len(kind))
    for trial in range(40):
        vocab = int(rng.integers(2, 2500))
        k = int(rng.integers(1, vocab + 1)) if trial % 2 else int(rng.integers(1, min(vocab, 64) + 1))
        x = {"normal": lambda: rng.normal(size=(3, vocab)) * 4,
             "few values": lambda: rng.integers(-3, 4, size=(3, vocab)).astype(float),
             "mostly equal": lambda: np.where(rng.random((3, vocab)) < 0.01, 1.0, 0.0),
             "infinities": lambda: np.where(rng.random((3, vocab)) < 0.3, np.inf, rng.normal(size=(3, vocab)))}[kind]()
        for dtype in (mx.float32, mx.bfloat16):
            keys = ordered_keys(mx.array(x.astype(np.float32)).astype(dtype))
            want = np.sort(np.array(keys).astype(np.int64), axis=-1)[:, -k]
            np.testing.assert_array_equal(np.array(kth_largest_keys(keys, k))[:, 0], want)


def test_chunks_balance_the_two_sorts():
    assert chunk_size(65_536, 50) == 32  # 2,048 maxima, 1,600 keys of the chosen chunks: one sort block each
    assert chunk_size(151_936, 50) == 64
    assert chunk_size(100, 100) == 1 and chunk_size(100, 60) == 1  # k chunks must fit in the vocabulary


def test_ties_at_the_kth_value_are_kept():
    logits = mx.array([[5.0, 1.0, 3.0, 3.0, 3.0, 0.0]])
    assert np.array(top_k_mask(logits, 2)).tolist() == [[True, False, True, True, True, False]]
    zeros = mx.array([[1.0, 0.0, -0.0, -1.0]])  # -0.0 ties with +0.0
    assert np.array(top_k_mask(zeros, 2)).tolist() == [[True, True, True, False]]
    keys = ordered_keys(logits)
    assert np.array(kth_largest_keys(keys, 1)).item() == np.array(ordered_keys(mx.array(5.0))).item()


def test_top_k_sampling_draws_from_the_renormalised_top_k():
    probs = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.0001])
    logits = mx.log(mx.array(np.tile(probs, (40000, 1)), dtype=mx.float32))
    mx.random.seed(0)
    tokens = np.array(make_rollout_sampler(1.0, top_k=3)(logits))
    freq = np.bincount(tokens, minlength=6) / len(tokens)
    np.testing.assert_allclose(freq, [0, 0, 0.2 / 0.85, 0.3 / 0.85, 0.35 / 0.85, 0], atol=0.01)
    # Temperature 2 on the same top 3: probabilities proportional to sqrt(p).
    tokens = np.array(make_rollout_sampler(2.0, top_k=3)(logits))
    freq = np.bincount(tokens, minlength=6) / len(tokens)
    want = np.sqrt(probs[2:5]) / np.sqrt(probs[2:5]).sum()
    np.testing.assert_allclose(freq[2:5], want, atol=0.01)


def test_each_call_draws_fresh_samples():
    logits = mx.zeros((64, 100))
    sampler = make_rollout_sampler(1.0, top_k=50)
    first, second = np.array(sampler(logits)), np.array(sampler(logits))
    assert (first != second).any() and first.dtype == np.int32


def test_greedy_and_the_mlx_lm_fallback():
    logits = mx.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert np.array(make_rollout_sampler(0.0)(logits)).tolist() == [1, 0]
    top_p = make_rollout_sampler(1.0, top_p=0.5)
    assert not top_p.fused
    big = mx.array([[0.0, 10.0, 0.0], [10.0, 0.0, 0.0]])
    assert np.array(top_p(big)).tolist() == [1, 0]  # top-p 0.5 keeps only the dominant token
