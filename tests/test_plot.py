"""Plots: PNGs from a synthetic metrics.jsonl, skipped plots, CLI, clear errors."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_grpo.plot import plot_run
from mlx_grpo.training.metrics import MetricsLogger

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = ["reward.png", "accuracy.png", "kl.png", "completion_length.png", "tokens_per_sec.png", "training.png"]


def write_synthetic_run(run_dir: Path, updates: int = 30) -> None:
    with MetricsLogger(run_dir) as logger:
        for u in range(1, updates + 1):
            reward = 0.2 + 0.5 * u / updates
            logger.log(u, {
                "reward": reward, "reward_std": 0.3 - 0.1 * u / updates,
                "rewards/correctness/mean": reward * 0.9, "rewards/format/mean": min(1.0, 0.5 + u / 20),
                "frac_reward_zero_std": 0.25, "loss": 0.1 * math.sin(u), "kl": 0.001 * u,
                "entropy": 1.5 - u / 40, "clip_ratio/low_mean": 0.01, "clip_ratio/high_mean": 0.02,
                "clip_ratio/region_mean": 0.03, "completions/mean_length": 100 + u,
                "completions/min_length": 40 + u, "completions/max_length": 200 + 2 * u,
                "completions/clipped_ratio": 0.05, "lr": 1e-6 * (1 - u / (updates + 1)),
                "grad_norm": float("nan") if u == 7 else 0.5 + 0.01 * u, "tokens_per_sec/rollout": 900 + u,
                "tokens_per_sec/train": 2500 - u, "time/step": 3.2, "memory/peak_gb": 6.5, "nan_events": int(u == 7),
                "train/accuracy": reward * 0.8,
            })
            if u % 10 == 0:
                logger.log(u, {"eval/accuracy": 0.05 + 0.002 * u, "eval/pass@1": 0.05 + 0.002 * u,
                               "eval/pass@4": 0.12 + 0.003 * u, "eval/pass@8": 0.18 + 0.003 * u})


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def test_plot_run_writes_all_pngs(tmp_path):
    write_synthetic_run(tmp_path)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ALL_PLOTS
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_absent_metrics_are_skipped_with_a_note(tmp_path, capsys):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward": 0.1, "loss": float("nan")})  # loss only ever NaN: nothing to draw
        logger.log(2, {"reward": 0.3, "loss": None})
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png"]
    err = capsys.readouterr().err
    assert "skipped kl.png (no 'kl' in metrics.jsonl)" in err
    assert "skipped training.png" in err and "skipped accuracy.png" in err


def test_cli(tmp_path):
    write_synthetic_run(tmp_path, updates=12)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "utils" / "plot.py"), str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert [p.name for p in printed] == ALL_PLOTS
    for path in printed:
        assert_png(path)


@pytest.mark.parametrize("make_dir", [False, True])
def test_cli_missing_run_or_metrics(tmp_path, make_dir):
    run_dir = tmp_path / "run"
    if make_dir:
        run_dir.mkdir()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "utils" / "plot.py"), str(run_dir)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert ("no metrics.jsonl" if make_dir else "does not exist") in lines[0]


def test_empty_metrics_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records yet"):
        plot_run(tmp_path)
