"""Ctrl-C and SIGTERM: the run finishes its step, saves, returns normally with the resume command, and the
resumed run logs what an uninterrupted one logs; a second signal stops at once. Also the run-folder lock."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import subprocess_env
from test_trainer import comparable, read_records, run, same_weights, saved_weights

from mlx_grpo.training.interrupt import stop_on_signals
from mlx_grpo.training.run_lock import RunLockError, lock_file, lock_run_dir, unlock_run_dir

# The toy reward, and a Ctrl-C to this process while step $STOP_AT_STEP's rewards are computed.
STOPPING_REWARD = '''
import os, signal
calls = 0

def digits(completions, **kwargs):
    global calls
    calls += 1
    if str(calls) == os.environ.get("STOP_AT_STEP"):
        os.kill(os.getpid(), signal.SIGINT)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_the_second_stops(signum):
    previous = signal.getsignal(signum)
    stop = stop_on_signals()
    try:
        os.kill(os.getpid(), signum)
        assert stop.requested == signal.Signals(signum).name
        if signum == signal.SIGINT:  # the handler is gone: Python's own KeyboardInterrupt, at once
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
        else:
            assert signal.getsignal(signum) == previous  # the next SIGTERM ends the process as it would have
    finally:
        stop.restore()


def test_ctrl_c_saves_after_the_step_and_the_resume_is_exact(tmp_path, tiny_model_dir, capsys, monkeypatch):
    reward_file = tmp_path / "reward.py"
    reward_file.write_text(STOPPING_REWARD)
    settings = ("max_train_samples=6", "temperature=1.0", "learning_rate=1e-3", f"reward_file={reward_file}",
                "reward_funcs=digits", "eval_samples=1")
    run(tmp_path, tiny_model_dir, *settings, run_name="full")  # 3 steps, saved at the end only

    monkeypatch.setenv("STOP_AT_STEP", "2")
    run(tmp_path, tiny_model_dir, *settings, run_name="part")
    part = tmp_path / "out" / "part"
    out = capsys.readouterr().out
    assert "[stopped] by SIGINT after step 2 (update 2), checkpoint saved; continue with: python mlx-grpo.py " in out
    assert "--set run_name=part --resume" in out
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_000002"]

    monkeypatch.delenv("STOP_AT_STEP")
    run(tmp_path, tiny_model_dir, *settings, run_name="part", extra_args=["--resume"])
    full = tmp_path / "out" / "full"
    assert comparable(read_records(part)) == comparable(read_records(full))
    assert same_weights(saved_weights(full, 3), saved_weights(part, 3))


def test_a_locked_run_folder_names_its_owner_and_default_names_never_collide(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from mlx_grpo.training.run_lock import lock_run_dir; lock_run_dir(sys.argv[1], 'r'); "
        "print('locked', flush=True); sys.stdin.read()"), str(tmp_path)],
        env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        owner = rf"{tmp_path / 'r'} is being written by another run \(pid {holder.pid},"
        with pytest.raises(RunLockError, match=owner):
            lock_run_dir(tmp_path, "r")
    finally:
        holder.communicate("")
    assert lock_run_dir(tmp_path, "r") == "r"  # the lock went with its process
    unlock_run_dir(tmp_path / "r")
    assert not (tmp_path / "r").exists() and lock_file(tmp_path / "r").is_file()  # beside the run folder, not in it

    names = [lock_run_dir(tmp_path, "run-20260101-000000", unique_name=True) for _ in range(3)]
    assert names == ["run-20260101-000000", "run-20260101-000000-2", "run-20260101-000000-3"]
    for name in names:
        unlock_run_dir(tmp_path / name)


def test_a_full_disk_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    import errno

    import mlx_grpo.training.run_lock as run_lock

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(run_lock, "lock_run_dir", full)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, tiny_model_dir, run_name="r")
    assert str(stop.value) == (f"error: No space left on device: {tmp_path / 'out'}: free space or fix the folder's "
                               "permissions, then --resume continues from the last checkpoint")
