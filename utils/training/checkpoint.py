"""Checkpoints with exact resume: model files, whole optimizer state, trainer state and RNG states.

Layout of one checkpoint, run_dir/checkpoints/step_{step:06d}/:
    <model files>             written by the caller (weights safetensors, config.json, tokenizer)
    optimizer.safetensors     the whole optimizer state tree (step, learning_rate, m/v, ...)
    reference.safetensors     with sync_ref_model only: the moving KL reference (training/step.py writes it)
    trainer_state.json        {"step", "trainer_state": <caller dict>, "rng_state": <capture_rng_state()>}
    config.resolved.json      the run config (loads with config.load_resolved_config(folder))
    checkpoint.json           manifest, written last: the completion marker (file names, sizes, sha256s)

A checkpoint is built in a hidden sibling folder (.tmp-step_000010-<pid>), fsynced, then renamed
into place, so a run killed while saving never leaves a folder that resume would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.config import RESOLVED_CONFIG_NAME

FORMAT_VERSION = 1
CHECKPOINTS_DIRNAME = "checkpoints"
MANIFEST_FILE = "checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
REFERENCE_FILE = "reference.safetensors"  # sync_ref_model: the moving KL reference
TRAINER_STATE_FILE = "trainer_state.json"
HASHES_KEY = "sha256"  # manifest: file name -> sha256 of its content (manifests written before it have none)
_RESERVED_FILES = (MANIFEST_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, RESOLVED_CONFIG_NAME)

_STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp-"  # folder being written
_OLD_PREFIX = ".old-"  # folder being deleted (pruned or replaced)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not match the objects it is loaded into."""


# ---------------------------------------------------------------------------------------------
# RNG states

def capture_rng_state() -> dict:
    """JSON-safe snapshot of the python `random`, numpy global and mlx global RNG states."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    mlx_key = np.array(mx.random.state[0])
    return {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_name,
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "mlx": {"key": mlx_key.tolist(), "dtype": str(mlx_key.dtype)},
    }


def restore_rng_state(state: dict) -> None:
    """Restore the RNG states captured by capture_rng_state()."""
    missing = {"python", "numpy", "mlx"} - set(state)
    if missing:
        raise CheckpointError(f"RNG state lacks {sorted(missing)}: pass a dict made by capture_rng_state()")
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["bit_generator"], np.array(nps["keys"], dtype=np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    key = state["mlx"]["key"]
    if state["mlx"].get("dtype") != "uint32" or len(key) != 2:
        raise CheckpointError(f"unsupported mlx RNG key {key!r} ({state['mlx'].get('dtype')}): "
                              "expected two uint32 words as saved by this mlx version")
    # mx.random.state does not support item assignment (mlx >= 0.2x); mx.random.key(seed) is
    # exactly [seed >> 32, seed & 0xffffffff], so seeding with the packed key restores the state.
    mx.random.seed((int(key[0]) << 32) | int(key[1]))
    restored = np.array(mx.random.state[0]).tolist()
    if restored != list(key):
        raise CheckpointError(f"could not restore the mlx RNG key {key} (got {restored}): "
                              "this mlx version derives keys from seeds differently")


# ---------------------------------------------------------------------------------------------
# Saving

def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME / f"step_{step:06d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    optimizer,
    trainer_state: dict,
    config: dict,
    write_model_files: Callable[[Path], None],
    keep_last: int = 0,
) -> Path:
    """Atomically write run_dir/checkpoints/step_{step:06d}/ and return its path.

    write_model_files(folder) must write the model (weights + config.json + tokenizer files) so
    that the folder loads as a model. trainer_state must be JSON-serialisable. The RNG states are
    captured here, at save time. keep_last > 0 prunes older checkpoints after the save succeeded
    (never ones with a larger step than this one).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an int >= 0 (0 keeps all), got {keep_last!r}")
    if not isinstance(trainer_state, dict) or not isinstance(config, dict):
        raise ValueError("trainer_state and config must be dicts")
    # Serialise the JSON parts first: a bad value fails before anything touches the disk.
    rng_state = capture_rng_state()
    state_text = _to_json({"format_version": FORMAT_VERSION, "step": step,
                           "trainer_state": trainer_state, "rng_state": rng_state},
                          what="trainer_state")
    config_text = _to_json(config, what="config")
    optimizer_arrays = _flatten_optimizer_state(optimizer)

    ckpt_root = Path(run_dir) / CHECKPOINTS_DIRNAME
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(ckpt_root)
    final = checkpoint_dir(run_dir, step)
    tmp = ckpt_root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model_files(tmp)
        # Saving must not move the RNGs (the writer may build modules): a resumed run starts from rng_state.
        restore_rng_state(rng_state)
        clash = [name for name in _RESERVED_FILES if (tmp / name).exists()]
        if clash:
            raise CheckpointError(f"write_model_files wrote {clash}, names reserved for the checkpoint itself")
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), optimizer_arrays,
                            metadata={"format": "mlx-grpo-optimizer", "optimizer": type(optimizer).__name__})
        (tmp / TRAINER_STATE_FILE).write_text(state_text)
        (tmp / RESOLVED_CONFIG_NAME).write_text(config_text)
        paths = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer": type(optimizer).__name__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mlx_version": mx.__version__,
            "files": {name: p.stat().st_size for name, p in paths.items()},
            HASHES_KEY: {name: file_sha256(p) for name, p in paths.items()},
        }
        _fsync_tree(tmp)
        # The manifest is the completion marker: written and synced only after everything else.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_file(tmp / MANIFEST_FILE)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming from it): set the old one aside
            old = ckpt_root / f"{_OLD_PREFIX}{final.name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp)
        raise
    if keep_last > 0:
        _prune(ckpt_root, keep_last, newest=final)
    return final


