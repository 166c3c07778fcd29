"""Rollout sampling: the exact k-th largest logit by bisection, top-k masks, sampled frequencies."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.generation.sampling import kth_largest_keys, make_rollout_sampler, ordered_keys, top_k_mask


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
