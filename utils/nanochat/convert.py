"""Convert a nanochat checkpoint into an MLX folder, and the command line that does it (convert_nanochat.py).

Every architecture era nanochat has had converts (utils/nanochat/eras.py identifies it from the tensors
and meta). The October-2025 architecture (the released d20/d32 chat models) becomes mlx-lm's model_type
"nanochat"; the 2026 eras become model_type "nanochat_2026" (utils/nanochat/model.py), whose config.json
states every constant of the era. The checks refuse anything else (tensors of no known era, a missing,
unexpected or wrongly shaped tensor, a meta or tokenizer that does not fit), naming what is wrong, before
anything is written. `convert` is the one path both command lines take (convert_nanochat.py and
utils/convert_model.py's nanochat route): resolve the checkpoint, pick the output folder, convert.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlx_grpo.config import QUANT_BITS, QUANT_GROUP_SIZES
from mlx_grpo.nanochat import eras
from mlx_grpo.nanochat.checkpoint import (
    HUB_DEFAULT_REPO,
    STAGE_DIRS,
    NanochatCheckpoint,
    NanochatCheckpointError,
    checkpoint_name,
    list_names,
    read_meta,
    read_state_dict,
    resolve_checkpoint,
)
from mlx_grpo.nanochat.folder import build_model, save_nanochat_folder
from mlx_grpo.nanochat.tokenizer import load_tiktoken_encoding

# The weight dtypes a conversion can write (nanochat's and mlx_lm.convert's alike).
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DEFAULT_DTYPE = "bfloat16"
DEFAULT_Q_BITS = 4  # mlx-lm's defaults for affine quantization
DEFAULT_Q_GROUP_SIZE = 64

# nanochat's model_config keys (GPTConfig's fields): six in every era, window_pattern from fbc1484 (2026-01-11).
MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
OPTIONAL_MODEL_CONFIG_KEYS = ("window_pattern",)
ROPE_THETA = 10000.0  # the October-2025 architecture's RoPE base (mlx-lm's nanochat default)


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
    architecture: str = ""  # the era line (eras.Architecture.describe)

    def describe(self) -> str:
        quant = (
            f", {self.quantization['bits']}-bit quantized (group {self.quantization['group_size']})"
            if self.quantization
            else ""
        )
        return (
            f"Converted {self.source} step {self.step} -> {self.output_dir}: "
            f"depth {self.depth}, width {self.width}, {self.num_params:,} params, "
            f"{self.dtype}{quant}, {self.size_bytes / 1e6:.1f} MB on disk; {self.architecture}"
        )


# ---------------------------------------------------------------------------------------------
# Checks of the files, and the October-2025 architecture's mlx-lm config


def check_model_config(model_config: dict, source: str = "meta") -> dict:
    """The six size keys as ints (window_pattern, where present, is read by eras.identify); unknown keys
    (no nanochat era has them) and sizes that do not fit together are refused, naming `source`."""
    missing = [k for k in MODEL_CONFIG_KEYS if k not in model_config]
    unknown = sorted(set(model_config) - set(MODEL_CONFIG_KEYS) - set(OPTIONAL_MODEL_CONFIG_KEYS))
    if missing:
        raise NanochatCheckpointError(f"{source}: model_config lacks {', '.join(missing)}: not a nanochat checkpoint")
    if unknown:
        raise NanochatCheckpointError(
            f"{source}: model_config has keys of no known nanochat era ({', '.join(unknown)}; newer than nanochat "
            f"{eras.KNOWN_HEAD}?); only the eras in README's 'nanochat checkpoints that work' convert"
        )
    cfg = {k: int(model_config[k]) for k in MODEL_CONFIG_KEYS}
    n_embd, n_head, n_kv_head = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    if n_head <= 0 or n_kv_head <= 0 or n_embd % n_head or n_head % n_kv_head or (n_embd // n_head) % 2:
        raise NanochatCheckpointError(
            f"{source}: inconsistent model_config: n_embd {n_embd}, n_head {n_head}, n_kv_head {n_kv_head}; "
            f"n_head must divide n_embd into an even head_dim and n_kv_head must divide n_head: fix the meta's "
            f"model_config (it must be the one the run trained with)"
        )
    return cfg


def check_tokenizer(tokenizer_path: Path, vocab_size: int, meta_path) -> None:
    """The tokenizer must be the run's: nanochat's loader asserts its size is the model's vocab_size."""
    size = load_tiktoken_encoding(tokenizer_path).n_vocab
    if size != vocab_size:
        raise NanochatCheckpointError(
            f"{tokenizer_path} has {size:,} tokens but {meta_path} says vocab_size {vocab_size:,}: pass the "
            f"tokenizer.pkl of the run that trained this checkpoint"
        )