def _flatten_optimizer_state(optimizer) -> dict[str, mx.array]:
    flat = tree_flatten(optimizer.state)
    bad = [k for k, v in flat if not isinstance(v, mx.array)]
    if bad:
        raise CheckpointError(f"optimizer state entries {bad[:5]} are not mx.arrays and cannot go into "
                              "safetensors: store them in trainer_state instead")
    arrays = dict(flat)
    mx.eval(list(arrays.values()))
    return arrays


def _to_json(obj: Any, *, what: str) -> str:
    def default(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if isinstance(value, mx.array) and value.size == 1:
            return value.item()
        raise CheckpointError(f"{what} holds a {type(value).__name__} ({value!r:.80}) that JSON cannot "
                              "store: convert it to int/float/str/list/dict first")
    return json.dumps(obj, indent=2, sort_keys=True, default=default)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    _fsync_file(path)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    for path in [p for p in root.rglob("*") if p.is_dir()] + [root]:
        _fsync_dir(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temp_dirs(ckpt_root: Path) -> None:
    """Delete leftovers of saves/prunes that were killed. Folders of other live processes stay."""
    for path in ckpt_root.iterdir():
        if not path.is_dir() or not path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            continue
        pid_text = path.name.rsplit("-", 1)[-1]
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is None or pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(path)


def _prune(ckpt_root: Path, keep_last: int, *, newest: Path) -> None:
    newest_step = _step_of(newest)
    older = [p for p in _complete_checkpoints(ckpt_root) if p != newest and _step_of(p) < newest_step]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        # Rename first so a kill mid-delete leaves a hidden folder, not a half-deleted checkpoint.
        doomed = ckpt_root / f"{_OLD_PREFIX}{path.name}-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed)


# ---------------------------------------------------------------------------------------------
# Finding and loading

def _step_of(path: Path) -> int:
    return int(_STEP_DIR_RE.match(path.name).group(1))


def _problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    if not path.is_dir():
        return "no such folder"
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"no {MANIFEST_FILE} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable {MANIFEST_FILE}: {exc}"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} listed in {MANIFEST_FILE} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST_FILE} says {size}"
    for name in (OPTIMIZER_FILE, TRAINER_STATE_FILE):
        if name not in manifest.get("files", {}):
            return f"{name} is not in {MANIFEST_FILE}"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_verified: set[tuple[str, int]] = set()  # (manifest, its mtime): checkpoints whose hashes matched in this process


