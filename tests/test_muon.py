"""optimizer = "muon": nanochat's MuonAdamW (utils/training/muon.py) against hand-computed steps and an
independent numpy transcription of nanochat's formulas; its groups on both architectures; exact resume."""

import mlx.core as mx
import numpy as np
import pytest
from fixture_checkpoint import build_tiny_2026_checkpoint
from mlx.utils import tree_flatten, tree_unflatten
from test_trainer import comparable, interrupted_copy, read_records, run, same_weights, saved_weights, toy_reward_file

from mlx_grpo.config import ConfigError, GRPOConfig, validate
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.checkpoint import find_checkpoint
from mlx_grpo.nanochat.convert import convert_checkpoint
from mlx_grpo.training.muon import POLAR_EXPRESS_COEFFS, NanochatMuon, muon_adamw


def muon_step(p, g, steps=1, lr=0.1, wd=0.0):
    optimizer = NanochatMuon(lr, weight_decay=wd)
    params = {"w": mx.array(p, dtype=mx.float32)}
    for _ in range(steps):
        params = optimizer.apply_gradients({"w": mx.array(g, dtype=mx.float32)}, params)
    return np.array(params["w"])


def test_the_first_step_on_a_row_is_its_sign_over_sqrt_cols_with_cautious_decay():
    # One row: MuonEq and the polar iteration leave its direction, Muon+ makes it unit length, and
    # NorMuon's first step (v = 0.1 g^2 per column) makes every entry sign(g) / sqrt(cols).
    p, g = [[0.5, -1.0, 2.0, 0.1]], [[1.0, -2.0, -0.5, 3.0]]
    np.testing.assert_allclose(muon_step(p, g), [[0.45, -0.95, 2.05, 0.05]], rtol=1e-5)
    # Decay lr * wd * p only where the update u = [.5, -.5, -.5, .5] and p agree in sign (not column 3).
    np.testing.assert_allclose(muon_step(p, g, wd=0.5), [[0.425, -0.9, 2.05, 0.045]], rtol=1e-5)


def test_a_tall_column_steps_sign_times_lr_the_shape_scale_undoing_the_half():
    # 4 x 1: every row equilibrated to |g| / 2, unit norm -> entries sign(g) / 2; lr x sqrt(4 / 1) = 2 lr.
    p, g = [[1.0], [2.0], [-1.0], [0.0]], [[0.3], [-4.0], [0.01], [1.0]]
    np.testing.assert_allclose(muon_step(p, g), np.array(p) - 0.1 * np.sign(g), rtol=1e-5)


def reference_muon(p, grads, lr, wd, momentum=0.95, beta2=0.9):
    """nanochat's muon_step_fused for one matrix, in float64 numpy, step by step from its definition."""
    p = np.array(p, dtype=np.float64)
    rows, cols = p.shape
    m = np.zeros_like(p)
    v = np.zeros((rows, 1) if rows >= cols else (1, cols))
    for g in grads:
        m = m + (1 - momentum) * (g - m)
        x = g + momentum * (m - g)
        x = x * (np.linalg.norm(x) / np.sqrt(rows)) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
        x = x / (np.linalg.norm(x) * 1.01 + 1e-6)
        for a, b, c in POLAR_EXPRESS_COEFFS:
            if rows > cols:
                gram = x.T @ x
                x = a * x + x @ (b * gram + c * gram @ gram)
            else:
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
        x = x * np.sqrt(min(rows, cols)) / max(np.linalg.norm(x), 1e-6)
        axis = 1 if rows >= cols else 0
        v_mean = (x**2).mean(axis=axis, keepdims=True)
        v = v + (1 - beta2) * (v_mean - v)
        step = 1 / np.sqrt(np.maximum(v, 1e-10))
        scale = step * np.linalg.norm(x) / max(np.sqrt((v_mean * x.shape[axis] * step**2).sum()), 1e-10)
        x = x * scale
        lr_p = lr * max(1.0, rows / cols) ** 0.5
        p = p - lr_p * x - lr_p * wd * p * (x * p >= 0)
    return p


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_three_steps_match_nanochats_formulas(shape):
    rng = np.random.default_rng(sum(shape))
    p = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(3)]
    optimizer = NanochatMuon(0.02, weight_decay=0.2)
    params = {"w": mx.array(p, dtype=mx.float32)}
    for g in grads:
        params = optimizer.apply_gradients({"w": mx.array(g, dtype=mx.float32)}, params)
    np.testing.assert_allclose(np.array(params["w"]), reference_muon(p, grads, 0.02, 0.2), atol=2e-5)


