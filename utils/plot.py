"""Plots of a run's metrics.jsonl: reward, accuracy, KL, completion length, throughput, optimisation.

    python utils/plot.py RUN_DIR      # writes RUN_DIR/plots/*.png and prints their paths

Uses matplotlib's Agg canvas directly (no display, no pyplot global state).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

try:
    from mlx_grpo.training.metrics import METRICS_FILE, read_metrics
except ModuleNotFoundError as missing:  # run from a checkout that was never installed
    if missing.name != "mlx_grpo":
        raise
    sys.exit("error: the package mlx_grpo is not installed in this Python: run pip install -e . in the checkout")

PLOTS_DIRNAME = "plots"
_REWARD_FN_RE = re.compile(r"^rewards/(.+)/mean$")
_PASS_AT_K_RE = re.compile(r"^eval/pass@(\d+)$")


def plot_run(run_dir: str | Path, *, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for one run into run_dir/plots/ (or out_dir); return the written paths.

    A plot whose metrics are absent is skipped with a one-line note on stderr.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / METRICS_FILE} has no records yet: plot after the first logged update")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, needs, draw in _PLOTS:
        fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        if not draw(fig, records):
            print(f"plot: skipped {name}.png (no {needs} in {METRICS_FILE})", file=sys.stderr)
            continue
        fig.suptitle(f"{run_dir.name}: {title}", fontsize=11)
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# data

def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(updates, values) of the records holding `key`; null (non-finite) values become NaN gaps.

    None if the key is absent or never has a finite value.
    """
    points = [(r["update"], np.nan if r[key] is None else r[key]) for r in records
              if key in r and (r[key] is None or (isinstance(r[key], (int, float)) and not isinstance(r[key], bool)))]
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    return (x, y) if np.isfinite(y).any() else None


def _keys_matching(records: list[dict], pattern: re.Pattern) -> list[str]:
    return sorted({k for r in records for k in r if pattern.match(k)})


def _line(ax, records, key, label=None, **style) -> bool:
    data = _series(records, key)
    if data is None:
        return False
    x, y = data
    if len(x) <= 20:  # sparse series (e.g. evals): show the points
        style.setdefault("marker", "o")
        style.setdefault("markersize", 3)
    ax.plot(x, y, label=label or key, **style)
    return True


def _finish(ax, ylabel: str) -> None:
    ax.set_xlabel("update")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------
# plots: each draws into `fig` and returns False (drawing nothing) when its metrics are absent

def _plot_reward(fig, records) -> bool:
    fn_keys = _keys_matching(records, _REWARD_FN_RE)
    if _series(records, "reward") is None and not any(_series(records, k) for k in fn_keys):
        return False
    ax = fig.add_subplot()
    if _line(ax, records, "reward", label="reward (mean)", color="C0", linewidth=2):
        both = [r for r in records if isinstance(r.get("reward"), (int, float)) and isinstance(r.get("reward_std"), (int, float))]
        if both:
            both.sort(key=lambda r: r["update"])
            x = np.array([r["update"] for r in both], dtype=np.float64)
            mean = np.array([r["reward"] for r in both])
            std = np.array([r["reward_std"] for r in both])
            ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.2, label="± reward_std")
    for i, key in enumerate(fn_keys):
        _line(ax, records, key, label=_REWARD_FN_RE.match(key).group(1), color=f"C{i + 1}", linestyle="--", linewidth=1)
    _finish(ax, "reward")
    return True


def _plot_accuracy(fig, records) -> bool:
    pass_keys = sorted(_keys_matching(records, _PASS_AT_K_RE), key=lambda k: int(_PASS_AT_K_RE.match(k).group(1)))
    keys = ["eval/accuracy", *pass_keys, "train/accuracy"]
    if not any(_series(records, k) for k in keys):
        return False
    ax = fig.add_subplot()
    _line(ax, records, "train/accuracy", label="train accuracy", color="C7", alpha=0.7)
    _line(ax, records, "eval/accuracy", label="eval accuracy", color="C0", linewidth=2, marker="o")
    for i, key in enumerate(pass_keys):
        _line(ax, records, key, label=key.split("/")[1], color=f"C{i + 1}", linestyle="--", marker=".")
    ax.set_ylim(bottom=0)
    _finish(ax, "accuracy")
    return True


def _plot_kl(fig, records) -> bool:
    if _series(records, "kl") is None:
        return False
    ax = fig.add_subplot()
    _line(ax, records, "kl", label="KL(policy || reference)", color="C3")
    _finish(ax, "kl")
    return True


def _plot_completion_length(fig, records) -> bool:
    keys = ["completions/mean_length", "completions/min_length", "completions/max_length"]
    if not any(_series(records, k) for k in keys):
        return False
    ax = fig.add_subplot()
    _line(ax, records, "completions/max_length", label="max", color="C1", linewidth=1)
    _line(ax, records, "completions/mean_length", label="mean", color="C0", linewidth=2)
    _line(ax, records, "completions/min_length", label="min", color="C2", linewidth=1)
    _finish(ax, "tokens")
    return True


def _plot_tokens_per_sec(fig, records) -> bool:
    keys = {"tokens_per_sec/rollout": "rollout (generation)", "tokens_per_sec/train": "training"}
    if not any(_series(records, k) for k in keys):
        return False
    ax = fig.add_subplot()
    for i, (key, label) in enumerate(keys.items()):
        _line(ax, records, key, label=label, color=f"C{i}")
    ax.set_ylim(bottom=0)
    _finish(ax, "tokens / s")
    return True


def _plot_training(fig, records) -> bool:
    panels = [(key, label) for key, label in
              [("loss", "loss"), ("grad_norm", "grad norm"), ("lr", "learning rate"), ("entropy", "entropy")]
              if _series(records, key) is not None]
    clip_keys = [k for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
                 if _series(records, k) is not None]
    if clip_keys:
        panels.append(("clip_ratio", "clip ratio"))
    if not panels:
        return False
    fig.set_size_inches(10, 2.6 * ((len(panels) + 1) // 2))
    cols = 1 if len(panels) == 1 else 2
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot((len(panels) + 1) // 2, cols, i + 1)
        if key == "clip_ratio":
            for k in clip_keys:
                _line(ax, records, k, label=k.split("/")[1].replace("_mean", ""), linewidth=1)
        else:
            _line(ax, records, key, label=label, color=f"C{i}", linewidth=1)
        ax.set_title(label, fontsize=9)
        _finish(ax, label)
        if key != "clip_ratio":  # one series: the panel title names it
            ax.get_legend().remove()
    return True


# (file name, title, metrics it needs, draw function)
_PLOTS = [
    ("reward", "reward (group mean ± std, per reward function)", "'reward' or 'rewards/<fn>/mean'", _plot_reward),
    ("accuracy", "accuracy", "'eval/accuracy', 'eval/pass@k' or 'train/accuracy'", _plot_accuracy),
    ("kl", "KL divergence to the reference model", "'kl'", _plot_kl),
    ("completion_length", "completion length", "'completions/mean_length|min_length|max_length'",
     _plot_completion_length),
    ("tokens_per_sec", "throughput", "'tokens_per_sec/rollout' or 'tokens_per_sec/train'", _plot_tokens_per_sec),
    ("training", "optimisation", "'loss', 'grad_norm', 'lr', 'entropy' or 'clip_ratio/*'", _plot_training),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot an MLX-GRPO run's metrics.jsonl into RUN_DIR/plots/.")
    parser.add_argument("run_dir", type=Path, help="run folder holding metrics.jsonl")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, out_dir=args.out_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
