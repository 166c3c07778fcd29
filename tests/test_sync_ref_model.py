"""TRL's sync_ref_model: the KL reference moves toward the policy every ref_model_sync_steps steps, by hand, and a
run that syncs resumes exactly (the reference is saved with each checkpoint)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_trainer import comparable, interrupted_copy, read_records, run, toy_reward_file

from mlx_grpo.config import ConfigError, GRPOConfig, validate
from mlx_grpo.training.step import sync_reference


def test_the_reference_moves_toward_the_policy_by_alpha():
    policy, reference = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    policy.weight = mx.array([[1.0, 2.0], [3.0, 4.0]])
    reference.weight = mx.array([[0.0, 0.0], [1.0, -1.0]], dtype=mx.bfloat16)
    sync_reference(reference, policy, alpha=0.6)
    # 0.6 * policy + 0.4 * reference: [[0.6, 1.2], [2.2, 2.0]], stored in the reference's bfloat16
    assert reference.weight.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(reference.weight.astype(mx.float32)), [[0.6, 1.2], [2.2, 2.0]], rtol=4e-3)
    sync_reference(reference, policy, alpha=1.0)  # alpha 1: the policy itself
    np.testing.assert_array_equal(np.array(reference.weight.astype(mx.float32)), [[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("change, words", [
    ({"beta": 0.0}, "beta = 0"),
    ({"beta": 0.04, "train_type": "lora"}, "train_type"),
    ({"beta": 0.04, "ref_model_sync_steps": 0}, "ref_model_sync_steps"),
    ({"beta": 0.04, "ref_model_mixup_alpha": 1.5}, "ref_model_mixup_alpha"),
])
def test_settings_where_it_cannot_work_are_one_line_errors(change, words):
    with pytest.raises(ConfigError, match=words):
        validate(GRPOConfig(**{"sync_ref_model": True, **change}))


def test_a_run_that_syncs_its_reference_resumes_exactly(tmp_path, tiny_model_dir):
    """Synced after every step, stopped after step 1 of 2 and resumed: the same metrics (kl included) and
    weights, and the checkpoint's reference is the mixed one."""
    reward_file = toy_reward_file(tmp_path)
    settings = ("beta=0.04", "sync_ref_model=true", "ref_model_sync_steps=1", "ref_model_mixup_alpha=0.5",
                "learning_rate=1e-3", "max_train_samples=4", "save_steps=1", "eval_samples=1", "temperature=1.0",
                f"reward_file={reward_file}", "reward_funcs=digit_reward", "quantize_for_rollouts=false")
    run(tmp_path, tiny_model_dir, *settings, run_name="full")
    full = tmp_path / "out" / "full"
    part = interrupted_copy(full, tmp_path / "out" / "part", step=1, update=1)
    run(tmp_path, tiny_model_dir, *settings, run_name="part", extra_args=["--resume"])
    records = read_records(full)
    assert comparable(read_records(part)) == comparable(records)
    assert any(r.get("kl", 0) > 0 for r in records if "loss" in r)  # the second step's reference has moved
    step1, step2 = (dict(tree_flatten(mx.load(str(full / "checkpoints" / f"step_00000{s}" / name))))
                    for s, name in ((1, "reference.safetensors"), (2, "model.safetensors")))
    final_part = dict(tree_flatten(mx.load(str(part / "checkpoints" / "step_000002" / "model.safetensors"))))
    assert all(mx.array_equal(step2[k], final_part[k]) for k in step2)
    assert set(step1) == set(step2)
