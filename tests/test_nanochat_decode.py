"""The fast nanochat decode step against mlx-lm's own model call on the same caches."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_grpo.config import GRPOConfig
from mlx_grpo.generation.engine import MlxLmDecoder, generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.models import load_model
from mlx_grpo.nanochat import decoder as nanochat_decode
from mlx_grpo.training.lora import add_adapters


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)[0]


PROMPTS = [[1, 5, 9, 11, 3], [2, 7], [4, 4, 8, 1]]  # three lengths: left padding is exercised


def run_steps(decoder, tokens, steps, keep_after=None, keep=None):
    out = []
    for t in range(steps):
        if t == keep_after:
            decoder.filter(mx.array(keep))
            tokens = tokens[mx.array(keep)]
        logits = decoder.step(tokens)
        out.append(np.array(logits))
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    return out


def assert_same_logits(model, prompts, group_size, steps, atol=2e-4, rtol=1e-4, alternate_buffers=False,
                       **filtering):
    """Greedy decode on both decoders from the same first tokens; every step's logits must agree."""
    first = mx.array([p[-1] for p in prompts for _ in range(group_size)], dtype=mx.int32)
    fast = nanochat_decode.NanochatDecoder(model, prompts, group_size, steps, alternate_buffers=alternate_buffers)
    slow = MlxLmDecoder(model, prompts, group_size)
    for a, b in zip(run_steps(fast, first, steps, **filtering), run_steps(slow, first, steps, **filtering)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)
    return fast


