"""utils/compare.py: the recipes' mean, sample std and range per update, and the plot."""

import json

from mlx_grpo.compare import main


def write_run(folder, accuracies):
    folder.mkdir(parents=True)
    records = [{"update": u, "eval/accuracy": a} for u, a in accuracies.items()] + [{"update": 1, "loss": 0.5}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_the_table_gives_mean_std_and_range_over_seeds_and_the_plot_is_written(tmp_path, capsys):
    a = [write_run(tmp_path / f"a{i}", {0: 0.4, 10: acc}) for i, acc in enumerate((0.5, 0.7))]
    b = [write_run(tmp_path / f"b{i}", {0: 0.4, 10: acc, 20: 0.9}) for i, acc in enumerate((0.6, 0.6))]
    out = tmp_path / "plot.png"
    assert main([f"a={a[0]},{a[1]}", f"b={b[0]},{b[1]}", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    # a at update 10: mean 60, sample std sqrt(((50-60)^2 + (70-60)^2) / 1) = 14.1
    assert "| 10 | 60.0 ± 14.1 (50.0-70.0) | 60.0 ± 0.0 (60.0-60.0) |" in table
    assert "| 20 |  | 90.0 ± 0.0 (90.0-90.0) |" in table
    assert out.stat().st_size > 0
    assert main([f"a={tmp_path / 'missing'}", "--out", str(out)]) == 1
