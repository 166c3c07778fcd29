"""utils/cuda_kernels/logprobs.py: the fused log-prob / entropy kernels against grpo_loss's MLX ops.

On the CPU the two kernels are replaced by MLX-op emulations of what they compute, which tests the
custom function around them (shapes, the gradient formula, no gradient through the entropy,
compile); on CUDA the kernels themselves are compared (skipped elsewhere)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import logprobs as cuda_logprobs
from mlx_grpo.training import loss as grpo_loss

ON_CUDA = cuda_kernels.runs_on_cuda_gpu()


def reference(logits, targets, temperature):
    """grpo_loss's MLX ops, with the CUDA dispatch off."""
    scaled = logits.astype(mx.float32) / temperature
    lse = mx.logsumexp(scaled, axis=-1)
    selected = mx.take_along_axis(scaled, targets[..., None], axis=-1).squeeze(-1)
    entropy = lse - (mx.softmax(scaled, axis=-1) * scaled).sum(-1)
    return selected - lse, entropy


def emulated_forward(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
    logits, targets, inv_temp = inputs
    vocab = logits.shape[-1]
    assert dict(template)["V"] == vocab and grid[0] == logits.shape[0] * threadgroup[0]
    x = logits.astype(mx.float32) * inv_temp
    lse = mx.logsumexp(x, axis=-1)
    chosen = mx.take_along_axis(x, mx.clip(targets, 0, vocab - 1)[:, None], axis=-1)[:, 0]
    logp = mx.where((targets >= 0) & (targets < vocab), chosen - lse, math.nan)
    entropy = lse - (mx.exp(x - lse[:, None]) * x).sum(-1)
    return [logp, entropy, lse]


def emulated_backward(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
    logits, targets, inv_temp, lse, cotangent = inputs
    x = logits.astype(mx.float32) * inv_temp
    onehot = mx.arange(logits.shape[-1])[None, :] == targets[:, None]
    g = (cotangent * inv_temp)[:, None]
    return [(mx.where(onehot, g, 0.0) - g * mx.exp(x - lse[:, None])).astype(output_dtypes[0])]


@pytest.fixture
def kernels(monkeypatch):
    """The real kernels on CUDA, their emulations elsewhere (where callers are told they run)."""
    monkeypatch.delenv(cuda_kernels.ENV_VAR, raising=False)
    if not ON_CUDA:
        monkeypatch.setattr(cuda_logprobs, "_forward_kernel", lambda: emulated_forward)
        monkeypatch.setattr(cuda_logprobs, "_backward_kernel", lambda: emulated_backward)
        monkeypatch.setattr(cuda_kernels, "runs_on_cuda_gpu", lambda: True)
    yield cuda_logprobs
    cuda_kernels.set_enabled(True)


def random_case(shape, vocab, dtype, seed=0):
    key = mx.random.key(seed)
    logits = (mx.random.normal((*shape, vocab), key=key) * 3).astype(dtype)
    targets = mx.random.randint(0, vocab, shape, key=mx.random.split(key)[0])
    return logits, targets


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 1003] + ([65536] if ON_CUDA else []))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_entropy_and_gradient_match_the_mlx_ops(kernels, dtype, vocab, temperature):
    logits, targets = random_case((3, 5), vocab, dtype)
    logp, entropy = kernels.token_logprobs_and_entropy(logits, targets, temperature)
    want_logp, want_entropy = reference(logits, targets, temperature)
    assert logp.shape == entropy.shape == (3, 5) and logp.dtype == entropy.dtype == mx.float32
    np.testing.assert_allclose(np.array(logp), np.array(want_logp), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(entropy), np.array(want_entropy), rtol=1e-4, atol=1e-4)

    weights = mx.random.normal((3, 5), key=mx.random.key(7))
    fused = mx.grad(lambda z: (kernels.token_logprobs_and_entropy(z, targets, temperature)[0] * weights).sum())
    plain = mx.grad(lambda z: (reference(z, targets, temperature)[0] * weights).sum())
    got, want = fused(logits), plain(logits)
    assert got.dtype == dtype
    rtol = 1e-5 if dtype == mx.float32 else 2 ** -7  # bf16: the float32 values may round one ulp apart
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                               rtol=rtol, atol=1e-6)


