"""Convert a model to an MLX folder: Hugging Face models through mlx-lm, nanochat checkpoints natively.

    python utils/convert_model.py --hf-path Qwen/Qwen2.5-1.5B-Instruct --output-dir models/qwen-1.5b-4bit -q
    python utils/convert_model.py --hf-path meta-llama/Llama-3.2-1B-Instruct -q --q-bits 8 --q-group-size 32
    python utils/convert_model.py --hf-path karpathy/nanochat-d32 --output-dir models/nanochat-d32-mlx
    python utils/convert_model.py --hf-path path/to/nanochat_ckpt_dir -q      # folder with model_*.pt + meta_*.json
    python utils/convert_model.py --hf-path Qwen/Qwen2-VL-2B-Instruct -q --vlm # vision-language: through mlx-vlm

Hugging Face models go through mlx_lm.convert. nanochat checkpoints (a folder with model_*.pt,
a hub release known to be nanochat such as karpathy/nanochat-d32, or any source with --nanochat)
go through the same function as convert_nanochat.py (mlx_grpo.nanochat.convert.convert); for a
nanochat base dir with stages, use convert_nanochat.py --stage. Vision-language models (a config.json
with a vision_config, or any source with --vlm) go through mlx_vlm.convert (the vlm extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from mlx_grpo.config import QUANT_BITS, QUANT_GROUP_SIZES
    from mlx_grpo.nanochat.checkpoint import KNOWN_HUB_REPOS, NanochatCheckpointError, checkpoint_steps, stages_in
    from mlx_grpo.nanochat.convert import (
        DEFAULT_DTYPE,
        DEFAULT_Q_BITS,
        DEFAULT_Q_GROUP_SIZE,
        DTYPES,
        default_output_dir,
    )
    from mlx_grpo.nanochat.convert import convert as convert_nanochat_checkpoint
    from mlx_grpo.vlm import VlmError, is_vlm_source, require_mlx_vlm
except ModuleNotFoundError as missing:  # run from a checkout that was never installed
    if missing.name != "mlx_grpo":
        raise
    sys.exit("error: the package mlx_grpo is not installed in this Python: run pip install -e . in the checkout")


class ConversionError(ValueError):
    """A conversion that cannot be done as asked; the message says what to change."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python utils/convert_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf-path", "--model", required=True,
                        help="Hugging Face repo id or local folder (an HF model, or a nanochat checkpoint)")
    parser.add_argument("--output-dir", "--mlx-path", dest="output_dir",
                        help="folder to write (default: models/<name>-mlx, with -<bits>bit when quantized); "
                             "HF models: it must not exist yet; nanochat: it must be empty unless --overwrite")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights (mlx-lm affine)")
    parser.add_argument("--q-bits", "--bits", dest="q_bits", type=int, choices=QUANT_BITS,
                        help=f"bits per weight with -q (default: {DEFAULT_Q_BITS})")
    parser.add_argument("--q-group-size", "--group-size", dest="q_group_size", type=int, choices=QUANT_GROUP_SIZES,
                        help=f"quantization group size with -q (default: {DEFAULT_Q_GROUP_SIZE})")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="dtype of the unquantized weights (default: HF models: config.json's torch_dtype; "
                             f"nanochat: {DEFAULT_DTYPE})")
    parser.add_argument("--upload-repo", help="Hugging Face repo to upload the converted HF model to")
    parser.add_argument("--revision", help="HF models: branch, tag or commit of the hub repo")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="HF models: allow the repo's own Python code (custom model or tokenizer classes)")
    parser.add_argument("--nanochat", action="store_true",
                        help="read --hf-path as a nanochat checkpoint (folder or hub repo) even if not detected")
    parser.add_argument("--vlm", action="store_true",
                        help="convert --hf-path as a vision-language model through mlx-vlm even if its config.json "
                             "(local, or in the HF cache) does not show a vision_config")
    parser.add_argument("--step", type=int, help="nanochat: checkpoint step to convert (default: the newest)")
    parser.add_argument("--overwrite", action="store_true", help="nanochat: write into a non-empty output folder")
    args = parser.parse_args(argv)
    if not args.quantize and (args.q_bits is not None or args.q_group_size is not None):
        parser.error("--q-bits / --q-group-size need -q (--quantize)")
    if args.vlm and args.nanochat:
        parser.error("--vlm and --nanochat: pick one (nanochat checkpoints are text models)")
    return args


def _q_bits(args: argparse.Namespace) -> int | None:
    return (args.q_bits or DEFAULT_Q_BITS) if args.quantize else None


def _q_group_size(args: argparse.Namespace) -> int | None:
    return (args.q_group_size or DEFAULT_Q_GROUP_SIZE) if args.quantize else None


# ---------------------------------------------------------------------------------------------
# Routing


def is_nanochat_source(source: str, forced: bool = False) -> bool:
    """nanochat route: --nanochat, a local folder holding model_*.pt, or a known nanochat hub release."""
    if forced:
        return True
    path = Path(source).expanduser()
    if path.exists():
        return bool(checkpoint_steps(path))
    return source in KNOWN_HUB_REPOS