def content_problem(path: str | Path) -> str | None:
    """Which file of a complete checkpoint no longer has the content its manifest hashed, or None.

    Reads every file (seconds for a large model), once per process and checkpoint."""
    manifest_path = Path(path) / MANIFEST_FILE
    key = (str(manifest_path.resolve()), manifest_path.stat().st_mtime_ns)
    if key in _verified:
        return None
    hashes = json.loads(manifest_path.read_text()).get(HASHES_KEY, {})
    for name, expected in sorted(hashes.items()):
        if file_sha256(Path(path) / name) != expected:
            return f"{name} does not match its sha256 in {MANIFEST_FILE} (its content changed after the save)"
    _verified.add(key)
    return None


def _complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete step folders sorted by step; incomplete ones are reported and skipped."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for path in ckpt_root.iterdir():
        if not _STEP_DIR_RE.match(path.name):
            continue  # temp/old folders and anything else
        problem = _problem(path)
        if problem:
            print(f"checkpoint: ignoring {path}: {problem}")
            continue
        found.append(path)
    return sorted(found, key=_step_of)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """All complete checkpoints of a run, oldest first."""
    return _complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIRNAME)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the largest step, or None if the run has none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def run_checkpoint(folder: str | Path, error: type[Exception] = CheckpointError) -> Path:
    """A run folder (holding checkpoints/) -> its newest complete checkpoint (`error` when it has none yet); any
    other folder -> itself."""
    folder = Path(folder)
    if not (folder / CHECKPOINTS_DIRNAME).is_dir():
        return folder
    path = find_latest_checkpoint(folder)
    if path is None:
        raise error(f"run folder {folder} has no complete checkpoint yet")
    return path


def newest_checkpoint(root: str | Path) -> Path | None:
    """The most recently saved complete checkpoint of any run under `root`, at any depth
    (outputs/<run>/checkpoints/step_*, outputs/demo/<run>/checkpoints/step_*), or None. Hidden folders
    (saves being written or deleted) are skipped; incomplete checkpoints silently."""
    root = Path(root)
    found = [
        step for folder in root.rglob(CHECKPOINTS_DIRNAME)
        if folder.is_dir() and not any(part.startswith(".") for part in folder.relative_to(root).parts)
        for step in folder.iterdir() if _STEP_DIR_RE.match(step.name) and _problem(step) is None
    ]
    return max(found, key=lambda step: ((step / MANIFEST_FILE).stat().st_mtime, step.name), default=None)


def find_latest_run(output_dir: str | Path) -> Path | None:
    """The run folder in output_dir whose newest complete checkpoint was written last, or None."""
    output_dir = Path(output_dir)
    runs = []
    for run_dir in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        latest = find_latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if latest is not None:
            runs.append(((latest / MANIFEST_FILE).stat().st_mtime_ns, run_dir))
    return max(runs)[1] if runs else None


