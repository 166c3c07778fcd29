"""Checkpoints: exact resume, RNG round trip, atomic saves, pruning, clear errors."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import subprocess_env
from mlx.utils import tree_flatten

from mlx_grpo.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest_checkpoint,
    find_latest_run,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    resume_point,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(4, 8), nn.Linear(8, 2)]

    def __call__(self, x):
        return self.layers[1](nn.relu(self.layers[0](x)))


def make_optimizer():
    return optim.AdamW(learning_rate=optim.cosine_decay(1e-2, 20), weight_decay=0.01)


def train_steps(model, optimizer, n):
    """Each step draws its batch from mx.random and numpy, so RNG restore matters too."""
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: ((m(x) - y) ** 2).mean())
    for _ in range(n):
        x = mx.random.normal((3, 4))
        y = mx.array(np.random.standard_normal((3, 2)).astype(np.float32)) * random.random()
        _, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


def weights_writer(model):
    def write(folder: Path):
        model.save_weights(str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return write


def save(run_dir, step, model, optimizer, **kwargs):
    return save_checkpoint(run_dir, step, optimizer=optimizer,
                           trainer_state={"update": step, "data_position": 3 * step},
                           config={"lr": 1e-2, "output_dir": Path(run_dir)},
                           write_model_files=weights_writer(model), **kwargs)


def seed_all(seed):
    mx.random.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_exact_resume_is_bit_identical(tmp_path):
    seed_all(0)
    model = TinyNet()
    optimizer = make_optimizer()
    train_steps(model, optimizer, 3)
    path = save(tmp_path, 3, model, optimizer)
    train_steps(model, optimizer, 4)  # the uninterrupted run
    reference = tree_flatten(model.parameters())

    seed_all(123)  # a "new process": different init and RNG states
    resumed_model = TinyNet()
    resumed_optimizer = make_optimizer()
    resumed_model.load_weights(str(path / "model.safetensors"))
    state = load_checkpoint(path, optimizer=resumed_optimizer)
    assert state == {"update": 3, "data_position": 9}
    assert resumed_optimizer.state["step"].item() == 3
    saved = dict(tree_flatten(mx.load(str(path / "optimizer.safetensors"))))
    for key, value in tree_flatten(resumed_optimizer.state):
        assert mx.array_equal(value, saved[key]), key
    train_steps(resumed_model, resumed_optimizer, 4)

    assert resumed_optimizer.state["step"].item() == optimizer.state["step"].item() == 7
    resumed = dict(tree_flatten(resumed_model.parameters()))
    for name, want in reference:
        assert np.array_equal(np.array(want), np.array(resumed[name])), name  # bit-identical
    want_state, got_state = dict(tree_flatten(optimizer.state)), dict(tree_flatten(resumed_optimizer.state))
    assert want_state.keys() == got_state.keys()
    for name, want in want_state.items():
        assert np.array_equal(np.array(want), np.array(got_state[name])), name


def test_checkpoint_contents(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    train_steps(model, optimizer, 1)
    path = save(tmp_path, 1, model, optimizer)
    assert path == tmp_path / "checkpoints" / "step_000001"
    names = {p.name for p in path.iterdir()}
    assert names == {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json",
                     "config.resolved.json", "checkpoint.json"}
    config = json.loads((path / "config.resolved.json").read_text())
    assert config == {"lr": 1e-2, "output_dir": str(tmp_path)}
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    assert set(trainer_state["rng_state"]) == {"python", "numpy", "mlx"}
    assert "learning_rate" in mx.load(str(path / "optimizer.safetensors"))


def test_rng_capture_restore_gives_identical_draws():
    seed_all(7)
    mx.random.uniform(shape=(5,))  # move away from a freshly seeded state
    state = capture_rng_state()
    json.dumps(state)  # JSON-safe
    first = (mx.random.normal((6,)), np.random.rand(4), [random.random() for _ in range(3)],
             np.random.standard_normal())
    seed_all(99)
    restore_rng_state(json.loads(json.dumps(state)))
    second = (mx.random.normal((6,)), np.random.rand(4), [random.random() for _ in range(3)],
              np.random.standard_normal())
    assert mx.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2] and first[3] == second[3]


def test_error_inside_write_model_files_leaves_previous_checkpoint(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    previous = save(tmp_path, 1, model, optimizer)

    def broken(folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, optimizer=optimizer, trainer_state={}, config={},
                        write_model_files=broken)
    assert find_latest_checkpoint(tmp_path) == previous
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlx.optimizers as optim
    from mlx_grpo.training.checkpoint import save_checkpoint

    run_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
    def slow_writer(folder):
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
        ready.write_text("writing")
        time.sleep(60)
    save_checkpoint(run_dir, 2, optimizer=optim.AdamW(learning_rate=1e-3), trainer_state={},
                    config={}, write_model_files=slow_writer)
""")


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    previous = save(tmp_path, 1, model, optimizer)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path), str(ready)], env=subprocess_env(),
                            cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the saving subprocess died before writing"
            assert time.monotonic() < deadline, "the saving subprocess never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [f".tmp-step_000002-{proc.pid}"]
    assert find_latest_checkpoint(tmp_path) == previous

    save(tmp_path, 3, model, optimizer)  # the next save cleans up the dead process's folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000003"]