def test_constants_are_mlx_lms():
    from mlx_lm.models import nanochat

    # Values of 1e-3: mean square 1e-6, so the epsilon (1e-5) decides the result; 1e-6 would be off 5x.
    x = mx.array([[1e-3, -1e-3, 2e-3, 0.0]])
    theirs = np.array(nanochat.rms_norm(x))
    assert np.allclose(theirs, np.array(mx.fast.rms_norm(x, None, nanochat_decode.RMS_NORM_EPS)), rtol=1e-6, atol=0)
    assert not np.allclose(theirs, np.array(mx.fast.rms_norm(x, None, 1e-6)), rtol=1e-3)
    logits = mx.array([[-40.0, -3.0, 0.5, 20.0]])
    cap = nanochat_decode.SOFTCAP
    assert np.allclose(np.array(nanochat.softcap(logits)), np.array(cap * mx.tanh(logits / cap)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_norm_with_a_unit_weight_is_the_weightless_norm(dtype):
    # The decoder passes ones to mx.fast.rms_norm for its CUDA fast path; the result must not change by a bit,
    # also when the weight is first made inside mx.compile's trace.
    x = (mx.random.normal((5, 96), key=mx.random.key(0)) * 3).astype(dtype)
    weightless = mx.fast.rms_norm(x, None, 1e-5)
    compiled = mx.compile(lambda y: nanochat_decode._norm(y, 1e-5))
    for out in (compiled(x), nanochat_decode._norm(x, 1e-5)):  # compiled first: its trace makes the weight
        assert out.dtype == dtype
        assert mx.array_equal(out, weightless).item()


@pytest.mark.parametrize("alternate_buffers", [False, True, 3])
def test_fast_decode_logits_equal_mlx_lm(model, alternate_buffers):
    """One buffer per layer, two or three written in turn: the same logits, rows filtered mid-way included."""
    assert nanochat_decode.supports(model)
    decoder = assert_same_logits(model, PROMPTS, 2, 8, keep_after=4, keep=[0, 3, 5],
                                 alternate_buffers=alternate_buffers)
    assert (decoder.spare is not None) == (bool(alternate_buffers) and not decoder.use_kernel)
    if decoder.spare is not None:
        assert decoder.kv_buffers == (2 if alternate_buffers is True else alternate_buffers)


def test_masked_attention_by_gemm_decodes_as_mlx_lm(model, monkeypatch):
    """The per-row layout's masked attention written out (what CUDA runs) gives mlx-lm's logits too."""
    monkeypatch.setattr(nanochat_decode, "masked_attention_by_hand", lambda: True)
    decoder = assert_same_logits(model, PROMPTS, 2, 8, keep_after=4, keep=[0, 3, 5], alternate_buffers=True)
    assert decoder.attend_by_hand and decoder.by_gemm and not decoder.use_kernel


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_by_gemm_is_masked_softmax_attention(heads, kv_heads):
    rng = np.random.default_rng(0)
    rows, columns, dim = 3, 7, 8
    q = rng.normal(size=(rows, heads, 1, dim)).astype(np.float32)
    k, v = (rng.normal(size=(rows, kv_heads, columns, dim)).astype(np.float32) for _ in range(2))
    mask = np.arange(columns)[None] >= np.array([0, 2, 5])[:, None]  # each row's left padding
    scale = 0.3
    queries = nanochat_decode.gemm_queries(mx.array(q), kv_heads)
    query_rows = nanochat_decode.query_rows(heads, kv_heads)
    assert queries.shape == (rows, kv_heads, query_rows, dim) and query_rows == max(2, heads // kv_heads)
    bias = nanochat_decode.padding_bias(mx.array(mask), kv_heads, query_rows, mx.float32)
    assert bias.shape == (rows, kv_heads, query_rows, columns)
    assert (np.array(bias) == np.where(mask, 0.0, -np.inf)[:, None, None, :]).all()
    out = nanochat_decode.attention_by_gemm(queries, mx.array(k), mx.array(v), bias, scale, heads)
    rep = heads // kv_heads
    for r in range(rows):
        for h in range(heads):
            s = scale * k[r, h // rep] @ q[r, h, 0]
            s = np.where(mask[r], s, -np.inf)
            w = np.exp(s - s.max())
            expected = (w / w.sum()) @ v[r, h // rep]
            np.testing.assert_allclose(np.array(out[r, h, 0]), expected, rtol=1e-5, atol=1e-6)
    fused = mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=scale,
                                                 mask=mx.array(mask[:, None, None, :]))
    np.testing.assert_allclose(np.array(out), np.array(fused), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prompts", [[[3], [5, 6]], [[3], [4]]])
def test_one_token_prompts_decode(model, prompts):
    assert_same_logits(model, prompts, 2, 3)


def test_quantized_model_decodes_fast_and_matches(tiny_model_dir):
    model = load_model(tiny_model_dir)[0]
    nn.quantize(model, group_size=32, bits=8)
    assert nanochat_decode.supports(model)
    assert_same_logits(model, PROMPTS, 1, 4, atol=2e-3, rtol=1e-3)


def test_adapters_fall_back_to_mlx_lm(tiny_model_dir):
    model = load_model(tiny_model_dir)[0]
    add_adapters(model, GRPOConfig(model_name=str(tiny_model_dir), train_type="lora"))
    assert not nanochat_decode.supports(model)


def test_greedy_rollouts_are_the_same_on_both_paths(model):
    kwargs = dict(group_size=2, max_new_tokens=10, sampler=make_rollout_sampler(0.0), stop_token_ids={7})
    fast, _ = generate_completions(model, PROMPTS, **kwargs)
    slow, _ = generate_completions(model, PROMPTS, fast_decode=False, **kwargs)
    assert [c.tokens for c in fast] == [c.tokens for c in slow]
    assert [c.stopped for c in fast] == [c.stopped for c in slow]


def test_cache_dtype_follows_the_keys_not_the_embedding(tiny_model_dir):
    model = load_model(tiny_model_dir)[0]
    model.transformer.wte.set_dtype(mx.bfloat16)  # nanochat's own layout: bf16 embedding, float32 layers
    decoder = assert_same_logits(model, [[1], [4]], 1, 2)  # one-token prompts: nothing is prefilled
    assert decoder.cache_dtype == mx.float32
    if not decoder.use_kernel:
        assert decoder.kv[0].dtype == mx.float32


def test_stepping_past_the_capacity_is_an_error(model):
    decoder = nanochat_decode.NanochatDecoder(model, [[1, 2, 3], [4, 5, 6]], 1, 2)
    tokens = mx.array([3, 6], dtype=mx.int32)
    decoder.step(tokens)
    decoder.step(tokens)
    with pytest.raises(ValueError, match="larger max_new_tokens"):
        decoder.step(tokens)


def test_portable_attention_bench_layouts_give_the_per_row_attention():
    """bench/portable_attention.py's layouts (scores by GEMM, by runs of equal padding, 2 queries for cuDNN, keys
    per prompt, keys transposed) attend as the per-row masked attention does, GQA included (bf16 rounding apart)."""
    from conftest import bench_main

    differences = bench_main("portable_attention.py", ["--rows", "8", "--prompts", "2", "--heads", "4",
                                                       "--kv-heads", "2", "--head-dim", "32", "--layers", "1",
                                                       "--capacity", "12", "--steps", "0,5", "--repeats", "1"])
    assert len(differences) == 2 * 7
    assert all(err < 2e-2 for err in differences.values()), differences
