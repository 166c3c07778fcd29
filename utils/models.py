"""Load a policy model and its tokenizer, and write one back as a folder that loads the same way.

A folder with tokenizer.pkl is a converted nanochat model (see utils/nanochat/folder.py): mlx-lm's
nanochat model (October 2025) or the 2026 architecture's (utils/nanochat/model.py), strictly loaded,
with the tiktoken tokenizer wrapped for mlx-lm. Every other path or hub id goes through mlx_lm.load
unchanged.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import mlx.nn as nn

from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError, checkpoint_steps
from mlx_grpo.nanochat.folder import check_model_type, load_nanochat_model, read_nanochat_meta, save_nanochat_folder
from mlx_grpo.nanochat.tokenizer import (
    TOKENIZER_FILENAME,
    TiktokenTokenizerWrapper,
    load_tiktoken_encoding,
    nanochat_tokenizer,
)
from mlx_grpo.vlm import is_vlm_source, read_config

CONVERTED_MODELS_DIR = "models"  # convert_nanochat.py's output folder (nanochat.convert.default_output_dir)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # marks a LoRA checkpoint / mlx-lm adapter folder


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to pass instead."""


def is_nanochat_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / TOKENIZER_FILENAME).is_file()


def is_adapter_folder(path: str | Path) -> bool:
    """A LoRA checkpoint or mlx-lm adapter folder (adapter_config.json, no model weights of its own)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG_FILE).is_file()


def looks_local(name: str) -> bool:
    """A model_name meant as a folder on this machine rather than a hub id (owner/name): an absolute
    or ./ path, a path of other than two parts, or one in models/ (where convert_nanochat.py writes)."""
    parts = Path(name).parts
    return name.startswith((".", "/", "~")) or len(parts) != 2 or parts[0] == CONVERTED_MODELS_DIR


def check_model_folder(name: str) -> None:
    """Before anything loads: a local model folder exists and holds a readable config.json, intact
    safetensors (header and size) and, for nanochat, a tokenizer.pkl that loads without running code.
    ModelLoadError names the file and the fix. Hub ids (owner/name, not on disk) are left to the loader."""
    folder = Path(name).expanduser()
    if not folder.exists():
        if looks_local(name):
            hint = ("convert a nanochat checkpoint there: python convert_nanochat.py (README: Train a real nanochat "
                    "model)") if Path(name).parts[0] == CONVERTED_MODELS_DIR else "fix the path"
            raise ModelLoadError(f"model_name {name!r}: {folder} does not exist: {hint}")
        return
    if not folder.is_dir():
        raise ModelLoadError(f"model_name {name!r} is a file, not a model folder: pass the folder holding config.json")
    if is_adapter_folder(folder):
        raise ModelLoadError(_adapters_not_a_model(name))
    config_file = folder / "config.json"
    if not config_file.is_file() and checkpoint_steps(folder):
        raise ModelLoadError(f"{folder} is a raw nanochat checkpoint: convert it first: python convert_nanochat.py "
                             f"{folder} --output models/NAME, and train models/NAME")
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a model folder: pass a converted nanochat "
                             "folder (python convert_nanochat.py) or an mlx-lm model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_file} is not valid JSON ({e}): convert or download the model again") from None
    if is_nanochat_folder(folder):
        try:
            check_model_type(folder, config)
        except NanochatCheckpointError as e:
            raise ModelLoadError(str(e)) from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{folder} has no *.safetensors weights: convert or download the model again")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise ModelLoadError(f"{file} is {problem}: convert or download the model again")
    if is_nanochat_folder(folder):
        try:
            load_tiktoken_encoding(folder / TOKENIZER_FILENAME)
        except (pickle.UnpicklingError, ValueError, EOFError) as e:
            raise ModelLoadError(str(e) if str(folder) in str(e) else f"{folder / TOKENIZER_FILENAME}: {e}") from None


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header length, JSON header, data size), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes)"
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(size - 8, 100_000_000):
            return f"not a safetensors file, or truncated (its header claims {header_len} bytes of {size})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        return f"truncated: {size} bytes, its header needs {need}"
    return None


def _adapters_not_a_model(path) -> str:
    return (f"{path} holds LoRA adapters, not a model: load it with mlx_grpo.training.lora.load_adapted_model "
            f"(utils/inference.py does), or fuse it first: python utils/fuse.py --checkpoint {path} --output DIR")


def load_model(path: str | Path, *, lazy: bool = False, return_config: bool = False):
    """(model, tokenizer), or (model, tokenizer, config) with return_config.

    The tokenizer is an mlx_lm TokenizerWrapper in both cases, so mlx_lm.generate and
    stream_generate work on either.
    """
    if is_adapter_folder(path):  # a LoRA checkpoint: adapters only
        raise ModelLoadError(_adapters_not_a_model(path))
    if is_vlm_source(path):  # a vision-language model: mlx-vlm's, as a policy (utils/vlm/)
        from mlx_grpo.vlm.model import load_vlm, vlm_tokenizer

        model = load_vlm(path, lazy=lazy)
        return (model, vlm_tokenizer(model), read_config(path)) if return_config else (model, vlm_tokenizer(model))
    if is_nanochat_folder(path):
        folder = Path(path).expanduser()
        model, config = load_nanochat_model(folder, lazy=lazy)
        tokenizer = TiktokenTokenizerWrapper.from_dir(folder).to_mlx_lm()
    else:
        local = Path(path).expanduser()
        model, tokenizer, config = _load_with_mlx_lm(str(local) if local.exists() else str(path), lazy)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _load_with_mlx_lm(path: str, lazy: bool) -> tuple[nn.Module, object, dict]:
    import mlx_lm
    from huggingface_hub.errors import HFValidationError

    try:
        return mlx_lm.load(path, lazy=lazy, return_config=True)
    except (OSError, HFValidationError) as e:  # not on disk, and the hub is offline/unreachable/unknown
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(
            f"cannot load model {path!r} ({type(e).__name__}: {reason}); pass an existing folder "
            f"(a converted nanochat folder or an mlx-lm model) or a Hugging Face repo id; offline, "
            f"a hub model must already be in the Hugging Face cache"
        ) from e


def save_model_folder(folder: str | Path, model: nn.Module, tokenizer, source: str | Path,
                      config: dict | None = None) -> Path:
    """Write `model` (as loaded from `source` by load_model, possibly trained since) to a folder
    that load_model reads back: config and tokenizer files are taken from `source`; `config`
    replaces source's config.json content when the model's layout changed (e.g. fused, dequantized).

    nanochat: config.json, model.safetensors, tokenizer.pkl and nanochat_meta.json (with
    "parent": source). Other mlx-lm models: what mlx_lm.utils.save writes, minus the model card.
    """
    from mlx_lm.utils import hf_repo_to_path, load_config, save_config, save_model

    folder = Path(folder)
    src = Path(source).expanduser()
    if hasattr(model, "processor"):  # a vision-language policy (utils/vlm/)
        from mlx_grpo.vlm.model import save_vlm_folder

        return save_vlm_folder(folder, model, src)
    if nanochat_tokenizer(tokenizer) is not None:
        meta = {**read_nanochat_meta(src), "parent": str(source)}
        return save_nanochat_folder(folder, model, dict(config or load_config(src)), src / TOKENIZER_FILENAME,
                                    extra_meta=meta)
    if not src.exists():
        src = hf_repo_to_path(str(source))  # in the local HF cache: the model was loaded from there
    folder.mkdir(parents=True, exist_ok=True)
    # mlx_lm.utils.save minus its model card, which fetches the source card from the hub.
    save_model(folder, model)
    save_config(dict(config or load_config(src)), folder / "config.json")
    tokenizer.save_pretrained(folder)
    for pattern in ("*.py", "generation_config.json"):
        for path in src.glob(pattern):
            shutil.copy(path, folder)
    return folder