def check_state_dict_shapes(shapes: dict[str, tuple[int, ...]], model_config: dict, source: str = "checkpoint",
                            arch: eras.Architecture | None = None, meta: str = "its meta") -> None:
    """Refuse anything but exactly the tensors of the era (October 2025 when arch is None) with the shapes
    the model_config gives, naming the offenders."""
    arch = arch or eras.Architecture(eras.OCTOBER_2025, None, eras.OCTOBER_2025.softcap)
    expected = eras.expected_shapes(check_model_config(model_config), arch)
    unexpected = set(shapes) - set(expected)
    if unexpected:
        raise NanochatCheckpointError(f"{source} has unexpected tensors: {list_names(unexpected)}")
    missing = set(expected) - set(shapes)
    if missing:
        raise NanochatCheckpointError(f"{source} is missing tensors: {list_names(missing)}")
    wrong = [f"{k} {tuple(shapes[k])} != {expected[k]}" for k in expected if tuple(shapes[k]) != expected[k]]
    if wrong:
        raise NanochatCheckpointError(
            f"{source} has tensors of the wrong shape for the model_config of {meta}: {list_names(wrong, 4)}; "
            f"the model and meta files must be of the same step of one run"
        )


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


# ---------------------------------------------------------------------------------------------
# Conversion


def default_output_dir(name: str, q_bits: int | None = None) -> Path:
    """The output-folder rule of every conversion: models/<name>-mlx, with -<bits>bit when quantized."""
    suffix = f"-{q_bits}bit" if q_bits else ""
    return Path("models") / f"{Path(name.rstrip('/')).name}-mlx{suffix}"