def resume_point(output_dir: str | Path, run_name: str = "", checkpoint: str | Path | None = None) -> tuple[Path, Path]:
    """(run folder, complete checkpoint) that a resumed run continues.

    The run: output_dir/run_name; without run_name, the run holding `checkpoint`, else the newest
    run in output_dir (find_latest_run). The checkpoint: `checkpoint` (a run folder means its newest),
    else the run's newest complete one whose files hash as saved (newer ones that do not are skipped, said).
    """
    if checkpoint is not None and not Path(checkpoint).exists():
        raise CheckpointError(f"--resume {checkpoint}: no such folder; pass a checkpoint "
                              f"(RUN/{CHECKPOINTS_DIRNAME}/step_N), a run folder, or --resume alone for the newest run")
    if checkpoint is not None and (Path(checkpoint) / CHECKPOINTS_DIRNAME).is_dir():  # a run folder: its newest
        if run_name and Path(checkpoint).resolve() != (Path(output_dir) / run_name).resolve():
            raise CheckpointError(f"--resume {checkpoint} is a run folder but run_name is {run_name!r}: give only "
                                  "one of them")
        run_dir, checkpoint = Path(checkpoint), None
    elif run_name:
        run_dir = Path(output_dir) / run_name
    elif checkpoint is not None:
        run_dir = Path(checkpoint).parent.parent
        if Path(checkpoint).parent.name != CHECKPOINTS_DIRNAME:
            raise CheckpointError(f"{checkpoint} is not in a run's {CHECKPOINTS_DIRNAME}/ folder: set run_name "
                                  "to the run that continues from it")
    else:
        run_dir = find_latest_run(output_dir)
        if run_dir is None:
            raise CheckpointError(f"--resume: no run with a complete checkpoint in {output_dir}; start without "
                                  "--resume, or set output_dir / run_name to the run")
    if checkpoint is not None:
        require_complete(checkpoint)
        return run_dir, Path(checkpoint)
    for path in reversed(list_checkpoints(run_dir)):  # the newest whose files still hash as saved
        problem = content_problem(path)
        if problem is None:
            return run_dir, path
        print(f"checkpoint: skipping {path}: {problem}")
    raise CheckpointError(f"--resume: no complete checkpoint under {run_dir / CHECKPOINTS_DIRNAME}; "
                          "start without --resume")


def require_complete(path: str | Path) -> None:
    """Raise CheckpointError naming the problem unless `path` is a complete checkpoint whose files hash as saved."""
    path = Path(path)
    problem = _problem(path) or content_problem(path)
    if problem:
        hint = ""
        if (path / CHECKPOINTS_DIRNAME).is_dir():
            hint = " (this is a run folder: pass find_latest_checkpoint(run_dir))"
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}{hint}")


def load_checkpoint(path: str | Path, *, optimizer, restore_rng: bool = True) -> dict:
    """Restore optimizer state (and RNG states) from a checkpoint; return the caller's trainer_state.

    Load the model weights yourself (from the same folder) BEFORE calling this: building or
    initialising nn modules draws from mx.random, which would spoil the restored RNG state.
    """
    path = Path(path)
    require_complete(path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if manifest["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {manifest['optimizer']} state but the optimizer is "
                              f"{type(optimizer).__name__}: use the same optimizer as the saved run")
    arrays = mx.load(str(path / OPTIMIZER_FILE))
    _check_compatible(optimizer, arrays, path)
    optimizer.state = tree_unflatten(list(arrays.items()))
    saved = json.loads((path / TRAINER_STATE_FILE).read_text())
    if restore_rng:
        restore_rng_state(saved["rng_state"])
    return saved["trainer_state"]


def _check_compatible(optimizer, arrays: dict[str, mx.array], path: Path) -> None:
    """If the optimizer already has per-parameter state, the saved state must have the same layout."""
    current = dict(tree_flatten(optimizer.state))
    per_param = {k: v for k, v in current.items() if "." in k}
    if not per_param:
        return  # not initialised yet: nothing to compare with
    saved_keys = {k for k in arrays if "." in k}
    if set(per_param) != saved_keys:
        extra, missing = sorted(saved_keys - set(per_param)), sorted(set(per_param) - saved_keys)
        raise CheckpointError(f"optimizer state in {path} does not match the model's parameters "
                              f"(only in checkpoint: {extra[:3]}, only in model: {missing[:3]}): "
                              "resume with the same model and trainable parameters (LoRA/full)")
    for key, value in per_param.items():
        if isinstance(value, mx.array) and value.shape != arrays[key].shape:
            raise CheckpointError(f"optimizer state {key} in {path} has shape {arrays[key].shape}, "
                                  f"the model needs {value.shape}: resume with the same model")
