"""Run logging: metrics.jsonl / completions.jsonl in the run folder, optional TensorBoard and W&B.

Record format (one JSON object per line, keys sorted, flushed after every line):
    metrics.jsonl      {"update": 12, "kl": 0.003, "reward": 0.41, ...}
                       {"update": 13, "config_changes": [{"key", "old", "new", "update"}]}  (a resume that changed keys)
    completions.jsonl  {"update": 12, "prompt": ..., "completion": ..., "rewards": ..., "answer": ...}
Values are JSON numbers, strings, bools or null. Non-finite floats (NaN, +-inf) are written as
null, so every line is standard JSON that jq/pandas/JS can read; the trainer counts NaNs in
"nan_events" anyway. mx.array / numpy scalars are converted to Python numbers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from mlx_grpo.config import REPORT_TO

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"

# (metric key, short console label), in console order.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("reward", "reward"),
    ("reward_std", "std"),
    ("train/accuracy", "acc"),
    ("eval/accuracy", "eval_acc"),
    ("loss", "loss"),
    ("kl", "kl"),
    ("entropy", "ent"),
    ("entropy_coef", "ent_coef"),
    ("clip_ratio/region_mean", "clip"),
    ("completions/mean_length", "len"),
    ("completions/clipped_ratio", "cut"),
    ("lr", "lr"),
    ("grad_norm", "gnorm"),
    ("tokens_per_sec/rollout", "gen_tok/s"),
    ("tokens_per_sec/train", "train_tok/s"),
    ("time/step", "s/step"),
    ("memory/peak_gb", "mem_gb"),
    ("nan_events", "nan"),
)


class MetricsLogger:
    """Append-only metric and completion logs for one run.

    report_to: names from config.REPORT_TO (a string or a sequence; "none" or () for neither).
    is_main=False (other processes of a multi-process run): writes nothing anywhere.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        log_jsonl: bool = True,
        report_to: str | Sequence[str] = (),
        is_main: bool = True,
        config: dict | None = None,
        wandb_project: str = "mlx-grpo",
        run_name: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.log_jsonl = log_jsonl
        self.is_main = is_main
        self.report_to = _parse_report_to(report_to)
        self._files: dict[str, Any] = {}
        self._tensorboard = None
        self._wandb_run = None
        if not is_main:
            return
        # Import the optional back ends first: a missing package fails before anything is written.
        summary_writer_cls = _import_summary_writer() if "tensorboard" in self.report_to else None
        wandb = _import_wandb() if "wandb" in self.report_to else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if summary_writer_cls is not None:
            self._tensorboard = summary_writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIRNAME))
        if wandb is not None:
            self._wandb_run = wandb.init(project=wandb_project, name=run_name or self.run_dir.name,
                                         dir=str(self.run_dir), config=config or {})

    # -- writing -------------------------------------------------------------------------------

    def log(self, update: int, metrics: dict) -> dict:
        """Append one record for `update`; returns the record as written (for printing)."""
        record = _record(update, metrics)
        if not self.is_main:
            return record
        if self.log_jsonl:
            self._write_line(METRICS_FILE, record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "update" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, global_step=update)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "update" and v is not None}, step=update)
        return record

    def log_completions(self, update: int, records: Iterable[dict]) -> None:
        """Append sample completions (prompt, completion, rewards, answer, ...) for `update`."""
        if not self.is_main or not self.log_jsonl:
            return
        for item in records:
            self._write_line(COMPLETIONS_FILE, _record(update, item, convert=_jsonable))

    def log_config_changes(self, update: int, changes: list[dict]) -> None:
        """Record the keys a resumed run changed, from `update` on (metrics.jsonl only: not scalars)."""
        if self.is_main and self.log_jsonl and changes:
            self._write_line(METRICS_FILE, _record(update, {"config_changes": changes}, convert=_jsonable))

    def truncate_after(self, update: int) -> None:
        """Drop records with update > `update` (call when resuming from that update)."""
        if not self.is_main:
            return
        self._close_files()
        for name in (METRICS_FILE, COMPLETIONS_FILE):
            path = self.run_dir / name
            if not path.exists():
                continue
            kept = [r for r in _read_jsonl(path) if r["update"] <= update]
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                for r in kept:
                    f.write(_dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def close(self) -> None:
        self._close_files()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_line(self, name: str, record: dict) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.run_dir / name, "a")
        f.write(_dumps(record) + "\n")
        f.flush()  # a crash loses at most the line being written

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ---------------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of run_dir/metrics.jsonl in file order (train and eval records alike)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is this a run folder that has logged an update?")
    return _read_jsonl(path)