def check_options(dtype: str, q_bits: int | None, q_group_size: int | None) -> int | None:
    """Refuse an unknown dtype or quantization; the group size to use (None when not quantizing)."""
    if dtype not in DTYPES:
        raise NanochatCheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if q_group_size is not None and q_bits is None:
        raise NanochatCheckpointError("--q-group-size needs --q-bits")
    if q_bits is None:
        return None
    q_group_size = q_group_size or DEFAULT_Q_GROUP_SIZE
    if q_bits not in QUANT_BITS or q_group_size not in QUANT_GROUP_SIZES:
        raise NanochatCheckpointError(
            f"unsupported quantization {q_bits} bits / group {q_group_size}; bits: "
            f"{', '.join(map(str, QUANT_BITS))}, group size: {', '.join(map(str, QUANT_GROUP_SIZES))}"
        )
    return q_group_size


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise NanochatCheckpointError(f"output {output_dir} is a file; pass a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise NanochatCheckpointError(f"output folder {output_dir} is not empty; remove it or pass --overwrite")


def torch_to_mx(tensor, dtype: mx.Dtype) -> mx.array:
    # numpy has no bfloat16: go through float32, which holds bf16/fp16 values exactly.
    array = mx.array(tensor.float().numpy()).astype(dtype)
    mx.eval(array)  # now, so the float32 copy is freed before the next tensor
    return array


def convert_checkpoint(
    checkpoint: NanochatCheckpoint,
    output_dir: str | Path,
    *,
    dtype: str = DEFAULT_DTYPE,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    overwrite: bool = False,
    softcap: float | None = None,
    window_pattern: str | None = None,
) -> ConversionSummary:
    """Convert one nanochat checkpoint of any known era into an MLX folder (optionally quantized with mlx-lm).

    softcap and window_pattern give the constants some checkpoints cannot show (eras.identify); left None,
    a documented default is used and a warning line naming the ambiguity goes to stderr.
    """
    q_group_size = check_options(dtype, q_bits, q_group_size)
    output_dir = Path(output_dir)
    _check_output(output_dir, overwrite)

    meta = read_meta(checkpoint.meta_path)
    model_config = check_model_config(meta["model_config"], str(checkpoint.meta_path))
    check_tokenizer(checkpoint.tokenizer_path, model_config["vocab_size"], checkpoint.meta_path)
    state = read_state_dict(checkpoint.model_path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    arch = eras.identify(shapes, meta["model_config"], model_path=checkpoint.model_path,
                         meta_path=checkpoint.meta_path, softcap=softcap, window_pattern=window_pattern)
    check_state_dict_shapes(shapes, model_config, str(checkpoint.model_path), arch, str(checkpoint.meta_path))
    for warning in arch.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    config = mlx_config(model_config) if arch.is_october_2025 else eras.model_config(model_config, arch)
    target = DTYPES[dtype]
    num_params = sum(v.numel() for v in state.values())
    source_dtypes = {name: str(v.dtype).removeprefix("torch.") for name, v in sorted(state.items())}  # for export
    model = build_model(config)
    weights = {name: torch_to_mx(state.pop(name), target) for name in sorted(state)}
    if hasattr(model, "sanitize"):  # nanochat's names to the 2026 model's
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
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
        "era": arch.era.commit,
        "warnings": list(arch.warnings),
        "dtypes": source_dtypes,
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
        architecture=arch.describe(),
    )


def convert(
    source: str | None,
    output_dir: str | Path | None = None,
    *,
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
    dtype: str = DEFAULT_DTYPE,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    overwrite: bool = False,
    softcap: float | None = None,
    window_pattern: str | None = None,
) -> ConversionSummary:
    """Resolve `source` (see resolve_checkpoint), choose the output folder (default_output_dir of the
    checkpoint's name when None) and convert. The options and a given output folder are checked
    before anything is downloaded."""
    check_options(dtype, q_bits, q_group_size)
    if window_pattern is not None:
        eras.check_window_pattern(window_pattern, "--window-pattern")
    if output_dir is not None:
        _check_output(Path(output_dir), overwrite)
    checkpoint = resolve_checkpoint(source, stage=stage, tag=tag, step=step)
    if output_dir is None:
        output_dir = default_output_dir(checkpoint_name(checkpoint), q_bits)
    return convert_checkpoint(checkpoint, output_dir, dtype=dtype, q_bits=q_bits, q_group_size=q_group_size,
                              overwrite=overwrite, softcap=softcap, window_pattern=window_pattern)


# ---------------------------------------------------------------------------------------------
# Command line (convert_nanochat.py)

USAGE = """Convert a nanochat checkpoint of any era (October 2025 to now) into an MLX folder for
mlx_grpo.models.load_model and mlx_lm.load. It prints the era it identified (README: nanochat checkpoints that work).

    python convert_nanochat.py                                   # karpathy/nanochat-d32 -> models/nanochat-d32-mlx
    python convert_nanochat.py path/to/ckpt_dir --output models/mine [--step N]
    python convert_nanochat.py ~/.cache/nanochat --stage sft --tag d20 --output models/d20-sft
    python convert_nanochat.py sdobson/nanochat --q-bits 4 --q-group-size 64   # -> models/nanochat-mlx-4bit
    python convert_nanochat.py --to-nanochat outputs/run1 --output ~/.cache/nanochat   # back: chatrl_checkpoints/d20/
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_nanochat.py", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source",
        nargs="?",
        help=f"folder with model_*.pt + meta_*.json, a nanochat base dir (with --stage), or a hub repo id "
        f"(default: {HUB_DEFAULT_REPO}; with --stage: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)",
    )
    parser.add_argument("--output", help="output folder (default: models/<name>-mlx, with -<bits>bit when quantized)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--stage", choices=list(STAGE_DIRS), help="read SOURCE as a nanochat base dir, this stage")
    parser.add_argument("--tag", help="model tag under the stage folder, e.g. d32 (needed when there are several)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=DEFAULT_DTYPE,
                        help=f"weight dtype (default: {DEFAULT_DTYPE})")
    parser.add_argument("--q-bits", type=int, choices=QUANT_BITS,
                        help="quantize the weights to this many bits (mlx-lm affine quantization)")
    parser.add_argument("--q-group-size", type=int, choices=QUANT_GROUP_SIZES,
                        help=f"quantization group size (default with --q-bits: {DEFAULT_Q_GROUP_SIZE})")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    parser.add_argument("--softcap", type=float,
                        help=f"the logit softcap of a value-embedding checkpoint from before 6ed7d1d, which the "
                             f"tensors do not show: 15 (e85db6b, 2026-01-16) or 20 (aba30cb, 2026-03-02 to 03-09) "
                             f"(default: {eras.DEFAULT_SOFTCAP:g}, with a warning)")
    parser.add_argument("--to-nanochat", metavar="CHECKPOINT",
                        help="the other direction: write CHECKPOINT (a converted folder, a trainer checkpoint, LoRA "
                             "ones fused first, or a run folder: its newest) into the nanochat base dir --output, "
                             "as <stage dir>/<tag>/model_{step:06d}.pt + meta and tokenizer/tokenizer.pkl "
                             "(utils/nanochat/export.py; --stage default rl, --tag default d<depth>, --step "
                             "default the trainer's step)")
    parser.add_argument("--window-pattern",
                        help=f"the base run's window pattern (S and L letters) when the meta does not record it "
                             f"(chat_sft before 8b4849d, 2026-02-01) (default: {eras.DEFAULT_WINDOW_PATTERN}, or "
                             f"full attention for the lambdas-only era, with a warning)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.to_nanochat:
        from mlx_grpo.nanochat.export import main as export_main

        return export_main(args)
    try:
        summary = convert(args.source, args.output, stage=args.stage, tag=args.tag, step=args.step, dtype=args.dtype,
                          q_bits=args.q_bits, q_group_size=args.q_group_size, overwrite=args.overwrite,
                          softcap=args.softcap, window_pattern=args.window_pattern)
    except NanochatCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
