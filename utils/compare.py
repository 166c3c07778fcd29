"""Compare recipes over seeds: one plot of a metric's mean and min-max band per recipe, and a markdown table.

    python utils/compare.py nanochat=outputs/h2h/nanochat-s0,outputs/h2h/nanochat-s1 \\
                            grpo=outputs/h2h/grpo-s0,outputs/h2h/grpo-s1 --out docs/head_to_head.png

The table gives, at each update where every run of a recipe has the metric, its mean, sample standard
deviation and range over the runs (seeds). Draws with utils/plot.py's helpers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlx_grpo.plot import _finish, _series
from mlx_grpo.training.metrics import read_metrics


def recipe_values(run_dirs: list[Path], key: str) -> dict[int, np.ndarray]:
    """update -> the metric of every run at that update (updates that some run lacks are left out)."""
    series = []
    for run_dir in run_dirs:
        data = _series(read_metrics(run_dir), key)
        if data is None:
            raise ValueError(f"{run_dir} has no {key} records")
        series.append(dict(zip(data[0].astype(int).tolist(), data[1])))
    common = sorted(set.intersection(*(set(s) for s in series)))
    return {u: np.array([s[u] for s in series]) for u in common}


def summary_table(recipes: dict[str, dict[int, np.ndarray]], key: str) -> str:
    """Markdown: one row per update, per recipe 'mean ± std (min-max)' in percent when the metric is a share."""
    updates = sorted(set.union(*(set(v) for v in recipes.values())))
    header = f"| update | {' | '.join(f'{name} ({len(next(iter(v.values())))} seeds)' for name, v in recipes.items())} |"
    rows = [header, "|---|" + "---|" * len(recipes)]
    for u in updates:
        cells = []
        for values in recipes.values():
            if u not in values:
                cells.append("")
                continue
            v = 100 * values[u]
            std = v.std(ddof=1) if len(v) > 1 else 0.0
            cells.append(f"{v.mean():.1f} ± {std:.1f} ({v.min():.1f}-{v.max():.1f})")
        rows.append(f"| {u} | {' | '.join(cells)} |")
    return f"{key} in %: mean ± sample std (range) over seeds\n\n" + "\n".join(rows)


def plot_comparison(recipes: dict[str, dict[int, np.ndarray]], key: str, out: Path, title: str = "") -> Path:
    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(recipes.items()):
        x = np.array(sorted(values), dtype=np.float64)
        stack = np.stack([values[int(u)] for u in x])
        ax.plot(x, stack.mean(axis=1), marker="o", color=f"C{i}", linewidth=2, label=f"{name} (mean)")
        ax.fill_between(x, stack.min(axis=1), stack.max(axis=1), color=f"C{i}", alpha=0.2, label=f"{name} (range)")
    _finish(ax, key)
    if title:
        fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def parse_recipe(text: str) -> tuple[str, list[Path]]:
    name, sep, runs = text.partition("=")
    if not sep or not name or not runs:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR,RUN_DIR..., got {text!r}")
    return name, [Path(r) for r in runs.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python utils/compare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=parse_recipe, help="NAME=RUN_DIR,RUN_DIR,... (one per recipe)")
    parser.add_argument("--key", default="eval/accuracy", help="the metric (default: eval/accuracy)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="the plot's title")
    args = parser.parse_args(argv)
    try:
        recipes = {name: recipe_values(runs, args.key) for name, runs in args.recipes}
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_table(recipes, args.key))
    print(f"wrote {plot_comparison(recipes, args.key, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
