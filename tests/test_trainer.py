"""mlx-grpo.py end to end on the tiny fixture: smoke run, learning signal, eval-only, exact resume, the
resumed config; and the pieces of a step (utils/training/step.py, utils/training/update.py)."""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import trainer_main
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.generation.engine import Completion
from mlx_grpo.models import load_model
from mlx_grpo.training.update import (
    FusedAdamW,
    add_grads,
    clip_by_norm,
    eval_update_in_chunks,
    global_norm,
    make_loss_and_grad,
    make_lr_schedule,
    micro_batch_slices,
    pack_micro_batches,
    pack_rows,
    policy_update,
)

REPO = Path(__file__).resolve().parents[1]

TOY_REWARD = '''
def digit_reward(completions, **kwargs):
    """Toy task: the share of characters that are digits. A random model earns a little of it."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def toy_reward_file(folder: Path) -> Path:
    """folder/toy_reward.py with TOY_REWARD's digit_reward, for reward_file."""
    path = folder / "toy_reward.py"
    path.write_text(TOY_REWARD)
    return path


def run(tmp_path, model_dir, *overrides, run_name="run", extra_args=()):
    """The smoke config on model_dir, its runs in tmp_path/out; run_name=None gives none (--resume: the newest)."""
    args = ["--config", str(REPO / "configs" / "smoke.toml"),
            "--set", f"model_name={model_dir}", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "max_prompt_length=4096", "--set", f"dataset_path={REPO / 'data' / 'gsm8k'}", *extra_args]
    if run_name is not None:
        args += ["--set", f"run_name={run_name}"]
    for item in overrides:
        args += ["--set", item]
    return trainer_main(args)


def read_records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def train_records(run_dir):
    return [r for r in read_records(run_dir) if "loss" in r]


def test_smoke_run_writes_a_finite_loss_a_config_and_a_checkpoint(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, "max_train_samples=6")  # 3 steps of 2 prompts
    run_dir = tmp_path / "out" / "run"
    records = train_records(run_dir)
    assert [r["update"] for r in records] == [1, 2, 3]
    for r in records:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
        for key in ("reward", "reward_std", "rewards/gsm8k/mean", "frac_reward_zero_std", "entropy",
                    "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
                    "tools/calls", "tools/failures", "lr", "tokens_per_sec/rollout", "tokens_per_sec/train",
                    "time/step", "memory/peak_gb", "nan_events", "train/accuracy"):
            assert key in r, key
    assert records[0]["lr"] > 0  # the first update is never at learning rate 0
    assert json.load(open(run_dir / "config.resolved.json"))["max_train_samples"] == 6
    checkpoint = run_dir / "checkpoints" / "step_000003"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.pkl").exists()
    load_model(checkpoint)  # a checkpoint loads as a model
    evals = [r for r in read_records(run_dir) if "eval/accuracy" in r]
    assert [r["update"] for r in evals] == [0, 3]


def test_training_raises_the_reward_on_a_toy_task(tmp_path, tiny_model_dir):
    """The proof that the gradient has the right sign end to end: reward rises from ~0.1 to > 0.5."""
    reward_file = toy_reward_file(tmp_path)
    run(tmp_path, tiny_model_dir, f"reward_file={reward_file}", "reward_funcs=digit_reward",
        "learning_rate=3e-3", "max_train_samples=24", "prompts_per_step=4", "num_generations=8",
        "micro_batch_size=32", "temperature=1.0", "top_p=1.0", "max_grad_norm=1.0", "eval_samples=1")
    rewards = [r["reward"] for r in train_records(tmp_path / "out" / "run")]
    assert len(rewards) == 6
    assert rewards[0] < 0.3, rewards  # a random model sometimes earns it
    assert np.mean(rewards[-2:]) > rewards[0] + 0.3, rewards


def test_eval_only_scores_and_exits_without_a_run_folder(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "eval_samples=3", "eval_pass_k=2", extra_args=["--eval-only"])
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert set(metrics) >= {"eval/pass@1", "eval/pass@2"}
    assert not (tmp_path / "out").exists()


VOLATILE = ("time/", "tokens_per_sec/", "memory/", "eval/seconds")


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


def saved_weights(run_dir, step, file="model.safetensors") -> dict:
    """The weights (or adapters: file) of a run's checkpoint after `step`."""
    return mx.load(str(run_dir / "checkpoints" / f"step_{step:06d}" / file))


def same_weights(a: dict, b: dict) -> bool:
    return all(mx.array_equal(a[k], b[k]) for k in a)


def interrupted_copy(full, part, step, update):
    """The run folder `full` as it was right after its checkpoint of `step` (update `update`)."""
    (part / "checkpoints").mkdir(parents=True)
    name = f"step_{step:06d}"
    shutil.copytree(full / "checkpoints" / name, part / "checkpoints" / name)
    shutil.copy(full / "config.resolved.json", part)
    (part / "metrics.jsonl").write_text("".join(line for line in open(full / "metrics.jsonl")
                                                if json.loads(line)["update"] <= update))
    return part


def test_resume_continues_exactly_and_every_steps_key_counts_steps(tmp_path, tiny_model_dir, capsys):
    """A run stopped after step 2 and resumed logs the same metrics for steps 3-4 as an uninterrupted one.

    With num_iterations = 2 a step is 2 updates: eval, save, logging and completions every 2 steps
    happen after updates 4 and 8.
    """
    reward_file = toy_reward_file(tmp_path)
    settings = ("max_train_samples=8", "save_steps=2", "temperature=1.0", "learning_rate=1e-3",
                f"reward_file={reward_file}", "reward_funcs=digit_reward", "num_iterations=2", "beta=0.05",
                "eval_steps=2", "logging_steps=2", "completions_log_steps=2")
    run(tmp_path, tiny_model_dir, *settings, run_name="full")
    full = tmp_path / "out" / "full"
    console = [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("update ")]
    assert console == ["update 3", "update 4", "update 7", "update 8"]
    assert [r["update"] for r in read_records(full) if "eval/accuracy" in r] == [0, 4, 8]
    assert [r["update"] for r in map(json.loads, open(full / "completions.jsonl"))] == [4, 4, 8, 8]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_000002", "step_000004"]

    part = interrupted_copy(full, tmp_path / "out" / "part", step=2, update=4)
    run(tmp_path, tiny_model_dir, *settings, run_name="part", extra_args=["--resume"])

    assert comparable(read_records(part)) == comparable(read_records(full))
    assert same_weights(saved_weights(full, 4), saved_weights(part, 4))


# ---------------------------------------------------------------------------------------------
# --resume continues the saved config of its run


def folder_contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir):
    """A finished run of 2 steps, checkpointed after each (settings: what it was started with)."""
    tmp = tmp_path_factory.mktemp("saved_run")
    settings = ("max_train_samples=4", "save_steps=1", "eval_samples=2")
    run(tmp, tiny_model_dir, *settings, run_name="base")
    return tmp, settings


def test_resume_refuses_a_math_change_and_accepts_it_with_the_flag_on_record(saved_run, tiny_model_dir, capsys):
    tmp, settings = saved_run
    part = interrupted_copy(tmp / "out" / "base", tmp / "out" / "lr", step=1, update=1)
    before = folder_contents(part)
    with pytest.raises(SystemExit) as stop:
        run(tmp, tiny_model_dir, *settings, "learning_rate=2e-5", "seed=3", run_name="lr", extra_args=["--resume"])
    message = str(stop.value)
    assert "seed 0 -> 3; learning_rate 1e-05 -> 2e-05." in message and "--accept-changes" in message
    assert "\n" not in message
    assert folder_contents(part) == before  # a refused resume writes nothing

    run(tmp, tiny_model_dir, *settings, "learning_rate=2e-5", run_name="lr",
        extra_args=["--resume", "--accept-changes"])
    out = capsys.readouterr().out
    assert "[resume] learning_rate 1e-05 -> 2e-05 from update 2 (accepted with --accept-changes)" in out
    change = {"key": "learning_rate", "old": 1e-5, "new": 2e-5, "update": 2}
    state = json.loads((part / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["trainer_state"]
    assert state["config_changes"] == [change]
    records = read_records(part)
    assert [r for r in records if "config_changes" in r] == [{"update": 2, "config_changes": [change]}]
    # Update 2 of 2 on the new schedule: cosine from 2e-5 over 2 updates, halfway = 1e-5 (the old one: 5e-6).
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx([1e-5, 1e-5])
    assert json.loads((part / "config.resolved.json").read_text())["learning_rate"] == 2e-5


def test_resume_without_run_name_continues_the_newest_run_and_safe_keys_change_freely(saved_run, tiny_model_dir,
                                                                                      capsys):
    tmp, settings = saved_run
    runs = tmp / "runs"
    for name, age in (("a-newer", 0), ("b-older", 100)):  # the newest by its last checkpoint, not by name
        shutil.copytree(tmp / "out" / "base", runs / name)
        manifest = runs / name / "checkpoints" / "step_000002" / "checkpoint.json"
        os.utime(manifest, (manifest.stat().st_mtime - age,) * 2)
    older = folder_contents(runs / "b-older")
    history = run(tmp, tiny_model_dir, *settings, f"output_dir={runs}", "eval_samples=1", "logging_steps=3",
                  run_name=None, extra_args=["--resume"])
    out = capsys.readouterr().out
    assert f"[resume] no run_name given: continuing {runs / 'a-newer'}" in out
    assert "[resume] eval_samples 2 -> 1 from update 3 (a safe key)" in out
    assert "[resume] logging_steps 1 -> 3 from update 3 (a safe key)" in out
    assert [h["update"] for h in history] == [0, 2]  # the run had finished: nothing more to train
    assert json.loads((runs / "a-newer" / "config.resolved.json").read_text())["eval_samples"] == 1
    assert folder_contents(runs / "b-older") == older


def test_a_resume_that_fails_on_the_checkpoint_writes_nothing(saved_run, tiny_model_dir):
    tmp, settings = saved_run
    part = interrupted_copy(tmp / "out" / "base", tmp / "out" / "broken", step=1, update=1)
    state_file = part / "checkpoints" / "step_000001" / "trainer_state.json"
    # A key misspelt in place: the file keeps its size, so only loading the trainer state finds it.
    state_file.write_text(state_file.read_text().replace('"nan_streak"', '"nan_streaX"'))
    manifest = state_file.parent / "checkpoint.json"  # as written by a version without that key: hashes match
    recorded = json.loads(manifest.read_text())
    recorded["sha256"]["trainer_state.json"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(recorded))
    before = folder_contents(part)
    with pytest.raises(SystemExit, match="has no nan_streak in its trainer state"):
        run(tmp, tiny_model_dir, *settings, "eval_samples=1", run_name="broken", extra_args=["--resume"])
    assert folder_contents(part) == before


def test_a_fresh_run_into_a_run_folder_and_accept_changes_without_resume_are_refused(saved_run, tiny_model_dir):
    tmp, settings = saved_run
    with pytest.raises(SystemExit, match="already holds a run: pass --resume"):
        run(tmp, tiny_model_dir, *settings, run_name="base")
    with pytest.raises(SystemExit):
        run(tmp, tiny_model_dir, *settings, run_name="base", extra_args=["--accept-changes"])


def test_unknown_config_key_stops_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "/nonexistent/model", "learning_rte=1e-5")
    assert "learning_rate" in str(stop.value)


# ---------------------------------------------------------------------------------------------
# The pieces of an update


def test_pack_rows_masks_exactly_the_sampled_completion_tokens():
    prompts = [[1, 2, 3], [4]]
    completions = [Completion(0, tokens=[7, 8], sampled=[1, 1], stopped=True),
                   Completion(1, tokens=[5, 6, 9], sampled=[1, 0, 1], stopped=True)]
    batch = pack_rows(prompts, completions, pad_id=0)
    # row 0: full [1,2,3,7,8] -> inputs [1,2,3,7], targets [2,3,7,8]; completion targets at 2, 3
    assert batch.inputs.tolist() == [[1, 2, 3, 7], [4, 5, 6, 9]]
    assert batch.targets.tolist() == [[2, 3, 7, 8], [5, 6, 9, 0]]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]  # the forced token 6 gets no gradient
    dropped = pack_rows(prompts, completions, drop_rows={1})
    assert dropped.mask.tolist()[1] == [0, 0, 0, 0]


def test_pack_rows_pads_to_a_multiple_without_changing_the_loss(tiny_model_dir):
    prompts = [[1, 2, 3], [4]]
    completions = [Completion(0, tokens=[7, 8], sampled=[1, 1], stopped=True),
                   Completion(1, tokens=[5, 6, 9], sampled=[1, 0, 1], stopped=True)]
    plain, padded = pack_rows(prompts, completions), pack_rows(prompts, completions, pad_multiple=8)
    assert padded.inputs.shape == padded.targets.shape == padded.mask.shape == (2, 8)
    assert padded.inputs[:, :4].tolist() == plain.inputs.tolist()
    assert padded.targets[:, :4].tolist() == plain.targets.tolist() and padded.targets[:, 4:].tolist() == [[0] * 4] * 2
    assert padded.mask[:, :4].tolist() == plain.mask.tolist() and padded.mask[:, 4:].sum().item() == 0
    assert pack_rows(prompts, completions, pad_multiple=4).inputs.shape == (2, 4)  # already a multiple
    with pytest.raises(ValueError, match="pad_multiple"):
        pack_rows(prompts, completions, pad_multiple=0)
    # Right padding is causal-invisible and masked: the loss and its gradient do not move.
    model, _ = load_model(tiny_model_dir)
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
        importance_sampling_level="token", max_completion_length=8)
    norms = (mx.array(2.0), mx.array(4.0), mx.array(1.0))
    results = [loss_and_grad(b.inputs, b.targets, b.mask, mx.array([1.0, -0.5]), None, None, *norms)
               for b in (plain, padded)]
    (loss_a, _), grads_a = results[0]
    (loss_b, _), grads_b = results[1]
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    for (name, a), (_, b) in zip(tree_flatten(grads_a), tree_flatten(grads_b)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-7, err_msg=name)


def test_fused_adamw_takes_exactly_mlx_adamw_steps():
    """Same arithmetic in the same order: the compiled update matches mlx's AdamW to the bit."""
    shapes = {"w": (33, 17), "b": (17,)}
    weights = {k: mx.random.normal(s, key=mx.random.key(i)) for i, (k, s) in enumerate(shapes.items())}
    for decay in (0.0, 0.1):
        schedule = optim.cosine_decay(1e-2, 10)
        plain = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=decay)
        fused = FusedAdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=decay)
        a, b = dict(weights), dict(weights)
        for step in range(4):
            grads = {k: mx.random.normal(s, key=mx.random.key(10 + step)) for k, s in shapes.items()}
            a, b = plain.apply_gradients(grads, a), fused.apply_gradients(grads, b)
        for k in shapes:
            assert mx.array_equal(a[k], b[k]).item(), k
            assert mx.array_equal(plain.state[k]["v"], fused.state[k]["v"]).item(), k
    corrected = FusedAdamW(learning_rate=1e-2, bias_correction=True)  # falls back to mlx's own update
    reference = optim.AdamW(learning_rate=1e-2, bias_correction=True)
    grads = {"w": mx.ones((3,))}
    assert mx.array_equal(corrected.apply_gradients(grads, {"w": mx.zeros((3,))})["w"],
                          reference.apply_gradients(grads, {"w": mx.zeros((3,))})["w"]).item()


def test_clipping_on_the_norm_already_taken_equals_mlx_clip_grad_norm():
    grads = {"a": mx.array([3.0, -4.0]), "b": {"c": mx.array([[12.0]])}}
    for max_norm in (1.0, 100.0):  # clipped, and left alone
        ours = clip_by_norm(grads, global_norm(grads), max_norm)
        theirs, norm = optim.clip_grad_norm(grads, max_norm)
        assert norm.item() == pytest.approx(13.0) and global_norm(grads).item() == pytest.approx(13.0)
        for (name, a), (_, b) in zip(tree_flatten(ours), tree_flatten(theirs)):
            assert mx.array_equal(a, b).item(), name


def test_add_grads_sums_in_float32():
    first = {"w": mx.array([1.0, 2.0], dtype=mx.bfloat16)}
    total = add_grads(add_grads(None, first), {"w": mx.array([0.5, 1e-3], dtype=mx.bfloat16)})
    assert total["w"].dtype == mx.float32
    np.testing.assert_allclose(np.array(total["w"]), [1.5, 2.0 + float(mx.array(1e-3, dtype=mx.bfloat16))])


def test_micro_batches_keep_the_last_partial_batch():
    assert micro_batch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


def test_lr_schedule_warmup_starts_above_zero_and_decays_over_the_real_updates():
    schedule = make_lr_schedule(1.0, total_updates=10, warmup_ratio=0.2, kind="cosine")
    lrs = [float(schedule(mx.array(u))) for u in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # warmup of 2 updates
    assert lrs[2] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert 0 < lrs[-1] < 0.1
    linear = make_lr_schedule(2.0, total_updates=4, warmup_ratio=0.0, kind="linear")
    assert [float(linear(mx.array(u))) for u in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="cosine"):
        make_lr_schedule(1.0, 4, 0.0, "exponential")


def one_update(model, learning_rate, use_compile=False, compute_dtype=mx.float32):
    completions = [Completion(0, tokens=[10, 11, 12], sampled=[1, 1, 1], stopped=True),
                   Completion(0, tokens=[13, 14], sampled=[1, 1], stopped=True)]
    slices, batches = pack_micro_batches([[1, 2, 3]], completions, micro_batch_size=1)
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
        importance_sampling_level="token", max_completion_length=8, compute_dtype=compute_dtype,
        use_compile=use_compile)
    optimizer = optim.AdamW(learning_rate=learning_rate, weight_decay=0.0)
    return policy_update(model, optimizer, loss_and_grad, batches, slices, mx.array([1.0, -1.0]), None, None,
                         {"num_sequences_total": 2, "num_tokens_total": 5, "num_micro_batches": 2}, 1.0)


def test_one_update_at_lr_1e6_changes_the_float32_weights(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    result = one_update(model, 1e-6)
    assert result.applied and result.grad_norm > 0
    after = dict(tree_flatten(model.parameters()))
    changed = [k for k in before if not mx.array_equal(before[k], after[k])]
    assert "lm_head.weight" in changed and len(changed) == len(before)
    assert all(v.dtype == mx.float32 for v in after.values())


def test_compiled_and_bf16_updates_agree_with_the_plain_float32_one(tiny_model_dir):
    results = {}
    for name, kwargs in {"plain": {}, "compiled": {"use_compile": True},
                         "bf16": {"compute_dtype": mx.bfloat16}}.items():
        model, _ = load_model(tiny_model_dir)
        results[name] = (one_update(model, 1e-3, **kwargs), dict(tree_flatten(model.parameters())))
    plain_result, plain_weights = results["plain"]
    compiled_result, compiled_weights = results["compiled"]
    assert compiled_result.grad_norm == pytest.approx(plain_result.grad_norm, rel=1e-4)
    assert all(mx.allclose(plain_weights[k], compiled_weights[k], atol=1e-6) for k in plain_weights)
    bf16_result, bf16_weights = results["bf16"]
    assert bf16_result.grad_norm == pytest.approx(plain_result.grad_norm, rel=0.1)
    assert all(v.dtype == mx.float32 for v in bf16_weights.values())  # master weights stay float32


def test_bf16_compute_gradients_equal_those_of_the_float32_weights_through_a_cast(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    inputs = mx.array([[1, 2, 3, 10, 11, 12]])
    targets = mx.array([[2, 3, 10, 11, 12, 13]])
    mask = mx.array([[0, 0, 1, 1, 1, 1]], dtype=mx.float32)
    args = (inputs, targets, mask, mx.array([1.0]), None, None, mx.array(1.0), mx.array(4.0), mx.array(1.0))
    loss_and_grad = make_loss_and_grad(
        model, temperature=1.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.2, beta=0.0,
        importance_sampling_level="token", max_completion_length=8, compute_dtype=mx.bfloat16)
    with loss_and_grad.compute_weights():
        (loss, _), grads = loss_and_grad(*args)
        assert all(g.dtype == mx.bfloat16 for _, g in tree_flatten(grads))
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))  # master restored

    def through_cast(*args):  # the same loss with the float32 weights cast inside the graph
        master = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(mx.bfloat16), master))
        loss, _ = loss_and_grad.loss_fn(*args)
        model.update(master)
        return loss

    reference_loss, reference = nn.value_and_grad(model, through_cast)(*args)
    assert loss.item() == reference_loss.item()
    for (name, g), (_, r) in zip(tree_flatten(grads), tree_flatten(reference)):
        assert r.dtype == mx.float32
        np.testing.assert_array_equal(np.array(g.astype(mx.float32)), np.array(r), err_msg=name)


def test_update_in_chunks_equals_the_update_at_once(tiny_model_dir):
    results = []
    for chunk_bytes in (None, 1):  # None: one eval of everything; 1 byte: one parameter per chunk
        model, _ = load_model(tiny_model_dir)
        optimizer = optim.AdamW(learning_rate=1e-2)
        grads = tree_map(lambda p: mx.ones_like(p) * 0.1, model.trainable_parameters())
        optimizer.update(model, grads)
        if chunk_bytes is None:
            mx.eval(model.parameters(), optimizer.state)
        else:
            eval_update_in_chunks(model, optimizer, chunk_bytes)
        results.append(dict(tree_flatten(model.parameters())))
    for name, value in results[0].items():
        np.testing.assert_array_equal(np.array(value), np.array(results[1][name]), err_msg=name)


# ---------------------------------------------------------------------------------------------
# The step (utils/training/step.py)


def tiny_step(model_dir, **settings):
    from mlx_grpo.config import GRPOConfig, validate
    from mlx_grpo.training.distributed import World
    from mlx_grpo.training.lora import add_adapters
    from mlx_grpo.training.step import build_step

    cfg = validate(GRPOConfig(run_name="t", num_generations=2, max_new_tokens=4, max_completion_length=4,
                              use_compile=False, pad_to_multiple_of=1, quantize_for_rollouts=False,
                              rollout_quant_group_size=32, **settings))
    model, _ = load_model(model_dir)
    if cfg.train_type != "full":
        add_adapters(model, cfg)
    return build_step(cfg, World(), model, total_updates=4, stop_token_ids=set())


PROMPTS = [[1, 2, 3], [4, 5]]


def test_rollouts_come_from_the_copy_the_settings_ask_for(tiny_model_dir):
    from mlx_grpo.training.lora import is_quantized
    from mlx_grpo.training.step import rollout_policy

    plain = tiny_step(tiny_model_dir)
    assert rollout_policy(plain, quantized=False) is plain.model  # float32: the policy itself
    bf16 = tiny_step(tiny_model_dir, compute_dtype="bfloat16")
    copy = rollout_policy(bf16, quantized=False)
    assert copy is not bf16.model and all(v.dtype == mx.bfloat16 for _, v in tree_flatten(copy.parameters()))
    assert is_quantized(rollout_policy(bf16, quantized=True))
    lora = tiny_step(tiny_model_dir, compute_dtype="bfloat16", train_type="lora")
    merged = rollout_policy(lora, quantized=False)  # adapters merged into a dense compute_dtype copy
    assert merged is not lora.model and all(v.dtype == mx.bfloat16 for _, v in tree_flatten(merged.parameters()))


def test_old_policy_log_probs_only_where_they_differ_from_the_current_ones(tiny_model_dir):
    from mlx_grpo.training.step import TrainState, sample_rollouts

    on_policy = sample_rollouts(tiny_step(tiny_model_dir), TrainState(), PROMPTS)
    assert on_policy.old_logp is None and on_policy.ref_logp is None and len(on_policy.completions) == 4
    assert set(on_policy.seconds) == {"rollout", "old_policy", "reference"}
    reused = sample_rollouts(tiny_step(tiny_model_dir, num_iterations=2), TrainState(), PROMPTS)
    quantized = sample_rollouts(tiny_step(tiny_model_dir, beta=0.1, vllm_importance_sampling_correction=False),
                                TrainState(rollouts_quantized=True), PROMPTS)
    assert reused.old_logp is not None and quantized.old_logp is not None and quantized.quantized
    assert quantized.old_logp is quantized.rollout_logp and quantized.is_weights is None  # today's behaviour
    assert quantized.ref_logp is not None and len(quantized.ref_logp) == len(quantized.batches)


def test_quantized_rollouts_are_weighted_by_the_trained_policys_ratio(tiny_model_dir):
    from mlx_grpo.training.step import TrainState, grpo_updates, sample_rollouts
    from mlx_grpo.training.update import frozen_logprobs

    # one update per batch: "old" is the policy itself (None), the weights exp(trained - rollout) capped at 3
    setup = tiny_step(tiny_model_dir)
    corrected = sample_rollouts(setup, TrainState(rollouts_quantized=True), PROMPTS)
    assert corrected.old_logp is None and len(corrected.is_weights) == len(corrected.batches)
    trained = frozen_logprobs(setup.model, corrected.batches, setup.cfg.temperature)
    for weights, own, rollout, batch in zip(corrected.is_weights, trained, corrected.rollout_logp, corrected.batches):
        want = np.minimum(np.exp(np.where(np.array(batch.mask) > 0, np.array(own) - np.array(rollout), 0.0)), 3.0)
        np.testing.assert_allclose(np.array(weights), want, rtol=1e-5)
    assert set(corrected.sampling) == {f"sampling/{name}" for name in (
        "sampling_logp_difference/mean", "sampling_logp_difference/max", "importance_sampling_ratio/min",
        "importance_sampling_ratio/mean", "importance_sampling_ratio/max")}
    assert corrected.sampling["sampling/importance_sampling_ratio/max"] <= 3.0
    # two updates per batch: "old" is the trained policy's own log-probs, not the quantized copy's
    setup = tiny_step(tiny_model_dir, num_iterations=2)
    reused = sample_rollouts(setup, TrainState(rollouts_quantized=True), PROMPTS)
    for old, own in zip(reused.old_logp, frozen_logprobs(setup.model, reused.batches, setup.cfg.temperature)):
        np.testing.assert_array_equal(np.array(old), np.array(own))
    updates = grpo_updates(setup, TrainState(), reused, [1.0, 0.0, 0.0, 1.0])
    assert all(u.result.applied for u in updates)
    # TRL's reward_std: the std of all 4 rewards (ddof 1): mean 0.5, var (4 * 0.25) / 3 = 1/3
    assert updates[0].reward_std == pytest.approx(math.sqrt(1 / 3))


def test_non_finite_quantized_rollouts_switch_to_full_precision_and_sample_again(tiny_model_dir, monkeypatch, capsys):
    import mlx_grpo.training.step as step

    checked = []
    monkeypatch.setattr(step, "masked_all_finite", lambda arrays, batches: checked.append(1) and False)
    state = step.TrainState(rollouts_quantized=True)
    rollouts = step.sample_rollouts(tiny_step(tiny_model_dir), state, PROMPTS)
    assert checked == [1] and "switch to full precision" in capsys.readouterr().out
    assert (state.rollouts_quantized, state.nan_events) == (False, 1)
    assert not rollouts.quantized and rollouts.old_logp is None and len(rollouts.completions) == 4


def test_updates_count_skips_and_stop_after_max_nan_steps_in_a_row(tiny_model_dir):
    from mlx_grpo.training.step import TrainingError, TrainState, every, grpo_updates, sample_rollouts

    setup = tiny_step(tiny_model_dir, num_iterations=2, max_nan_steps=3)
    state = TrainState()
    rollouts = sample_rollouts(setup, state, PROMPTS)
    updates = grpo_updates(setup, state, rollouts, [1.0, 0.0, 0.0, 1.0])
    assert [u.update for u in updates] == [1, 2] and all(u.result.applied for u in updates)
    assert (state.step, state.update, state.nan_streak) == (1, 2, 0)
    assert updates[0].lr == pytest.approx(1e-6 / 1)  # the first warmup update (warmup of 1 of 4 updates)
    head = setup.model.lm_head.weight
    setup.model.update({"lm_head": {"weight": mx.full(head.shape, float("nan"))}})  # every loss is NaN now
    with pytest.raises(TrainingError, match="3 updates in a row had non-finite loss"):
        grpo_updates(setup, state, rollouts, [1.0, 0.0, 0.0, 1.0])  # two skipped ...
        grpo_updates(setup, state, rollouts, [1.0, 0.0, 0.0, 1.0])  # ... and the third stops the run
    assert (state.update, state.nan_streak, state.nan_events) == (5, 3, 3)
    assert [s for s in range(1, 7) if every(2, s)] == [2, 4, 6] and not any(every(0, s) for s in range(1, 7))