def test_folder_without_manifest_is_ignored_and_refused(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    previous = save(tmp_path, 1, model, optimizer)
    broken = tmp_path / "checkpoints" / "step_000005"
    broken.mkdir()
    (broken / "optimizer.safetensors").write_bytes(b"")
    assert find_latest_checkpoint(tmp_path) == previous
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*checkpoint.json"):
        load_checkpoint(broken, optimizer=make_optimizer())


def test_truncated_file_is_refused(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    path = save(tmp_path, 1, model, optimizer)
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert find_latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="model.safetensors has 10 bytes"):
        load_checkpoint(path, optimizer=make_optimizer())


def test_run_dir_instead_of_checkpoint_gives_hint(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    save(tmp_path, 1, model, optimizer)
    with pytest.raises(CheckpointError, match="find_latest_checkpoint"):
        load_checkpoint(tmp_path, optimizer=make_optimizer())


def test_mismatched_optimizer_or_model_is_refused(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    train_steps(model, optimizer, 1)
    path = save(tmp_path, 1, model, optimizer)
    with pytest.raises(CheckpointError, match="AdamW state but the optimizer is SGD"):
        load_checkpoint(path, optimizer=optim.SGD(learning_rate=0.1))
    other = optim.AdamW(learning_rate=1e-3)
    other.init(nn.Linear(3, 3).trainable_parameters())
    with pytest.raises(CheckpointError, match="does not match the model's parameters"):
        load_checkpoint(path, optimizer=other)


def test_keep_last_prunes_older(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    save(tmp_path, 4, model, optimizer, keep_last=1)  # re-saving a step replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_bad_arguments(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    with pytest.raises(CheckpointError, match="trainer_state holds a set"):
        save_checkpoint(tmp_path, 1, optimizer=optimizer, trainer_state={"x": {1}}, config={},
                        write_model_files=weights_writer(model))
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 1, model, optimizer, keep_last=-1)
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path, 1, optimizer=optimizer, trainer_state={}, config={},
                        write_model_files=lambda d: (d / "trainer_state.json").write_text("{}"))
    assert find_latest_checkpoint(tmp_path) is None


def test_the_newest_run_is_the_one_whose_last_checkpoint_was_written_last(tmp_path):
    model, optimizer = TinyNet(), make_optimizer()
    assert find_latest_run(tmp_path / "none") is None
    for name, age in (("a", 0), ("b", 50), ("c", 100)):
        path = save(tmp_path / name, 1, model, optimizer)
        os.utime(path / "checkpoint.json", (time.time() - age,) * 2)
    (tmp_path / "no-checkpoint").mkdir()
    assert find_latest_run(tmp_path) == tmp_path / "a"
    later = save(tmp_path / "c", 2, model, optimizer)  # written now: c is the newest run
    assert find_latest_run(tmp_path) == tmp_path / "c"
    assert resume_point(tmp_path) == (tmp_path / "c", later)
    assert resume_point(tmp_path, "b") == (tmp_path / "b", tmp_path / "b" / "checkpoints" / "step_000001")
    first = tmp_path / "c" / "checkpoints" / "step_000001"
    assert resume_point(tmp_path, checkpoint=first) == (tmp_path / "c", first)  # the run holding it
    with pytest.raises(CheckpointError, match="no run with a complete checkpoint"):
        resume_point(tmp_path / "none")
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        resume_point(tmp_path, "no-checkpoint")
    a_first = tmp_path / "a" / "checkpoints" / "step_000001"
    assert resume_point(tmp_path, checkpoint=tmp_path / "a") == (tmp_path / "a", a_first)  # a run folder: its newest
    with pytest.raises(CheckpointError, match="no such folder"):
        resume_point(tmp_path, checkpoint=tmp_path / "typo")


def test_a_checkpoint_whose_content_changed_is_skipped_for_the_previous_one(tmp_path, capsys):
    """Same size, one flipped bit: the manifest's sha256 catches it, and resume takes the checkpoint before."""
    model, optimizer = TinyNet(), make_optimizer()
    first = save(tmp_path / "run", 1, model, optimizer)
    second = save(tmp_path / "run", 2, model, optimizer)
    manifest = json.loads((second / "checkpoint.json").read_text())
    assert manifest["sha256"]["optimizer.safetensors"] == hashlib.sha256(
        (second / "optimizer.safetensors").read_bytes()).hexdigest()
    data = bytearray((second / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0x01
    (second / "optimizer.safetensors").write_bytes(bytes(data))
    assert resume_point(tmp_path, "run") == (tmp_path / "run", first)
    assert f"skipping {second}: optimizer.safetensors does not match its sha256" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match its sha256"):
        resume_point(tmp_path, "run", checkpoint=second)  # asked for by name: an error, not a fallback


def test_the_train_state_round_trips_through_a_checkpoint_as_a_whole(tmp_path, tiny_model_dir):
    from mlx_grpo.config import GRPOConfig, validate
    from mlx_grpo.models import load_model
    from mlx_grpo.training.distributed import World
    from mlx_grpo.training.step import TrainState, build_step, load_training_checkpoint, save_training_checkpoint

    def setup():
        cfg = validate(GRPOConfig(run_name="r", use_compile=False, quantize_for_rollouts=False))
        return build_step(cfg, World(), load_model(tiny_model_dir)[0], total_updates=10, stop_token_ids=set())

    state = TrainState(step=3, update=6, nan_streak=1, nan_events=2, rollouts_quantized=True,
                       data={"epoch": 0, "position": 6, "seed": 0, "shuffle": True, "num_examples": 8},
                       eval_history=[{"update": 0, "eval/accuracy": 0.25}],
                       config_changes=[{"key": "learning_rate", "old": 1e-6, "new": 2e-6, "update": 5}])
    saved = setup()
    saved.model.update({"lm_head": {"weight": saved.model.lm_head.weight + 1.0}})  # not the starting weights
    saved.optimizer.init(saved.model.trainable_parameters())
    path = save_training_checkpoint(saved, state, tmp_path, lambda folder: saved.model.save_weights(
        str(folder / "model.safetensors")))
    assert path == tmp_path / "checkpoints" / "step_000003"
    resumed = setup()
    assert load_training_checkpoint(resumed, path) == state
    assert mx.array_equal(resumed.model.lm_head.weight, saved.model.lm_head.weight).item()
    with pytest.raises(CheckpointError, match="has no nan_streak, data"):
        TrainState.from_dict({k: v for k, v in state.to_dict().items() if k not in ("nan_streak", "data")})
