"""Converted nanochat MLX folders: build the model a config.json describes, write a folder, load one.

A folder holds config.json (mlx-lm format: model_type "nanochat", mlx-lm's October-2025 model, or
"nanochat_2026", utils/nanochat/model.py), model.safetensors, tokenizer.pkl, nanochat_meta.json (the
nanochat meta plus provenance or training state), and Hugging Face tokenizer files made from
tokenizer.pkl (utils/nanochat/hf_tokenizer.py) so plain mlx_lm.load reads it too (for "nanochat_2026"
through utils/nanochat/mlx_lm_hook.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import mlx.nn as nn

from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError, checkpoint_steps, list_names
from mlx_grpo.nanochat.hf_tokenizer import hf_tokenizer_files, write_hf_tokenizer_files
from mlx_grpo.nanochat.mlx_lm_hook import MODEL_TYPE as MODEL_TYPE_2026
from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME, load_tiktoken_encoding

META_FILE = "nanochat_meta.json"
MODEL_TYPES = ("nanochat", MODEL_TYPE_2026)  # October 2025 (mlx-lm's model), the 2026 eras (ours)


def model_classes(config: dict):
    """(Model, ModelArgs) for a nanochat config.json; mlx_lm.utils.load_model's get_model_classes."""
    # Imported where used: mlx_lm pulls in transformers (slow).
    model_type = config.get("model_type")
    if model_type == "nanochat":
        from mlx_lm.models import nanochat as arch
    elif model_type == MODEL_TYPE_2026:
        from mlx_grpo.nanochat import model as arch

        missing = [f.name for f in dataclasses.fields(arch.ModelArgs) if f.name not in config]
        if missing:
            raise NanochatCheckpointError(f"config.json lacks {', '.join(missing)} (model_type {model_type}): "
                                          f"convert the checkpoint again with this version of convert_nanochat.py")
    else:
        raise NanochatCheckpointError(f"config model_type is {model_type!r}, expected one of {', '.join(MODEL_TYPES)}")
    return arch.Model, arch.ModelArgs


def build_model(config: dict) -> nn.Module:
    """The nanochat model for a config.json dict (random init; quantized if config says so)."""
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    if (q := config.get("quantization")) is not None:
        # Same layer choice as mlx_lm.utils.quantize_model: layers whose input dim fits the group.
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % q["group_size"] == 0,
        )
    return model


def _check_params_match(model: nn.Module, config: dict) -> None:
    # Arrays are lazy: a reference model costs no memory as long as it is never evaluated.
    from mlx.utils import tree_flatten

    want = {k: v.shape for k, v in tree_flatten(build_model(config).parameters())}
    have = {k: v.shape for k, v in tree_flatten(model.parameters())}
    extra, missing = set(have) - set(want), set(want) - set(have)
    if extra:
        raise NanochatCheckpointError(
            f"model has parameters its config does not describe (fuse LoRA adapters first?): {list_names(extra)}"
        )
    if missing:
        raise NanochatCheckpointError(f"model lacks parameters its config describes: {list_names(missing)}")
    wrong = [f"{k} {have[k]} != {want[k]}" for k in want if have[k] != want[k]]
    if wrong:
        raise NanochatCheckpointError(f"model parameters have the wrong shape for its config: {list_names(wrong, 4)}")


def save_nanochat_folder(
    out_dir: str | Path,
    model: nn.Module,
    config: dict,
    tokenizer_pkl_path: str | Path,
    extra_meta: dict | None = None,
) -> Path:
    """Write a loadable nanochat MLX folder: config.json, model.safetensors, tokenizer.pkl, meta,
    and the Hugging Face tokenizer files mlx_lm.load needs (tokenizer.json, tokenizer_config.json,
    generation_config.json).

    `model` must hold exactly the parameters `config` describes (fuse LoRA adapters first);
    extra_meta, when given, is written as nanochat_meta.json (provenance, training state).
    Overwrites the weights and config of an existing folder.
    """
    from mlx_lm.utils import save_config, save_model

    _check_params_match(model, config)
    # Built before anything is written: a bad tokenizer.pkl fails the save, not half of it.
    hf_files = hf_tokenizer_files(load_tiktoken_encoding(tokenizer_pkl_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stale shards of an earlier save would be loaded together with the new weights.
    for old in out_dir.glob("model*.safetensors"):
        old.unlink()
    save_model(out_dir, model)
    save_config(copy.deepcopy(config), out_dir / "config.json")
    tokenizer_pkl_path = Path(tokenizer_pkl_path)
    target = out_dir / TOKENIZER_FILENAME
    if not (target.exists() and target.samefile(tokenizer_pkl_path)):
        shutil.copyfile(tokenizer_pkl_path, target)
    write_hf_tokenizer_files(out_dir, hf_files)
    if extra_meta is not None:
        with open(out_dir / META_FILE, "w", encoding="utf-8") as f:
            json.dump(extra_meta, f, indent=2)
    return out_dir


def read_nanochat_meta(folder: str | Path) -> dict:
    """nanochat_meta.json of a converted folder ({} when there is none)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_model_type(folder: Path, config: dict) -> None:
    """A folder with tokenizer.pkl must hold one of the nanochat model types."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise NanochatCheckpointError(
            f"{folder} holds {TOKENIZER_FILENAME} but config.json says model_type {model_type!r}, expected one of "
            f"{', '.join(MODEL_TYPES)}"
        )


def load_nanochat_model(folder: str | Path, lazy: bool = False) -> tuple[nn.Module, dict]:
    """(model, config) of a converted folder; strict: a missing or extra weight is an error naming it."""
    from mlx_lm.utils import load_config, load_model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        if checkpoint_steps(folder):
            raise NanochatCheckpointError(
                f"{folder} is a raw nanochat checkpoint; convert it first: "
                f"python convert_nanochat.py {folder} --output DIR"
            )
        raise NanochatCheckpointError(
            f"{folder} has {TOKENIZER_FILENAME} but no config.json: not a converted nanochat folder"
        )
    check_model_type(folder, load_config(folder))
    try:
        return load_model(folder, lazy=lazy, strict=True, get_model_classes=model_classes)
    except (ValueError, FileNotFoundError) as e:  # mlx's strict load_weights names the weights
        raise NanochatCheckpointError(f"cannot load {folder}: {' '.join(str(e).split())}") from e
