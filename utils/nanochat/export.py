"""Export an MLX nanochat model back to nanochat: `python convert_nanochat.py --to-nanochat SOURCE --output DIR`.

SOURCE is a converted folder, a trainer checkpoint (full or LoRA/DoRA: the adapters are fused first,
mlx-lm's fuse) or a run folder (its newest checkpoint). DIR is a nanochat base dir; written there:

    DIR/chatrl_checkpoints/<tag>/model_{step:06d}.pt     torch.save of the state dict, nanochat's names
    DIR/chatrl_checkpoints/<tag>/meta_{step:06d}.json    {"model_config": ..., the source's meta, "mlx_grpo": ...}
    DIR/tokenizer/tokenizer.pkl                          the model's tokenizer, where nanochat's get_tokenizer reads it

so nanochat's load_model("rl", ..., model_tag=<tag>) (chat_web.py, chat_eval.py, chat_cli.py with
NANOCHAT_BASE_DIR=DIR) loads it. Every tensor gets back its nanochat name and the dtype the converted
checkpoint had (recorded at conversion; else nanochat's CUDA layout: bf16 embeddings, float32 others).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_grpo.nanochat.checkpoint import STAGE_DIRS, NanochatCheckpointError
from mlx_grpo.nanochat.folder import META_FILE, MODEL_TYPES, read_nanochat_meta
from mlx_grpo.nanochat.model import nanochat_name
from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME

TOKENIZER_DIR = "tokenizer"  # nanochat's get_tokenizer(): <base dir>/tokenizer/tokenizer.pkl
DEFAULT_STAGE = "rl"
# Without a recorded dtype: nanochat on CUDA stores the embedding tables in bf16, every other tensor in float32.
BF16_BY_DEFAULT = ("transformer.wte.", "value_embeds.")
# Keys this project adds to a folder's nanochat_meta.json; the export files them under "mlx_grpo".
OUR_META_KEYS = ("conversion", "parent", "source")


@dataclass
class ExportSummary:
    model_path: Path
    meta_path: Path
    tokenizer_path: Path
    num_tensors: int

    def describe(self) -> str:
        return (f"wrote {self.model_path} ({self.num_tensors} tensors), {self.meta_path.name} and "
                f"{self.tokenizer_path}")


def resolve_source(source: str | Path) -> Path:
    """A run folder -> its newest checkpoint; any other folder as it is."""
    from mlx_grpo.training.checkpoint import run_checkpoint

    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise NanochatCheckpointError(f"--to-nanochat {source}: no such folder")
    return run_checkpoint(folder, NanochatCheckpointError)


def load_for_export(path: Path):
    """(model, config, folder whose meta and tokenizer.pkl belong to it); LoRA/DoRA adapters fused."""
    from mlx_grpo.models import is_adapter_folder
    from mlx_grpo.training.lora import adapter_base, fuse_adapters, load_adapted_model

    if is_adapter_folder(path):
        model, _, config = load_adapted_model(path, return_config=True)
        config = fuse_adapters(model, config, dequantize=True)
        folder = Path(adapter_base(path)).expanduser()
    else:
        from mlx_grpo.nanochat.folder import load_nanochat_model

        model, config = load_nanochat_model(path)
        folder = path
    if config.get("model_type") not in MODEL_TYPES:
        raise NanochatCheckpointError(f"{path} is not a nanochat model (model_type {config.get('model_type')!r}); "
                                      "only nanochat models go back to nanochat")
    if config.get("quantization"):
        raise NanochatCheckpointError(f"{path} is quantized; nanochat loads dense weights: export the full-precision "
                                      "model (convert without --q-bits)")
    return model, config, folder


def nanochat_state_dict(model, dtypes: dict) -> dict:
    """The model's weights under nanochat's names as torch tensors, each in its recorded dtype."""
    import torch

    state = {}
    for name, value in tree_flatten(model.parameters()):
        name = nanochat_name(name)
        default = "bfloat16" if name.startswith(BF16_BY_DEFAULT) else "float32"
        dtype = getattr(torch, dtypes.get(name, default))
        # numpy has no bfloat16: float32 holds every value of the model's dtypes exactly; then nanochat's.
        state[name] = torch.from_numpy(np.array(value.astype(mx.float32))).to(dtype)
    return state


def export_meta(meta: dict, step: int, source: Path) -> dict:
    """nanochat's meta (the loader reads model_config) with this project's provenance under "mlx_grpo"."""
    ours = {key: meta[key] for key in OUR_META_KEYS if key in meta}
    out = {key: value for key, value in meta.items() if key not in OUR_META_KEYS}
    out["step"] = step
    out["mlx_grpo"] = {**ours, "exported_from": str(source)}
    return out


def trainer_step(path: Path) -> int | None:
    from mlx_grpo.training.checkpoint import TRAINER_STATE_FILE

    state = path / TRAINER_STATE_FILE
    return json.loads(state.read_text(encoding="utf-8"))["step"] if state.is_file() else None


def export_to_nanochat(source: str | Path, base_dir: str | Path, *, tag: str | None = None, step: int | None = None,
                       stage: str = DEFAULT_STAGE, overwrite: bool = False) -> ExportSummary:
    """Write SOURCE's model into the nanochat base dir base_dir (see the module docstring)."""
    import torch

    path = resolve_source(source)
    model, config, folder = load_for_export(path)
    meta = read_nanochat_meta(folder)
    if "model_config" not in meta:
        raise NanochatCheckpointError(f"{folder / META_FILE} has no model_config: export needs a folder that "
                                      "convert_nanochat.py wrote (or a trainer checkpoint of a run on one)")
    step = step if step is not None else trainer_step(path)
    step = step if step is not None else int(meta.get("step", 0))
    tag = tag or f"d{meta['model_config']['n_layer']}"
    out_dir = Path(base_dir).expanduser() / STAGE_DIRS[stage] / tag
    model_path, meta_path = out_dir / f"model_{step:06d}.pt", out_dir / f"meta_{step:06d}.json"
    if model_path.exists() and not overwrite:
        raise NanochatCheckpointError(f"{model_path} exists; pass --overwrite to replace it, or --step N")
    tokenizer_src = folder / TOKENIZER_FILENAME
    tokenizer_path = Path(base_dir).expanduser() / TOKENIZER_DIR / TOKENIZER_FILENAME
    if tokenizer_path.exists() and tokenizer_path.read_bytes() != tokenizer_src.read_bytes() and not overwrite:
        raise NanochatCheckpointError(f"{tokenizer_path} is another tokenizer than the model's; nanochat reads one "
                                      "tokenizer per base dir: export into another --output (or --overwrite it)")

    state = nanochat_state_dict(model, meta.get("conversion", {}).get("dtypes", {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, model_path)
    meta_path.write_text(json.dumps(export_meta(meta, step, path), indent=2), encoding="utf-8")
    shutil.copyfile(tokenizer_src, tokenizer_path)
    return ExportSummary(model_path, meta_path, tokenizer_path, len(state))


def main(args) -> int:
    """convert_nanochat.py --to-nanochat SOURCE --output DIR [--tag T] [--step N] [--stage S] [--overwrite]."""
    from mlx_grpo.models import ModelLoadError

    if not args.output:
        print("error: --to-nanochat needs --output DIR (a nanochat base dir, e.g. ~/.cache/nanochat)", file=sys.stderr)
        return 1
    try:
        summary = export_to_nanochat(args.to_nanochat, args.output, tag=args.tag, step=args.step,
                                     stage=args.stage or DEFAULT_STAGE, overwrite=args.overwrite)
    except (NanochatCheckpointError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0
