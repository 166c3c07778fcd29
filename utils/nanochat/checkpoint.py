"""nanochat's own checkpoints: find them (a folder, a base dir's stage and tag, a hub release) and read them.

A nanochat checkpoint is model_{step:06d}.pt (a torch state dict) + meta_{step:06d}.json, with the
run's tokenizer.pkl beside them (hub releases) or in ../../tokenizer/ (a nanochat base dir). Nothing
here knows the architecture: what the tensors must be is utils/nanochat/convert.py's job.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME

HUB_DEFAULT_REPO = "karpathy/nanochat-d32"
# Flat nanochat releases on the hub (model_*.pt + meta_*.json + tokenizer.pkl).
KNOWN_HUB_REPOS = (HUB_DEFAULT_REPO, "sdobson/nanochat")
# nanochat's stage names (scripts) and the checkpoint folders they write under the base dir.
STAGE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
COMPILED_PREFIX = "_orig_mod."  # torch.compile's prefix on the names of a compiled model's state dict
_STEP_FILE = re.compile(r"^model_(\d+)\.pt$")
_META_STEP_FILE = re.compile(r"^meta_(\d+)\.json$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class NanochatCheckpointError(ValueError):
    """A nanochat checkpoint or converted folder that cannot be used; the message says why."""


@dataclass
class NanochatCheckpoint:
    """One step of a nanochat checkpoint on local disk."""

    source: str  # what the user named: a folder, a base dir + stage/tag, or a hub repo id
    folder: Path
    step: int
    model_path: Path
    meta_path: Path
    tokenizer_path: Path


def list_names(names, limit: int = 8) -> str:
    """Sorted names for an error message, the first `limit` of them and how many more."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def nanochat_base_dir() -> Path:
    """nanochat's own default: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def is_hub_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source))


def _weights_only_reason(error: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused (the rest is advice we do not give)."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or line.lower().startswith(("unsupported", "trying to load"))]
    return "; ".join(named) or (lines[-1] if lines else type(error).__name__)


def checkpoint_steps(folder: str | Path) -> list[int]:
    """Steps with a model_*.pt in folder, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))


def _step_file(folder: Path, pattern: re.Pattern, step: int) -> Path | None:
    # File names are zero-padded to 6 digits by nanochat; match on the number to accept any padding.
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) == step:
            return p
    return None


def find_tokenizer(folder: Path) -> Path:
    """tokenizer.pkl beside the checkpoint (hub layout) or in ../../tokenizer/ (base dir layout)."""
    candidates = [folder / TOKENIZER_FILENAME, folder.parent.parent / "tokenizer" / TOKENIZER_FILENAME]
    for path in candidates:
        if path.is_file():
            return path
    raise NanochatCheckpointError(
        f"no {TOKENIZER_FILENAME} found for the checkpoint in {folder} (looked in "
        f"{', '.join(str(c) for c in candidates)}); copy the run's {TOKENIZER_FILENAME} beside model_*.pt"
    )


def find_checkpoint(folder: str | Path, step: int | None = None, source: str | None = None) -> NanochatCheckpoint:
    """The checkpoint at `step` (newest when None) in a folder of model_*.pt + meta_*.json."""
    folder = Path(folder).expanduser()
    source = source or str(folder)
    if not folder.is_dir():
        raise NanochatCheckpointError(f"checkpoint folder {folder} does not exist")
    steps = checkpoint_steps(folder)
    if not steps:
        raise NanochatCheckpointError(
            f"no model_*.pt in {folder}; pass a folder holding nanochat's model_<step>.pt and "
            f"meta_<step>.json, or a nanochat base dir with --stage and --tag"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NanochatCheckpointError(
            f"no step {step} in {folder}; available steps: {', '.join(map(str, steps))}"
        )
    meta_path = _step_file(folder, _META_STEP_FILE, step)
    if meta_path is None:
        raise NanochatCheckpointError(f"{folder} has a model file for step {step} but no meta_{step:06d}.json")
    return NanochatCheckpoint(
        source=source,
        folder=folder,
        step=step,
        model_path=_step_file(folder, _STEP_FILE, step),
        meta_path=meta_path,
        tokenizer_path=find_tokenizer(folder),
    )


def stage_folder(base_dir: str | Path, stage: str, tag: str | None = None) -> Path:
    """base_dir/{stage}_checkpoints/{tag}; with no tag, the only tag there (several: an error)."""
    if stage not in STAGE_DIRS:
        raise NanochatCheckpointError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_DIRS)}")
    stage_dir = Path(base_dir).expanduser() / STAGE_DIRS[stage]
    if not stage_dir.is_dir():
        raise NanochatCheckpointError(
            f"{stage_dir} does not exist; pass the nanochat base dir (holding {STAGE_DIRS[stage]}/) "
            f"or set NANOCHAT_BASE_DIR"
        )
    if tag is None:
        tags = sorted(p.name for p in stage_dir.iterdir() if p.is_dir())
        if len(tags) != 1:
            found = ", ".join(tags) if tags else "none"
            raise NanochatCheckpointError(f"pass --tag to pick a model in {stage_dir} (found: {found})")
        tag = tags[0]
    folder = stage_dir / tag
    if not folder.is_dir():
        raise NanochatCheckpointError(f"no model tag {tag!r} in {stage_dir}")
    return folder


