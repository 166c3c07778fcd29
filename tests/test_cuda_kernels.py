"""mlx_grpo.cuda_kernels: one switch (MLX_GRPO_CUDA_KERNELS, set_enabled) decides for all three kernels.

The backend check is stood in for (runs_on_cuda_gpu -> True) and the kernels are never launched: each
caller's choice is observed, so this runs on every backend."""

import mlx.core as mx
import pytest

from mlx_grpo import cuda_kernels
from mlx_grpo.cuda_kernels import logprobs as cuda_logprobs
from mlx_grpo.cuda_kernels import sampling as cuda_sampling
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.decoder import NanochatDecoder
from mlx_grpo.training.loss import token_logprobs


@pytest.fixture
def as_on_a_cuda_gpu(monkeypatch):
    monkeypatch.delenv(cuda_kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(cuda_kernels, "runs_on_cuda_gpu", lambda: True)
    yield
    cuda_kernels.set_enabled(True)


def kernels_chosen(model, monkeypatch) -> tuple[bool, bool, bool]:
    """(decode attention, top-k sampling, log-probs): whether each caller picks its kernel."""
    calls = []
    monkeypatch.setattr(cuda_sampling, "sample_top_k",
                        lambda logits, *args: calls.append("sampling") or mx.zeros((logits.shape[0],), mx.int32))
    monkeypatch.setattr(cuda_logprobs, "token_logprobs_and_entropy",
                        lambda logits, targets, t: calls.append("logprobs") or (mx.zeros(targets.shape),) * 2)
    decoder = NanochatDecoder(model, [[1, 2, 3]], 2, 4)  # builds its caches only: no kernel runs
    make_rollout_sampler(0.7, top_k=5)(mx.zeros((2, 16)))
    token_logprobs(mx.zeros((1, 2, 16)), mx.zeros((1, 2), dtype=mx.int32))
    return decoder.use_kernel, "sampling" in calls, "logprobs" in calls


def test_one_switch_covers_all_three_kernels(tiny_model_dir, as_on_a_cuda_gpu, monkeypatch):
    model = load_model(tiny_model_dir)[0]
    assert kernels_chosen(model, monkeypatch) == (True, True, True)
    cuda_kernels.set_enabled(False)
    assert kernels_chosen(model, monkeypatch) == (False, False, False)
    cuda_kernels.set_enabled(True)
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(cuda_kernels.ENV_VAR, off)
        assert kernels_chosen(model, monkeypatch) == (False, False, False), off
    monkeypatch.setenv(cuda_kernels.ENV_VAR, "1")
    assert kernels_chosen(model, monkeypatch) == (True, True, True)


def test_the_environment_variable_takes_on_or_off_only(as_on_a_cuda_gpu, monkeypatch):
    for on in ("1", "true", "On", "yes"):
        monkeypatch.setenv(cuda_kernels.ENV_VAR, on)
        assert cuda_kernels.available() is True
    monkeypatch.setenv(cuda_kernels.ENV_VAR, "maybe")
    with pytest.raises(cuda_kernels.KernelSwitchError, match=r"MLX_GRPO_CUDA_KERNELS='maybe' .* set it to 0"):
        cuda_kernels.available()
    monkeypatch.setenv(cuda_kernels.ENV_VAR, "0")
    cuda_kernels.set_enabled(True)  # code cannot turn on what the environment turned off
    assert cuda_kernels.available() is False
