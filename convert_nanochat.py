"""Convert a nanochat checkpoint into an MLX folder for mlx_grpo.models.load_model (and mlx-lm).

    python convert_nanochat.py                                   # karpathy/nanochat-d32 -> models/nanochat-d32-mlx
    python convert_nanochat.py path/to/ckpt_dir --output models/mine [--step N]
    python convert_nanochat.py ~/.cache/nanochat --stage sft --tag d20 --output models/d20-sft
    python convert_nanochat.py sdobson/nanochat --q-bits 4 --q-group-size 64
"""

import argparse
import sys

from mlx_grpo.nanochat.convert import (
    DTYPES,
    HUB_DEFAULT_REPO,
    STAGE_DIRS,
    NanochatCheckpointError,
    convert_checkpoint,
    default_output_dir,
    resolve_checkpoint,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source",
        nargs="?",
        help=f"folder with model_*.pt + meta_*.json, a nanochat base dir (with --stage), or a hub repo id "
        f"(default: {HUB_DEFAULT_REPO}; with --stage: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)",
    )
    parser.add_argument("--output", help="output folder (default: models/<name>-mlx)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--stage", choices=list(STAGE_DIRS), help="read SOURCE as a nanochat base dir, this stage")
    parser.add_argument("--tag", help="model tag under the stage folder, e.g. d32 (needed when there are several)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="weight dtype (default: bfloat16)")
    parser.add_argument("--q-bits", type=int, help="quantize the weights to this many bits (mlx-lm affine quantization)")
    parser.add_argument("--q-group-size", type=int, help="quantization group size (default with --q-bits: 64)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.source, stage=args.stage, tag=args.tag, step=args.step)
        output = args.output or default_output_dir(checkpoint)
        summary = convert_checkpoint(
            checkpoint,
            output,
            dtype=args.dtype,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            overwrite=args.overwrite,
        )
    except NanochatCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
