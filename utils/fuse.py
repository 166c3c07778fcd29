"""Fuse the LoRA/DoRA adapters of a training checkpoint into its base: a model folder like any other.

    python utils/fuse.py --checkpoint outputs/run1/checkpoints/step_000100 --output models/run1-fused
    python utils/fuse.py --checkpoint outputs/run1 --output models/run1-fused          # newest checkpoint
    python utils/fuse.py --checkpoint CKPT --base models/nanochat-d32-mlx --output DIR # base moved since

The base is the model_name recorded in the checkpoint's adapter_config.json (--base overrides it).
The merge is mlx-lm's fuse (LoRALinear.fuse / DoRALinear.fuse). The output loads with
mlx_grpo.models.load_model, utils/inference.py and as model_name of a new run: a nanochat
base gives a nanochat folder (config.json, model.safetensors, tokenizer.pkl, ...), another
mlx-lm base an mlx-lm folder. A quantized base (QLoRA) is dequantized by default, so the fused
model reproduces the adapted one; --keep-quantized keeps the base's bits (merged weights re-quantized).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python utils/fuse.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a LoRA training checkpoint (adapters.safetensors + adapter_config.json), or a run "
                             "folder (its newest checkpoint)")
    parser.add_argument("--output", required=True, help="folder for the fused model (must be empty or new)")
    parser.add_argument("--base", help="the base model (default: the model_name recorded in the checkpoint)")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="a quantized base stays quantized (default: dequantize, exact)")
    return parser.parse_args(argv)


def resolve_checkpoint(path: str | Path) -> Path:
    from mlx_grpo.models import ADAPTER_CONFIG_FILE, is_adapter_folder
    from mlx_grpo.training.checkpoint import CheckpointError, run_checkpoint

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    path = run_checkpoint(folder)
    if not is_adapter_folder(path):
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG_FILE}: not a LoRA checkpoint (a full-training "
                              "checkpoint is already a model folder: load it directly)")
    return path


def fuse_checkpoint(checkpoint: str | Path, output: str | Path, *, base: str | None = None,
                    keep_quantized: bool = False) -> Path:
    """Load base + adapters, merge them (mlx-lm's fuse) and write a loadable model folder; return it."""
    from mlx_grpo.models import ModelLoadError, save_model_folder
    from mlx_grpo.training.lora import adapter_base, fuse_adapters, load_adapted_model

    checkpoint = resolve_checkpoint(checkpoint)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ModelLoadError(f"output folder {output} is not empty; choose a new folder")
    base = base or adapter_base(checkpoint)
    model, tokenizer, config = load_adapted_model(base, checkpoint, return_config=True)
    config = fuse_adapters(model, config, dequantize=not keep_quantized)
    return save_model_folder(output, model, tokenizer, base, config=config)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mlx_grpo.config import ConfigError
    from mlx_grpo.models import ModelLoadError
    from mlx_grpo.nanochat.checkpoint import NanochatCheckpointError
    from mlx_grpo.training.checkpoint import CheckpointError

    try:
        folder = fuse_checkpoint(args.checkpoint, args.output, base=args.base, keep_quantized=args.keep_quantized)
    except (CheckpointError, ConfigError, ModelLoadError, NanochatCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"fused {args.checkpoint} into {folder}")
    return 0


if __name__ == "__main__":
    try:
        import mlx_grpo  # noqa: F401  (the tool's imports are inside main())
    except ModuleNotFoundError:  # run from a checkout that was never installed
        sys.exit("error: the package mlx_grpo is not installed in this Python: run pip install -e . in the checkout")
    sys.exit(main())