def read_completions(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / COMPLETIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {COMPLETIONS_FILE} in {run_dir}")
    return _read_jsonl(path)


def format_console_line(update: int, metrics: dict, keys: Sequence[str] | None = None) -> str:
    """Short human line, e.g. 'update 12 | reward 0.412 | std 0.31 | kl 0.0031 | ...'.

    keys: metric keys to show, in order (default CONSOLE_KEYS); missing keys are left out.
    """
    labels = dict(CONSOLE_KEYS)
    keys = [k for k, _ in CONSOLE_KEYS] if keys is None else list(keys)
    parts = [f"update {update}"]
    for key in keys:
        if key in metrics:
            parts.append(f"{labels.get(key, key)} {_format_value(_scalar(key, metrics[key]))}")
    return " | ".join(parts)


def _format_value(value) -> str:
    if value is None:
        return "nan"
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


# ---------------------------------------------------------------------------------------------
# helpers

def _parse_report_to(report_to: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(report_to, str):
        report_to = [] if report_to in ("", "none") else [s.strip() for s in report_to.split(",")]
    names = tuple(dict.fromkeys(report_to))
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"unknown report_to {unknown}: choose from {list(REPORT_TO)} (or 'none')")
    return names


def check_loggers(report_to: Sequence[str]) -> None:
    """Before anything loads: the packages of the report_to loggers are installed (ConfigError naming the fix)."""
    from importlib.util import find_spec

    from mlx_grpo.config import ConfigError

    if "tensorboard" in report_to and not (find_spec("tensorboard") or find_spec("tensorboardX")):
        raise ConfigError('report_to includes "tensorboard" but it is not installed: pip install tensorboard, '
                          'or take it out of report_to')
    if "wandb" in report_to and not find_spec("wandb"):
        raise ConfigError('report_to includes "wandb" but it is not installed: pip install wandb, '
                          'or take it out of report_to')


def _import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    except ImportError:
        raise ImportError("report_to includes 'tensorboard' but no TensorBoard writer is installed: "
                          "pip install tensorboard (used through torch) or pip install tensorboardX") from None


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError("report_to includes 'wandb' but Weights & Biases is not installed: pip install wandb") from None
    return wandb


def _scalar(key: str, value: Any):
    """JSON-safe scalar: mx/numpy scalars -> Python numbers, non-finite floats -> None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        if getattr(value, "size", 1) != 1:
            raise ValueError(f"metric {key!r} is an array of shape {tuple(value.shape)}: log a scalar (e.g. its mean)")
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"metric {key!r} has type {type(value).__name__}: log numbers, strings, bools or None")


def _jsonable(key: str, value: Any):
    """Like _scalar, but completion records may also hold lists and dicts (e.g. per-function rewards)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if hasattr(value, "tolist") and getattr(value, "size", 1) != 1:
        return _jsonable(key, value.tolist())
    return _scalar(key, value)


def _record(update: int, values: dict, convert=_scalar) -> dict:
    if isinstance(update, bool) or not isinstance(update, int) or update < 0:
        raise ValueError(f"update must be a non-negative int, got {update!r}")
    if not isinstance(values, dict):
        raise ValueError(f"expected a dict of values, got {type(values).__name__}")
    if "update" in values and values["update"] != update:
        raise ValueError(f"record has update={values['update']!r} but was logged for update {update}")
    record = {str(k): convert(str(k), v) for k, v in values.items()}
    record["update"] = update
    return record


def _dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False)


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no trailing newline: the writer was killed mid-line
                warnings.warn(f"{path}: ignoring the unfinished last line {number}")
                continue
            raise ValueError(f"{path} line {number} is not valid JSON ({exc}): fix or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("update"), int):
            raise ValueError(f"{path} line {number} has no integer 'update' field: not a MetricsLogger record")
        records.append(record)
    return records