def test_the_entropy_carries_no_gradient_and_compile_gives_the_same_numbers(kernels):
    logits, targets = random_case((2, 4), 1000, mx.float32, seed=1)
    entropy_grad = mx.grad(lambda z: kernels.token_logprobs_and_entropy(z, targets)[1].sum())(logits)
    assert mx.all(entropy_grad == 0).item()

    def loss(z):
        logp, entropy = kernels.token_logprobs_and_entropy(z, targets, 0.7)
        return (logp * mx.arange(8).reshape(2, 4)).sum() + 0 * entropy.sum()

    plain = mx.value_and_grad(loss)(logits)
    compiled = mx.compile(mx.value_and_grad(loss))(logits)
    assert compiled[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    np.testing.assert_allclose(np.array(compiled[1]), np.array(plain[1]), rtol=1e-6, atol=1e-7)


def test_a_target_outside_the_vocabulary_gives_nan_not_a_stray_read(kernels):
    logits, _ = random_case((1, 3), 1000, mx.float32)
    logp, entropy = kernels.token_logprobs_and_entropy(logits, mx.array([[5, 1000, -1]]))
    assert np.isfinite(logp[0, 0].item()) and np.isnan(np.array(logp[0, 1:])).all()
    assert np.isfinite(np.array(entropy)).all()


def test_unsupported_dtypes_are_refused():
    with pytest.raises(ValueError, match="logits"):
        cuda_logprobs.token_logprobs_and_entropy(mx.zeros((2, 8), mx.int32), mx.zeros((2,), mx.int32))


def test_grpo_loss_dispatches_to_the_kernels_unless_switched_off(kernels, monkeypatch):
    calls = []
    fused_fn = kernels.token_logprobs_and_entropy
    monkeypatch.setattr(kernels, "token_logprobs_and_entropy", lambda *a: calls.append(1) or fused_fn(*a))
    logits, targets = random_case((2, 6), 4096, mx.bfloat16, seed=3)
    fused = grpo_loss.token_logprobs_and_entropy(logits, targets, 0.9)
    assert np.allclose(np.array(grpo_loss.token_logprobs(logits, targets, 0.9)), np.array(fused[0]))
    assert len(calls) == 2
    cuda_kernels.set_enabled(False)
    plain = grpo_loss.token_logprobs_and_entropy(logits, targets, 0.9)
    cuda_kernels.set_enabled(True)
    monkeypatch.setenv(cuda_kernels.ENV_VAR, "0")
    plain_by_environment = grpo_loss.token_logprobs(logits, targets, 0.9)
    assert len(calls) == 2  # neither switch let the kernels run
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(plain_by_environment), np.array(plain[0]))


def test_the_trainers_compiled_loss_and_gradient_agree_with_and_without_the_kernels(kernels, monkeypatch):
    from mlx.utils import tree_flatten
    from mlx_lm.models.nanochat import Model, ModelArgs

    from mlx_grpo.training.update import make_loss_and_grad

    model = Model(ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                            vocab_size=1024, intermediate_size=256))
    mx.eval(model.parameters())
    inputs, targets = (mx.random.randint(0, 1024, (4, 40), key=mx.random.key(i)) for i in (1, 2))
    mask = mx.repeat((mx.arange(40) >= 10).astype(mx.float32)[None], 4, axis=0)
    args = (inputs, targets, mask, mx.array([1.0, -1.0, 0.5, 0.0]), None, None,
            mx.array(4.0), mask.sum(), mx.array(1.0))
    results = []
    for use_kernels in (True, False):
        cuda_kernels.set_enabled(use_kernels)
        loss_and_grad = make_loss_and_grad(
            model, temperature=0.8, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
            importance_sampling_level="token", max_completion_length=40, use_compile=True)
        (loss, stats), grads = loss_and_grad(*args)
        results.append((loss.item(), stats["entropy_sum"].item(), dict(tree_flatten(grads))))
    (loss_a, entropy_a, grads_a), (loss_b, entropy_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-4, abs=1e-6) and entropy_a == pytest.approx(entropy_b, rel=1e-4)
    for name, g in grads_a.items():
        np.testing.assert_allclose(np.array(g), np.array(grads_b[name]), rtol=1e-3, atol=1e-5, err_msg=name)