def _check_not_base_dir(source: str) -> None:
    stages = stages_in(source)
    if stages:
        path = Path(source).expanduser()
        raise ConversionError(
            f"{path} is a nanochat base dir (it has checkpoints of the stages {', '.join(stages)}): convert one "
            f"model with: python convert_nanochat.py {path} --stage {stages[0]} [--tag TAG]"
        )


# ---------------------------------------------------------------------------------------------
# The two routes


def convert_kwargs(args: argparse.Namespace, output_dir: Path) -> dict:
    """Keyword arguments for mlx_lm.convert.convert (0.32.2 takes every one of them)."""
    return {
        "hf_path": args.hf_path,
        "mlx_path": str(output_dir),
        "quantize": args.quantize,
        "q_group_size": _q_group_size(args),
        "q_bits": _q_bits(args),
        "dtype": args.dtype,
        "upload_repo": args.upload_repo,
        "revision": args.revision,
        # mlx-lm passes it to its model loader and, as tokenizer_config, to AutoTokenizer.
        "trust_remote_code": args.trust_remote_code,
    }


def _run_converter(convert, kwargs: dict, source: str) -> None:
    """mlx-lm's or mlx-vlm's convert(**kwargs); a source that cannot be read is a ConversionError."""
    from huggingface_hub.errors import HFValidationError

    try:
        convert(**kwargs)
    except (OSError, HFValidationError) as e:  # not on disk, and the hub is offline/unreachable/unknown
        reason = " ".join(str(e).split())[:300]
        raise ConversionError(
            f"cannot read {source!r} ({type(e).__name__}: {reason}); pass a local model folder or a "
            f"Hugging Face repo id (downloading needs the network, or the model already in the HF cache)"
        ) from e


def convert_hf(args: argparse.Namespace, output_dir: Path | None) -> str:
    from mlx_lm.convert import convert

    not_for_hf = [flag for flag, value in (("--step", args.step is not None), ("--overwrite", args.overwrite)) if value]
    if not_for_hf:
        raise ConversionError(f"{', '.join(not_for_hf)}: only for nanochat checkpoints; this source converts as a "
                              f"Hugging Face model (pass --nanochat if it is a nanochat checkpoint)")
    _check_not_base_dir(args.hf_path)
    output_dir = output_dir or default_output_dir(args.hf_path, _q_bits(args))
    if output_dir.exists():  # mlx_lm.convert writes only new folders
        raise ConversionError(f"output folder {output_dir} already exists; remove it or pass another --output-dir")
    _run_converter(convert, convert_kwargs(args, output_dir), args.hf_path)
    quant = f", {_q_bits(args)}-bit" if args.quantize else ""
    return f"Converted {args.hf_path} -> {output_dir}{quant}"


def convert_vlm(args: argparse.Namespace, output_dir: Path | None) -> str:
    """A Hugging Face vision-language model through mlx_vlm.convert: the language model quantized with -q,
    the vision tower kept in full precision (mlx-vlm's rule); the processor files copied."""
    require_mlx_vlm()
    from mlx_vlm.convert import convert

    nanochat_flags = (("--step", args.step is not None), ("--overwrite", args.overwrite))
    not_for_vlm = [flag for flag, value in nanochat_flags if value]
    if not_for_vlm:
        raise ConversionError(f"{', '.join(not_for_vlm)}: only for nanochat checkpoints, not for vision-language "
                              "models; drop them")
    output_dir = output_dir or default_output_dir(args.hf_path, _q_bits(args))
    if output_dir.exists():  # mlx_vlm.convert would write into it
        raise ConversionError(f"output folder {output_dir} already exists; remove it or pass another --output-dir")
    kwargs = convert_kwargs(args, output_dir)
    # mlx-vlm's q_bits / q_group_size have defaults; None would reach its quantizer
    kwargs["q_bits"] = _q_bits(args) or DEFAULT_Q_BITS
    kwargs["q_group_size"] = _q_group_size(args) or DEFAULT_Q_GROUP_SIZE
    _run_converter(convert, kwargs, args.hf_path)  # trust_remote_code passed as given: mlx-vlm's default is True
    quant = f", {_q_bits(args)}-bit language model" if args.quantize else ""
    return f"Converted the vision-language model {args.hf_path} -> {output_dir} (mlx-vlm){quant}"


def convert_nanochat(args: argparse.Namespace, output_dir: Path | None) -> str:
    not_for_nanochat = [flag for flag, value in (("--upload-repo", args.upload_repo), ("--revision", args.revision),
                                                 ("--trust-remote-code", args.trust_remote_code)) if value]
    if not_for_nanochat:
        raise ConversionError(
            f"{', '.join(not_for_nanochat)}: only for Hugging Face models (mlx_lm.convert), not for nanochat "
            f"checkpoints; drop them"
        )
    summary = convert_nanochat_checkpoint(args.hf_path, output_dir, step=args.step, dtype=args.dtype or DEFAULT_DTYPE,
                                          q_bits=_q_bits(args), q_group_size=_q_group_size(args),
                                          overwrite=args.overwrite)
    return summary.describe()


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir) if args.output_dir else None
    try:
        if is_nanochat_source(args.hf_path, forced=args.nanochat):
            message = convert_nanochat(args, output_dir)
        elif args.vlm or is_vlm_source(args.hf_path):
            message = convert_vlm(args, output_dir)
        else:
            message = convert_hf(args, output_dir)
    except (ConversionError, NanochatCheckpointError, VlmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