def stages_in(folder: str | Path) -> list[str]:
    """The stages whose checkpoint folders a nanochat base dir holds ([] for any other folder)."""
    path = Path(folder).expanduser()
    return [stage for stage, name in STAGE_DIRS.items() if (path / name).is_dir()]


def download_from_hub(repo_id: str, step: int | None = None) -> NanochatCheckpoint:
    """Fetch one step (newest when None) of a flat nanochat release such as karpathy/nanochat-d32."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except (OSError, HFValidationError) as e:  # offline, unreachable, no such repo, bad id
            reason = " ".join(str(e).split())[:300]
            raise NanochatCheckpointError(
                f"could not download {repo_id} from the Hugging Face hub ({type(e).__name__}: {reason}); "
                f"to convert a local copy run: python convert_nanochat.py /path/to/folder --output DIR "
                f"(the folder holds model_*.pt, meta_*.json and {TOKENIZER_FILENAME})"
            ) from e

    # The metas are small and name every step, so only the one model file we need is downloaded.
    folder = fetch(["meta_*.json", TOKENIZER_FILENAME])
    digits = {int(m.group(1)): m.group(1) for p in folder.iterdir() if (m := _META_STEP_FILE.match(p.name))}
    steps = sorted(digits)
    if not steps:
        raise NanochatCheckpointError(f"hub repo {repo_id} holds no meta_*.json: not a nanochat checkpoint release")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NanochatCheckpointError(
            f"hub repo {repo_id} has no step {step}; available steps: {', '.join(map(str, steps))}"
        )
    folder = fetch([f"model_{digits[step]}.pt", f"meta_{digits[step]}.json", TOKENIZER_FILENAME])
    return find_checkpoint(folder, step, source=repo_id)


def resolve_checkpoint(
    source: str | None,
    *,
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
) -> NanochatCheckpoint:
    """What the converters accept: a checkpoint folder, a base dir with stage (+ tag), or a hub id.

    No source and no stage: the hub default (karpathy/nanochat-d32). No source with a stage:
    nanochat's base dir ($NANOCHAT_BASE_DIR or ~/.cache/nanochat).
    """
    if stage is not None:
        base_dir = Path(source).expanduser() if source is not None else nanochat_base_dir()
        folder = stage_folder(base_dir, stage, tag)
        return find_checkpoint(folder, step, source=f"{base_dir} {stage}/{folder.name}")
    if tag is not None:
        raise NanochatCheckpointError("--tag needs --stage (sft, mid, rl or base)")
    if source is None:
        source = HUB_DEFAULT_REPO
    if Path(source).expanduser().exists():
        return find_checkpoint(source, step)
    if is_hub_repo_id(source):
        return download_from_hub(source, step)
    raise NanochatCheckpointError(
        f"{source} is neither an existing folder nor a Hugging Face repo id (owner/name)"
    )


def checkpoint_name(checkpoint: NanochatCheckpoint) -> str:
    """A short name for the model: the hub repo's name, nanochat-<tag>-<stage> in a base dir, else the folder's."""
    if is_hub_repo_id(checkpoint.source) and not Path(checkpoint.source).exists():
        return checkpoint.source.split("/")[-1]
    if checkpoint.folder.parent.name in STAGE_DIRS.values():
        stage = next(s for s, d in STAGE_DIRS.items() if d == checkpoint.folder.parent.name)
        return f"nanochat-{checkpoint.folder.name}-{stage}"
    return checkpoint.folder.resolve().name


# ---------------------------------------------------------------------------------------------
# Reading


def read_meta(meta_path: str | Path) -> dict:
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise NanochatCheckpointError(f"{meta_path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanochatCheckpointError(f"{meta_path} has no model_config: not a nanochat meta file")
    return meta


def read_state_dict(model_path: str | Path) -> dict:
    """The torch state dict (names without the torch.compile prefix), read without unpickling code."""
    try:
        import torch
    except ImportError as e:
        raise NanochatCheckpointError(
            "reading nanochat .pt checkpoints needs torch: pip install 'mlx-grpo[convert]'"
        ) from e
    # mmap: the d32 file is ~7 GB; tensors are paged in one at a time as they are converted.
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # it pickles more than tensors: torch refused to run it
        raise NanochatCheckpointError(f"{model_path} is refused: it holds more than tensors and containers, and "
                                      f"loading it would run code ({_weights_only_reason(e)}); use a checkpoint "
                                      f"nanochat saved") from e
    except (RuntimeError, EOFError) as e:  # corrupt, truncated, or not a state dict
        reason = " ".join(str(e).split())[:300]
        raise NanochatCheckpointError(f"cannot read {model_path} as a torch state dict ({reason})") from e
    if not isinstance(state, dict):
        raise NanochatCheckpointError(f"{model_path} does not hold a state dict")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise NanochatCheckpointError(f"{model_path} entry {name!r} is not a tensor")
        clean = name.removeprefix(COMPILED_PREFIX)
        if clean in out:
            raise NanochatCheckpointError(f"{model_path} holds {clean!r} twice (with and without {COMPILED_PREFIX})")
        out[clean] = value
    return out
