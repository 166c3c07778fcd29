"""nanochat checkpoints: find them, read them, check them, convert them to an MLX folder.

A nanochat checkpoint is model_{step:06d}.pt (a torch state dict) + meta_{step:06d}.json, with the
run's tokenizer.pkl beside them (hub releases) or in ../../tokenizer/ (a nanochat base dir).
Only the October-2025 architecture (the released d20/d32 chat models) is supported; it is
mlx-lm's model_type "nanochat". Anything else is refused, never converted into a wrong model.

The converted folder holds config.json (mlx-lm format: mlx_lm.utils.load_model reads the folder too),
model.safetensors, tokenizer.pkl and nanochat_meta.json (the nanochat meta plus provenance), plus
Hugging Face tokenizer files made from tokenizer.pkl (utils/nanochat/hf_tokenizer.py) so plain mlx_lm.load
reads the folder too.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_grpo.nanochat.hf_tokenizer import hf_tokenizer_files, write_hf_tokenizer_files
from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME as TOKENIZER_FILE
from mlx_grpo.nanochat.tokenizer import load_tiktoken_encoding

HUB_DEFAULT_REPO = "karpathy/nanochat-d32"
META_FILE = "nanochat_meta.json"
# nanochat's stage names (scripts) and the checkpoint folders they write under the base dir.
STAGE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
ROPE_THETA = 10000.0
# Tensor-name fragments of the 2026 nanochat architecture (value embeddings, per-layer lambdas,
# smear/backout), which mlx-lm's nanochat model does not implement.
ARCH_2026_MARKERS = ("value_embeds", "ve_gate", "resid_lambdas", "x0_lambdas", "smear", "backout")
COMPILED_PREFIX = "_orig_mod."
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


@dataclass
class ConversionSummary:
    output_dir: Path
    source: str
    step: int
    depth: int
    width: int
    num_params: int
    dtype: str
    quantization: dict | None
    size_bytes: int

    def describe(self) -> str:
        quant = (
            f", {self.quantization['bits']}-bit quantized (group {self.quantization['group_size']})"
            if self.quantization
            else ""
        )
        return (
            f"Converted {self.source} step {self.step} -> {self.output_dir}: "
            f"depth {self.depth}, width {self.width}, {self.num_params:,} params, "
            f"{self.dtype}{quant}, {self.size_bytes / 1e6:.1f} MB on disk"
        )


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def nanochat_base_dir() -> Path:
    """nanochat's own default: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def is_hub_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source))


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
    candidates = [folder / TOKENIZER_FILE, folder.parent.parent / "tokenizer" / TOKENIZER_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise NanochatCheckpointError(
        f"no {TOKENIZER_FILE} found for the checkpoint in {folder} (looked in "
        f"{', '.join(str(c) for c in candidates)}); copy the run's {TOKENIZER_FILE} beside model_*.pt"
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
                f"(the folder holds model_*.pt, meta_*.json and {TOKENIZER_FILE})"
            ) from e

    # The metas are small and name every step, so only the one model file we need is downloaded.
    folder = fetch(["meta_*.json", TOKENIZER_FILE])
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
    folder = fetch([f"model_{digits[step]}.pt", f"meta_{digits[step]}.json", TOKENIZER_FILE])
    return find_checkpoint(folder, step, source=repo_id)


def resolve_checkpoint(
    source: str | None,
    *,
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
) -> NanochatCheckpoint:
    """What the convert CLI accepts: a checkpoint folder, a base dir with stage (+ tag), or a hub id.

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


def default_output_dir(checkpoint: NanochatCheckpoint) -> Path:
    """models/<name>-mlx, e.g. karpathy/nanochat-d32 -> models/nanochat-d32-mlx."""
    if is_hub_repo_id(checkpoint.source) and not Path(checkpoint.source).exists():
        name = checkpoint.source.split("/")[-1]
    elif checkpoint.folder.parent.name in STAGE_DIRS.values():
        stage = next(s for s, d in STAGE_DIRS.items() if d == checkpoint.folder.parent.name)
        name = f"nanochat-{checkpoint.folder.name}-{stage}"
    else:
        name = checkpoint.folder.resolve().name
    return Path("models") / f"{name}-mlx"


# ---------------------------------------------------------------------------------------------
# Reading and checking


def read_meta(meta_path: str | Path) -> dict:
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise NanochatCheckpointError(f"{meta_path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanochatCheckpointError(f"{meta_path} has no model_config: not a nanochat meta file")
    return meta


def check_model_config(model_config: dict) -> dict:
    """The six October-2025 keys as ints; other keys (e.g. 2026's window_pattern) are refused."""
    missing = [k for k in MODEL_CONFIG_KEYS if k not in model_config]
    unknown = sorted(set(model_config) - set(MODEL_CONFIG_KEYS))
    if missing:
        raise NanochatCheckpointError(f"model_config lacks {', '.join(missing)}: not a nanochat checkpoint")
    if unknown:
        raise NanochatCheckpointError(
            f"model_config has keys of a newer nanochat architecture ({', '.join(unknown)}); only the "
            f"October-2025 architecture (the released d20/d32 chat models) can be converted"
        )
    cfg = {k: int(model_config[k]) for k in MODEL_CONFIG_KEYS}
    n_embd, n_head, n_kv_head = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    if n_head <= 0 or n_kv_head <= 0 or n_embd % n_head or n_head % n_kv_head or (n_embd // n_head) % 2:
        raise NanochatCheckpointError(
            f"inconsistent model_config: n_embd {n_embd}, n_head {n_head}, n_kv_head {n_kv_head} "
            f"(need n_embd divisible by n_head into an even head_dim, n_head by n_kv_head)"
        )
    return cfg


def expected_shapes(model_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the October-2025 architecture, torch (out, in) layout."""
    cfg = check_model_config(model_config)
    n, vocab = cfg["n_embd"], cfg["vocab_size"]
    kv = cfg["n_kv_head"] * (n // cfg["n_head"])
    shapes = {"transformer.wte.weight": (vocab, n), "lm_head.weight": (vocab, n)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (n, n)
        shapes[p + "attn.c_k.weight"] = (kv, n)
        shapes[p + "attn.c_v.weight"] = (kv, n)
        shapes[p + "attn.c_proj.weight"] = (n, n)
        shapes[p + "mlp.c_fc.weight"] = (4 * n, n)
        shapes[p + "mlp.c_proj.weight"] = (n, 4 * n)
    return shapes


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict_shapes(shapes: dict[str, tuple[int, ...]], model_config: dict, source: str = "checkpoint") -> None:
    """Refuse anything but exactly the expected tensors with the expected shapes, naming offenders."""
    expected = expected_shapes(model_config)
    newer = [k for k in shapes if any(m in k for m in ARCH_2026_MARKERS)]
    if newer:
        raise NanochatCheckpointError(
            f"{source} is a newer (2026) nanochat architecture ({_names(newer)}); only the "
            f"October-2025 architecture (the released d20/d32 chat models) can be converted"
        )
    unexpected = set(shapes) - set(expected)
    if unexpected:
        raise NanochatCheckpointError(f"{source} has unexpected tensors: {_names(unexpected)}")
    missing = set(expected) - set(shapes)
    if missing:
        raise NanochatCheckpointError(f"{source} is missing tensors: {_names(missing)}")
    wrong = [f"{k} {tuple(shapes[k])} != {expected[k]}" for k in expected if tuple(shapes[k]) != expected[k]]
    if wrong:
        raise NanochatCheckpointError(
            f"{source} has tensors of the wrong shape for its model_config: {_names(wrong, 4)}"
        )


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
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # corrupt, truncated, or not a state dict
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


def torch_to_mx(tensor, dtype: mx.Dtype) -> mx.array:
    # numpy has no bfloat16: go through float32, which holds bf16/fp16 values exactly.
    array = mx.array(tensor.float().numpy()).astype(dtype)
    mx.eval(array)  # now, so the float32 copy is freed before the next tensor
    return array


# ---------------------------------------------------------------------------------------------
# Building, saving and loading MLX folders


def mlx_config(model_config: dict) -> dict:
    """mlx-lm config.json content (model_type "nanochat") for a nanochat model_config."""
    cfg = check_model_config(model_config)
    return {
        "model_type": "nanochat",
        "hidden_size": cfg["n_embd"],
        "num_hidden_layers": cfg["n_layer"],
        "num_attention_heads": cfg["n_head"],
        "num_key_value_heads": cfg["n_kv_head"],
        "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg["sequence_len"],
        "intermediate_size": 4 * cfg["n_embd"],
        "rope_theta": ROPE_THETA,
    }


def build_model(config: dict) -> nn.Module:
    """An mlx-lm nanochat model for a config.json dict (random init; quantized if config says so)."""
    from mlx_lm.models import nanochat  # imported where used: mlx_lm pulls in transformers (slow)

    if config.get("model_type") != "nanochat":
        raise NanochatCheckpointError(f"config model_type is {config.get('model_type')!r}, expected 'nanochat'")
    model = nanochat.Model(nanochat.ModelArgs.from_dict(config))
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
            f"model has parameters its config does not describe (fuse LoRA adapters first?): {_names(extra)}"
        )
    if missing:
        raise NanochatCheckpointError(f"model lacks parameters its config describes: {_names(missing)}")
    wrong = [f"{k} {have[k]} != {want[k]}" for k in want if have[k] != want[k]]
    if wrong:
        raise NanochatCheckpointError(f"model parameters have the wrong shape for its config: {_names(wrong, 4)}")


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
    target = out_dir / TOKENIZER_FILE
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
        raise NanochatCheckpointError(f"{folder} has {TOKENIZER_FILE} but no config.json: not a converted nanochat folder")
    model_type = load_config(folder).get("model_type")
    if model_type != "nanochat":
        raise NanochatCheckpointError(
            f"{folder} holds {TOKENIZER_FILE} but config.json says model_type {model_type!r}, expected 'nanochat'"
        )
    try:
        return load_model(folder, lazy=lazy, strict=True)
    except (ValueError, FileNotFoundError) as e:  # mlx's strict load_weights names the weights
        raise NanochatCheckpointError(f"cannot load {folder}: {' '.join(str(e).split())}") from e


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_checkpoint(
    checkpoint: NanochatCheckpoint,
    output_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    q_bits: int | None = None,
    q_group_size: int | None = None,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert one nanochat checkpoint into an MLX folder (optionally quantized with mlx-lm)."""
    if dtype not in DTYPES:
        raise NanochatCheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if q_group_size is not None and q_bits is None:
        raise NanochatCheckpointError("--q-group-size needs --q-bits")
    if q_bits is not None:
        q_group_size = q_group_size or 64
        if q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES:
            raise NanochatCheckpointError(
                f"unsupported quantization {q_bits} bits / group {q_group_size}; bits: "
                f"{', '.join(map(str, Q_BITS))}, group size: {', '.join(map(str, Q_GROUP_SIZES))}"
            )
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise NanochatCheckpointError(f"output folder {output_dir} is not empty; remove it or pass --overwrite")

    meta = read_meta(checkpoint.meta_path)
    model_config = check_model_config(meta["model_config"])
    state = read_state_dict(checkpoint.model_path)
    check_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()}, model_config, str(checkpoint.model_path))

    config = mlx_config(model_config)
    target = DTYPES[dtype]
    num_params = sum(v.numel() for v in state.values())
    weights = [(name, torch_to_mx(state.pop(name), target)) for name in sorted(state)]
    model = build_model(config)
    model.load_weights(weights, strict=True)
    del weights
    mx.eval(model.parameters())

    quantization = None
    if q_bits is not None:
        from mlx_lm.utils import quantize_model

        model, config = quantize_model(model, config, group_size=q_group_size, bits=q_bits)
        quantization = config["quantization"]

    provenance = dict(meta)
    provenance["conversion"] = {
        "source": checkpoint.source,
        "step": checkpoint.step,
        "model_file": checkpoint.model_path.name,
        "dtype": dtype,
        "quantization": quantization,
    }
    save_nanochat_folder(output_dir, model, config, checkpoint.tokenizer_path, extra_meta=provenance)
    size = sum(p.stat().st_size for p in output_dir.iterdir() if p.is_file())
    return ConversionSummary(
        output_dir=output_dir,
        source=checkpoint.source,
        step=checkpoint.step,
        depth=model_config["n_layer"],
        width=model_config["n_embd"],
        num_params=num_params,
        dtype=dtype,
        quantization=quantization,
        size_bytes=size,
    )
