"""TRL's adaptive entropy control (use_adaptive_entropy, Skywork-OR1): the controller's rule by hand, the
coefficient as a runtime input of the (compiled) loss, a run whose coefficient moves and is logged, and a
resume that restores it exactly."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_trainer import comparable, interrupted_copy, read_records, run, toy_reward_file
from test_trl_losses import ENTROPY, LOGP, close, loss_of

from mlx_grpo.config import ConfigError, GRPOConfig, validate
from mlx_grpo.training.checkpoint import CheckpointError
from mlx_grpo.training.step import TrainState, adapt_entropy_coef, applied_entropy_coef


def stats(entropy_sum, tokens):
    return {"entropy_bonus_sum": entropy_sum, "entropy_bonus_tokens": tokens}


def test_the_coefficient_steps_toward_the_target_within_its_bounds():
    cfg = validate(GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05,
                              entropy_coef_min=0.02, entropy_coef_max=0.2, entropy_target=1.0))
    fresh = TrainState()  # not adapted yet: it starts at entropy_coef
    # H = 2 / 4 = 0.5 <= 1: up, 0.1 + 0.05 = 0.15 ; H = 12 / 4 = 3 > 1: down, 0.1 - 0.05 = 0.05
    assert adapt_entropy_coef(cfg, fresh, stats(2.0, 4.0)) == (pytest.approx(0.15), 0.5)
    assert adapt_entropy_coef(cfg, fresh, stats(12.0, 4.0)) == (pytest.approx(0.05), 3.0)
    # H exactly at the target goes up (TRL's <=); no tokens: H = 0 / max(0, 1) = 0, up
    assert adapt_entropy_coef(cfg, fresh, stats(4.0, 4.0))[0] == pytest.approx(0.15)
    assert adapt_entropy_coef(cfg, fresh, stats(0.0, 0.0)) == (pytest.approx(0.15), 0.0)
    # clamped: 0.18 + 0.05 = 0.23 -> max 0.2 ; 0.04 - 0.05 = -0.01 -> min 0.02
    assert adapt_entropy_coef(cfg, TrainState(entropy_coef=0.18), stats(2.0, 4.0))[0] == 0.2
    assert adapt_entropy_coef(cfg, TrainState(entropy_coef=0.04), stats(12.0, 4.0))[0] == 0.02
    # a non-finite entropy steps down (TRL: NaN <= target is false) and is not kept
    assert adapt_entropy_coef(cfg, fresh, stats(math.nan, 4.0)) == (pytest.approx(0.05), None)

    # applied only while the last entropy was <= the target; nothing before a first measurement
    assert applied_entropy_coef(cfg, fresh) == 0.0
    assert applied_entropy_coef(cfg, TrainState(entropy_coef=0.15, last_world_entropy=0.5)) == 0.15
    assert applied_entropy_coef(cfg, TrainState(entropy_coef=0.15, last_world_entropy=1.0)) == 0.15
    assert applied_entropy_coef(cfg, TrainState(entropy_coef=0.15, last_world_entropy=3.0)) == 0.0


@pytest.mark.parametrize("change, words", [
    ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, r"entropy_coef_min \(0.5\) must be <= entropy_coef_max"),
    ({"entropy_coef_delta": -0.01}, "entropy_coef_delta must be >= 0"),
])
def test_bounds_and_steps_that_cannot_work_are_one_line_errors(change, words):
    with pytest.raises(ConfigError, match=words) as error:
        validate(GRPOConfig(use_adaptive_entropy=True, **change))
    assert "\n" not in str(error.value)
    validate(GRPOConfig(**change))  # unused without use_adaptive_entropy, as in TRL


@pytest.mark.parametrize("settings", [{"loss_type": "dapo"}, {"loss_type": "grpo", "num_micro_batches": 2},
                                      {"loss_type": "bnpo", "top_entropy_quantile": 0.5}])
def test_an_array_coefficient_is_the_static_one(settings):
    def value_and_grads(coef):
        fn = lambda lp, h: loss_of(lp, entropy=h, entropy_coef=coef, **settings)[0]
        return mx.value_and_grad(fn, argnums=(0, 1))(LOGP, ENTROPY)

    (static, (g_logp, g_h)), (runtime, (a_logp, a_h)) = value_and_grads(0.3), value_and_grads(mx.array(0.3))
    close(runtime, static.item(), atol=1e-7)
    close(a_logp, g_logp, atol=1e-7)
    close(a_h, g_h, atol=1e-7)
    assert mx.abs(g_h).max().item() > 0  # the entropy's gradient is there
    # at 0 the array keeps the term (and its statistics): the loss is the policy loss, the gradient through
    # the entropy 0
    loss, summed = loss_of(LOGP, entropy=ENTROPY, entropy_coef=mx.array(0.0), **settings)
    close(loss, loss_of(LOGP, entropy=ENTROPY, **settings)[0].item(), atol=1e-7)
    close(summed["policy_loss"], loss.item(), atol=1e-7)
    kept = 3 if settings.get("top_entropy_quantile") else 5  # the top half of 1..5 is 3, 4, 5
    close(summed["entropy_bonus_tokens"], kept)
    close(summed["entropy_bonus_sum"], 12.0 if kept == 3 else 15.0)


def test_the_compiled_loss_takes_the_coefficient_as_an_input(tiny_model_dir, monkeypatch):
    """Adaptive, one compiled graph serves every coefficient (traced once) and matches the static loss at each."""
    from mlx_grpo.generation.engine import Completion
    from mlx_grpo.models import load_model
    from mlx_grpo.training import update

    traces = []
    plain_loss = update.grpo_loss
    monkeypatch.setattr(update, "grpo_loss", lambda *a, **kw: traces.append(1) or plain_loss(*a, **kw))
    model, _ = load_model(tiny_model_dir)
    completions = [Completion(0, tokens=[10, 11, 12], sampled=[1, 1, 1], stopped=True),
                   Completion(0, tokens=[13, 14], sampled=[1, 1], stopped=True)]
    _, (batch,) = update.pack_micro_batches([[1, 2, 3]], completions, micro_batch_size=2)
    norms = [mx.array(v, dtype=mx.float32) for v in (2.0, 5.0, 1.0)]
    args = (batch.inputs, batch.targets, batch.mask, mx.array([1.0, -1.0]), None, None, *norms)

    def loss_and_grad(**kw):
        return update.make_loss_and_grad(model, temperature=1.0, loss_type="grpo", epsilon=0.2, epsilon_high=0.2,
                                         beta=0.0, importance_sampling_level="token", max_completion_length=8,
                                         use_compile=True, **kw)

    adaptive = loss_and_grad(adaptive_entropy=True, loss_options={"entropy_coef": 0.0})
    for coef in (0.1, 0.3, 0.0):
        (loss, summed), grads = adaptive(*args, None, None, mx.array(coef))
        (s_loss, _), s_grads = loss_and_grad(loss_options={"entropy_coef": coef})(*args)
        close(loss, s_loss.item(), atol=1e-6)
        s_grads = dict(tree_flatten(s_grads))
        assert all(np.allclose(np.array(g), np.array(s_grads[k]), atol=1e-6) for k, g in tree_flatten(grads))
        assert {"policy_loss", "entropy_bonus_sum"} <= set(summed)  # the term is there at 0 too
    assert len(traces) == 1 + 3  # the adaptive graph once, each static one once


def test_older_checkpoints_without_the_controller_resume_from_the_config():
    saved = {k: v for k, v in TrainState(step=2, update=2).to_dict().items()
             if k not in ("entropy_coef", "last_world_entropy")}
    state = TrainState.from_dict(saved)
    assert state.step == 2 and state.entropy_coef is None and state.last_world_entropy is None
    cfg = validate(GRPOConfig(use_adaptive_entropy=True, entropy_coef=0.07))
    assert adapt_entropy_coef(cfg, state, stats(0.0, 1.0))[0] == pytest.approx(0.07 + 0.005)  # from entropy_coef
    with pytest.raises(CheckpointError, match="has no nan_streak"):  # the other fields are still required
        TrainState.from_dict({k: v for k, v in saved.items() if k != "nan_streak"})


# Every update's entropy is far below 100 nats: the coefficient goes up by 0.02 after each update.
ADAPTIVE = ("use_adaptive_entropy=true", "entropy_coef=0.01", "entropy_coef_delta=0.02", "entropy_target=100.0",
            "micro_batch_size=8", "learning_rate=1e-3", "max_train_samples=4", "save_steps=1", "eval_samples=1",
            "temperature=1.0", "reward_funcs=digit_reward")


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("adaptive")
    reward_file = toy_reward_file(tmp_path)
    run(tmp_path, tiny_model_dir, *ADAPTIVE, f"reward_file={reward_file}", run_name="full")
    return tmp_path, reward_file


def test_the_coefficient_moves_each_update_and_is_logged(adaptive_run):
    tmp_path, _ = adaptive_run
    full = tmp_path / "out" / "full"
    first, second = [r for r in read_records(full) if "loss" in r]
    # logged after each update (TRL's): 0.01 + 0.02, then + 0.02 again
    assert first["entropy_coef"] == 0.01 + 0.02 and second["entropy_coef"] == 0.01 + 0.02 + 0.02
    # update 1 applies nothing (no entropy measured yet); update 2 applies 0.03 to its mean token entropy
    # (one micro-batch: the logged entropy is the controller's H; dapo: loss = policy_loss - c H)
    assert first["loss"] == pytest.approx(first["policy_loss"], abs=1e-7)
    assert second["loss"] - second["policy_loss"] == pytest.approx(-0.03 * second["entropy"], rel=1e-4)
    saved = json.loads((full / "checkpoints" / "step_000001" / "trainer_state.json").read_text())["trainer_state"]
    assert saved["entropy_coef"] == first["entropy_coef"]
    assert saved["last_world_entropy"] == pytest.approx(first["entropy"], rel=1e-5)


def test_a_resume_restores_the_coefficient_exactly(adaptive_run, tiny_model_dir):
    """Stopped after step 1 of 2 and resumed: the same metrics (entropy_coef included), weights and controller."""
    tmp_path, reward_file = adaptive_run
    full = tmp_path / "out" / "full"
    part = interrupted_copy(full, tmp_path / "out" / "part", step=1, update=1)
    run(tmp_path, tiny_model_dir, *ADAPTIVE, f"reward_file={reward_file}", run_name="part", extra_args=["--resume"])
    assert comparable(read_records(part)) == comparable(read_records(full))
    final = [json.loads((d / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["trainer_state"]
             for d in (full, part)]
    assert final[0]["entropy_coef"] == final[1]["entropy_coef"] == 0.01 + 0.02 + 0.02
    assert final[0]["last_world_entropy"] == final[1]["last_world_entropy"]
    weights = [dict(tree_flatten(mx.load(str(d / "checkpoints" / "step_000002" / "model.safetensors"))))
               for d in (full, part)]
    assert all(mx.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