@pytest.fixture(scope="module")
def model_2026(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon_2026")
    build_tiny_2026_checkpoint(root / "ckpt", "a825e63")
    convert_checkpoint(find_checkpoint(root / "ckpt"), root / "mlx", dtype="float32")
    return load_model(root / "mlx")[0]


WIDTH_SCALE = (64 / 768) ** -0.5  # the fixtures' n_embd is 64


def group_params(optimizer, model):
    optimizer.init(model.trainable_parameters())
    return {group.name: sorted(k for k, _ in tree_flatten(state) if k.endswith((".m", ".momentum_buffer")))
            for group, state in zip(optimizer.groups, optimizer.state["states"])}


def test_the_2026_model_gets_nanochats_groups_and_rates(model_2026):
    optimizer = muon_adamw(model_2026, lambda step: 0.05, matrix_lr=0.02, embedding_lr=0.2,
                           unembedding_lr=0.004, scalar_lr=0.5, weight_decay=0.0)
    groups = {g.name: g for g in optimizer.groups}
    assert list(groups) == ["unembedding", "embedding", "value_embeds", "resid", "x0", "smear", "matrix"]
    expected = {"unembedding": (0.004 * WIDTH_SCALE, (0.8, 0.96), 0.01),
                "embedding": (0.2 * WIDTH_SCALE, (0.8, 0.995), 0.001),
                "value_embeds": (0.1 * WIDTH_SCALE, (0.8, 0.995), 0.01),
                "resid": (0.005, (0.8, 0.95), 0.05), "x0": (0.5, (0.96, 0.95), 0.0), "smear": (0.2, (0.8, 0.95), 0.0)}
    for name, (lr, betas, wd) in expected.items():
        assert groups[name].lr == pytest.approx(lr) and (groups[name].betas, groups[name].weight_decay) == (betas, wd)
    members = group_params(optimizer, model_2026)
    assert {k.rsplit(".", 1)[0] for k in members["smear"]} == {"smear_gate.weight", "smear_lambda", "backout_lambda"}
    assert all(".value_embed." in k for k in members["value_embeds"]) and members["value_embeds"]
    matrix = {k.rsplit(".", 1)[0] for k in members["matrix"]}
    assert not any("value_embed" in k for k in matrix)
    assert "transformer.h.1.attn.ve_gate.weight" in matrix and "transformer.h.0.mlp.c_fc.weight" in matrix
    assert sum(len(v) for v in members.values()) == len(tree_flatten(model_2026.trainable_parameters()))


def test_a_first_adamw_step_is_lr_times_sign_after_the_decay(model_2026):
    # Bias-corrected Adam's first step: m / sqrt(v) = sign(g); decoupled decay p (1 - lr wd) first.
    optimizer = muon_adamw(model_2026, lambda step: 0.05, matrix_lr=0.02, embedding_lr=0.2,
                           unembedding_lr=0.004, scalar_lr=0.5, weight_decay=0.0)
    params = dict(tree_flatten(model_2026.trainable_parameters()))
    grads = {k: mx.ones_like(v) * 0.3 for k, v in params.items()}
    new = dict(tree_flatten(optimizer.apply_gradients(tree_unflatten(list(grads.items())),
                                                      tree_unflatten(list(params.items())))))
    lr = 0.004 * WIDTH_SCALE * 0.05
    want = np.array(params["lm_head.weight"]) * (1 - lr * 0.01) - lr
    np.testing.assert_allclose(np.array(new["lm_head.weight"]), want, rtol=1e-6, atol=1e-7)
    lr = 0.5 * 0.05  # x0_lambdas: scalar_lr, no width scale, no decay
    np.testing.assert_allclose(np.array(new["x0_lambdas"]), np.array(params["x0_lambdas"]) - lr, rtol=1e-6)
    assert int(optimizer.step) == 1


def test_the_october_model_has_only_its_three_groups_and_other_models_are_refused(tiny_model_dir, tiny_mlx_lm_dir):
    model = load_model(tiny_model_dir)[0]
    optimizer = muon_adamw(model, lambda step: 0.05, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                           scalar_lr=0.5, weight_decay=0.0)
    assert [g.name for g in optimizer.groups] == ["unembedding", "embedding", "matrix"]
    llama = load_model(tiny_mlx_lm_dir)[0]
    with pytest.raises(ConfigError, match="knows nanochat's parameters only; model.embed_tokens"):
        muon_adamw(llama, lambda step: 0.05, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                   scalar_lr=0.5, weight_decay=0.0)


@pytest.mark.parametrize("change, words", [({"learning_rate": 1e-6}, "fraction of nanochat's base"),
                                           ({"train_type": "lora"}, "set train_type = \"full\""),
                                           ({"optimizer": "sgd"}, "optimizer must be one of adamw|muon")])
def test_muon_settings_that_cannot_work_are_one_line_errors(change, words):
    with pytest.raises(ConfigError, match=words):
        validate(GRPOConfig(**{"optimizer": "muon", "learning_rate": 0.05, **change}))


def test_a_muon_run_resumes_exactly(tmp_path, tiny_model_dir):
    """Stopped after step 1 of 2 and resumed: the same metrics and bit-identical weights (Muon and AdamW state)."""
    reward_file = toy_reward_file(tmp_path)
    settings = ("optimizer=muon", "learning_rate=0.05", "lr_scheduler_type=linear", "max_grad_norm=0",
                "max_train_samples=4", "save_steps=1", "eval_samples=1", "temperature=1.0",
                f"reward_file={reward_file}", "reward_funcs=digit_reward", "scale_rewards=none", "loss_type=bnpo")
    run(tmp_path, tiny_model_dir, *settings, run_name="full")
    full = tmp_path / "out" / "full"
    assert [r["lr"] for r in read_records(full) if "loss" in r] == pytest.approx([0.05, 0.025])  # linear to 0
    part = interrupted_copy(full, tmp_path / "out" / "part", step=1, update=1)
    run(tmp_path, tiny_model_dir, *settings, run_name="part", extra_args=["--resume"])
    assert comparable(read_records(part)) == comparable(read_records(full))
    a = saved_weights(full, 2)
    assert same_weights(a, saved_weights(part, 2))
    start = dict(tree_flatten(load_model(tiny_model_dir)[0].parameters()))
    assert not mx.array_equal(start["transformer.h.0.attn.c_q.weight"], a["transformer.h.0.attn.c_q.weight"])
    saved = mx.load(str(full / "checkpoints" / "step_000001" / "optimizer.safetensors"))
    assert any(k.endswith("second_momentum_buffer") for k in saved)  # NorMuon's state is saved too
