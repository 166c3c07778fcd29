"""Metrics logging: jsonl records, truncation on resume, optional back ends, console line."""

import builtins
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.training.metrics import MetricsLogger, format_console_line, read_completions, read_metrics


def test_records_written_and_read(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward": 0.5, "kl": mx.array(0.25), "completions/mean_length": np.int64(17),
                       "loss": float("nan"), "nan_events": 0, "note": "warmup"})
        logger.log(2, {"reward": 0.75, "grad_norm": float("inf")})
        logger.log(2, {"eval/accuracy": 0.1, "eval/pass@1": 0.1, "eval/pass@4": 0.3})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == ('{"completions/mean_length": 17, "kl": 0.25, "loss": null, "nan_events": 0, '
                        '"note": "warmup", "reward": 0.5, "update": 1}')
    records = read_metrics(tmp_path)
    assert records[1] == {"update": 2, "reward": 0.75, "grad_norm": None}
    assert records[2]["eval/pass@4"] == 0.3
    assert isinstance(records[0]["kl"], float)


def test_completions_and_truncate_after(tmp_path):
    logger = MetricsLogger(tmp_path)
    for update in range(1, 6):
        logger.log(update, {"reward": update / 10})
        logger.log_completions(update, [{"prompt": "2+2?", "completion": "#### 4", "answer": "4",
                                         "rewards": {"correct": 1.0, "format": mx.array(0.5)}}])
    logger.truncate_after(3)
    logger.log(4, {"reward": 0.99})  # the resumed run continues appending
    logger.close()
    assert [r["update"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert read_metrics(tmp_path)[-1]["reward"] == 0.99
    completions = read_completions(tmp_path)
    assert [r["update"] for r in completions] == [1, 2, 3]
    assert completions[0]["rewards"] == {"correct": 1.0, "format": 0.5}


def test_unfinished_last_line_is_dropped_on_truncate(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward": 0.1})
        logger.log(2, {"reward": 0.2})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"reward": 0.3, "upd')  # killed mid-write
    with pytest.warns(UserWarning, match="unfinished last line"):
        assert len(read_metrics(tmp_path)) == 2
    with pytest.warns(UserWarning):
        MetricsLogger(tmp_path).truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"update": 1}\nnot json\n{"update": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(tmp_path)


def test_is_main_false_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, is_main=False)
    logger.log(1, {"reward": 1.0})
    logger.log_completions(1, [{"prompt": "p"}])
    logger.truncate_after(0)
    logger.close()
    assert not run_dir.exists()


def test_log_jsonl_false_writes_no_files(tmp_path):
    with MetricsLogger(tmp_path, log_jsonl=False) as logger:
        logger.log(1, {"reward": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_report_to_unknown_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown report_to \['tensorbord'\]"):
        MetricsLogger(tmp_path, report_to=["tensorbord"])
    MetricsLogger(tmp_path, report_to="none").close()


@pytest.mark.parametrize("name, package", [("tensorboard", "pip install tensorboard"), ("wandb", "pip install wandb")])
def test_report_to_missing_package(tmp_path, monkeypatch, name, package):
    real_import = builtins.__import__
    blocked = ("tensorboard", "tensorboardX", "torch.utils.tensorboard", "wandb")

    def fake_import(module, *args, **kwargs):
        if module.split(".")[0] in blocked or module in blocked:
            raise ModuleNotFoundError(f"No module named {module!r}")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=package):
        MetricsLogger(tmp_path / "run", report_to=name)
    assert not (tmp_path / "run").exists()


def test_bad_values_are_errors(tmp_path):
    logger = MetricsLogger(tmp_path)
    with pytest.raises(ValueError, match="'reward' is an array of shape"):
        logger.log(1, {"reward": mx.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="update must be a non-negative int"):
        logger.log(-1, {"reward": 1.0})
    with pytest.raises(ValueError, match="has type list"):
        logger.log(1, {"reward": [1.0]})
    logger.close()


def test_format_console_line():
    line = format_console_line(7, {"reward": 0.41234, "kl": 0.000123, "loss": None, "lr": 1e-6,
                                   "tokens_per_sec/rollout": 1234.5, "unlisted": 3})
    assert line == "update 7 | reward 0.4123 | loss nan | kl 0.000123 | lr 1e-06 | gen_tok/s 1234"
    assert format_console_line(1, {"a/b": 2}, keys=["a/b", "c"]) == "update 1 | a/b 2"
    json.dumps(line)


class FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, key, value, global_step):
        self.scalars.append((key, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class FakeWandb:
    def __init__(self):
        self.logged, self.init_kwargs, self.finished = [], None, False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values, step):
        self.logged.append((values, step))

    def finish(self):
        self.finished = True


def test_mirrors_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    import mlx_grpo.training.metrics as metrics

    fake_wandb = FakeWandb()
    monkeypatch.setattr(metrics, "_import_summary_writer", lambda: FakeWriter)
    monkeypatch.setattr(metrics, "_import_wandb", lambda: fake_wandb)
    logger = MetricsLogger(tmp_path, report_to="tensorboard,wandb", config={"lr": 1e-6})
    logger.log(3, {"reward": 0.5, "loss": float("nan"), "note": "x"})
    writer = logger._tensorboard
    logger.close()
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == [("reward", 0.5, 3)]
    assert fake_wandb.init_kwargs["config"] == {"lr": 1e-6} and fake_wandb.init_kwargs["name"] == tmp_path.name
    assert fake_wandb.logged == [({"reward": 0.5, "note": "x"}, 3)] and fake_wandb.finished
