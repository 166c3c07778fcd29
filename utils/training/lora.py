"""LoRA, DoRA and QLoRA for GRPO: mlx-lm's adapter layers on a frozen, optionally quantized base.

    model, tokenizer = load_model(cfg.model_name)
    adapters = add_adapters(model, cfg)       # QLoRA quantizes the base first; only the adapters train
    reference = base_policy(model)            # the same model with its adapters switched off: no copy
    copy = rollout_copy(model, 4, 64, dtype)  # adapters merged into a quantized copy (quantize_for_rollouts)
    save_adapters(folder, model, adapters)    # adapters.safetensors + adapter_config.json (mlx-lm's format)
    load_adapter_weights(model, folder)       # resume: the adapters back into the model add_adapters built
    model, tokenizer = load_adapted_model(checkpoint)   # the base named in adapter_config.json + adapters
    fuse_adapters(model)                      # merge in place (mlx-lm's fuse), then save like any model

The layers, the conversion and the fuse are mlx-lm's (mlx_lm.tuner); this module only decides
where they go, how a GRPO run uses them, and what a checkpoint holds. A checkpoint folder holds
the adapters only: the base stays referenced by its model_name ("model" in adapter_config.json).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.config import ConfigError
from mlx_grpo.models import ADAPTER_CONFIG_FILE, ModelLoadError, is_adapter_folder, load_model
from mlx_grpo.nanochat.mlx_lm_hook import MODEL_TYPE as NANOCHAT_2026
from mlx_grpo.training.update import frozen_copy

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_TRAIN_TYPES = ("lora", "dora")
# The trainable leaves of mlx-lm's adapter layers (DoRA's magnitude "m" too); mlx-lm's load_adapters uses the same.
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
# lora_keys = [] adapts these where a model type has them, else every linear of a block (mlx-lm's default).
# nanochat 2026: the six block matrices, as on the October-2025 model; its value embeddings, their
# (n_kv_head x 12) gates, the smear gate and the lambdas stay frozen with the base (a rank-8 update of a
# 12-wide gate is not low-rank, and a LoRA checkpoint holds adapters only).
DEFAULT_LORA_KEYS = {NANOCHAT_2026: ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def _adapter_types():
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, DoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRAEmbedding)


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA/DoRA layer in the model."""
    types = _adapter_types()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_modules(model))


def is_quantized(model: nn.Module) -> bool:
    return any(v.dtype == mx.uint32 for _, v in tree_flatten(model.parameters()))


def trainable_summary(model: nn.Module) -> str:
    from mlx_lm.utils import get_total_parameters  # counts a quantized weight by its unpacked size

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    with adapters_disabled(model):
        base = get_total_parameters(model)
    return f"{trainable:,} trainable adapter parameters on a frozen base of {base:,} ({100 * trainable / base:.3f}%)"


# ---------------------------------------------------------------------------------------------
# Adding adapters for a run


def default_lora_keys(model: nn.Module) -> tuple[str, ...]:
    """The layers lora_keys = [] adapts in this model ((): mlx-lm's default, every linear of a block)."""
    return DEFAULT_LORA_KEYS.get(getattr(model, "model_type", None), ())


def adapter_config_for(cfg, num_blocks: int, default_keys: tuple[str, ...] = ()) -> dict:
    """adapter_config.json content (mlx-lm's keys, plus the base and its quantization) for a run config.

    The keys are recorded whenever they are not mlx-lm's default, so mlx-lm's load_adapters rebuilds
    the same adapter layers."""
    lora_parameters = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
    if keys := cfg.lora_keys or default_keys:
        lora_parameters["keys"] = list(keys)
    base_quantization = None
    if cfg.base_quant_bits:
        base_quantization = {"bits": cfg.base_quant_bits, "group_size": cfg.base_quant_group_size}
    return {
        "model": cfg.model_name,
        "fine_tune_type": cfg.train_type,
        "num_layers": num_blocks if cfg.lora_layers == -1 else cfg.lora_layers,
        "lora_parameters": lora_parameters,
        "base_quantization": base_quantization,
    }


def _check_keys(model: nn.Module, num_layers: int, keys: list[str]) -> None:
    """linear_to_lora_layers skips names it does not find: an unknown key must be an error instead."""
    in_blocks = {name for block in model.layers[-num_layers:] for name, _ in block.named_modules()}
    at_top = {name for name, _ in model.named_modules()}
    unknown = [k for k in keys if k not in in_blocks and k not in at_top]
    if unknown:
        linears = sorted({name for name, m in model.layers[-1].named_modules()
                          if isinstance(m, (nn.Linear, nn.QuantizedLinear))})
        raise ConfigError(f"lora_keys {unknown} name no layer of the model; names are relative to a block, "
                          f"e.g. {linears}")


def _quantize_base(model: nn.Module, bits: int, group_size: int, config: dict | None = None) -> dict:
    from mlx_lm.utils import quantize_model

    if is_quantized(model):
        raise ConfigError("the model is already quantized; set base_quant_bits = 0 to train adapters on it as it is")
    # mlx-lm prints a bits-per-weight line; stdout stays for answers (utils/inference.py --prompt).
    with contextlib.redirect_stdout(sys.stderr):
        _, config = quantize_model(model, dict(config or {}), group_size=group_size, bits=bits)
    return config


def _convert(model: nn.Module, adapter_config: dict) -> None:
    """Swap the chosen layers for mlx-lm's LoRA/DoRA layers (frozen base inside, adapters trainable)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_blocks = len(model.layers)
    num_layers = adapter_config["num_layers"]
    if not 1 <= num_layers <= num_blocks:
        raise ConfigError(f"lora_layers = {num_layers} but the model has {num_blocks} blocks; "
                          f"use 1..{num_blocks}, or -1 for all")
    params = adapter_config["lora_parameters"]
    keys = params.get("keys")
    if keys:
        _check_keys(model, num_layers, keys)
    use_dora = adapter_config["fine_tune_type"] == "dora"
    if use_dora:
        # mlx-lm's DoRALinear sizes a quantized base with 32 // bits, right only when bits divides 32.
        bad = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear) and 32 % m.bits}
        if bad:
            raise ConfigError(f"DoRA on a {sorted(bad)}-bit base is not supported by mlx-lm's DoRALinear; "
                              "use base_quant_bits 2, 4 or 8, or train_type = \"lora\"")
    try:
        linear_to_lora_layers(model, num_layers, {**params, "keys": keys or None}, use_dora=use_dora)
    except ValueError as e:  # a key naming a layer that is not a linear/embedding
        raise ConfigError(f"lora_keys: {e}; name linear layers (e.g. attn.c_q)") from e
    if not has_adapters(model):
        raise ConfigError("no layer was given an adapter: check lora_keys and lora_layers")


def add_adapters(model: nn.Module, cfg) -> dict:
    """Make `model` a LoRA/DoRA policy for cfg.train_type; return its adapter config (for save_adapters).

    QLoRA: base_quant_bits > 0 quantizes the base first (mlx-lm's quantizer). The frozen base is
    cast to cfg.compute_dtype (quantized weights stay as they are); the adapters are float32 and are
    the only trainable parameters, so gradients and optimizer state cover only them.
    """
    if cfg.train_type not in ADAPTER_TRAIN_TYPES:
        raise ConfigError(f"add_adapters needs train_type lora or dora, got {cfg.train_type!r}")
    adapter_config = adapter_config_for(cfg, len(model.layers), default_lora_keys(model))
    model.set_dtype(getattr(mx, cfg.compute_dtype))
    if cfg.base_quant_bits:
        # a vision-language policy quantizes its language model only
        _quantize_base(getattr(model, "quantization_root", model), cfg.base_quant_bits, cfg.base_quant_group_size)
    model.freeze()
    _convert(model, adapter_config)  # new adapter layers are created unfrozen, in float32
    model.eval()  # dropout acts only where the trainer switches to train mode (the loss forward)
    mx.eval(model.parameters())
    return adapter_config


# ---------------------------------------------------------------------------------------------
# The base and merged views used during a run


def _swap(model: nn.Module, pairs: list[tuple[str, nn.Module]]) -> None:
    if pairs:
        model.update_modules(tree_unflatten(pairs))


def _base_layer(layer: nn.Module) -> nn.Module:
    return layer.linear if "linear" in layer else layer.embedding


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, the model is its frozen base: every adapter layer is swapped for the layer it wraps."""
    adapters = adapter_modules(model)
    _swap(model, [(name, _base_layer(layer)) for name, layer in adapters])
    try:
        yield model
    finally:
        _swap(model, adapters)


class BasePolicy:
    """The reference policy of a LoRA run: the policy with its adapters switched off (no second copy).

    Calls return the lazy graph built while the adapters were off, so evaluating it later is safe.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, inputs, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(inputs, *args, **kwargs)


def base_policy(model: nn.Module) -> BasePolicy:
    return BasePolicy(model)


@contextlib.contextmanager
def adapters_merged(model: nn.Module):
    """Inside, the model is dense and adapter-free: adapters fused into their (dequantized) base layers."""
    from mlx_lm.utils import dequantize_model

    adapters = adapter_modules(model)
    prefixes = tuple(name + "." for name, _ in adapters)
    quantized = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not name.startswith(prefixes)]
    _swap(model, [(name, layer.fuse(dequantize=True)) for name, layer in adapters])
    try:
        dequantize_model(model)
        yield model
    finally:
        _swap(model, adapters + quantized)


def rollout_copy(model: nn.Module, quant_bits, quant_group_size: int = 64, dtype=None) -> nn.Module:
    """A frozen (quantized) copy of the current policy; with adapters, of the policy they make (merged)."""
    if not has_adapters(model):
        return frozen_copy(model, quant_bits, quant_group_size, dtype)
    with adapters_merged(model):
        return frozen_copy(model, quant_bits, quant_group_size, dtype)


def eval_policy(model: nn.Module, dtype, merge_adapters: bool = True) -> nn.Module:
    """What evaluation decodes: the model itself, or with adapters (not a VLM's) and merge_adapters a merged
    `dtype` copy, as the rollouts do, since the fast decoders take no adapter layers."""
    if merge_adapters and has_adapters(model) and not hasattr(model, "rollout_decoder"):
        return rollout_copy(model, None, dtype=dtype)
    return model


# ---------------------------------------------------------------------------------------------
# Saving and loading adapters


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter leaves (lora_a, lora_b, DoRA's m) of every adapter layer, by parameter name."""
    layers = {name for name, _ in adapter_modules(model)}
    return {k: v for k, v in tree_flatten(model.parameters())
            if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES and k.rsplit(".", 1)[0] in layers}


def save_adapters(folder: str | Path, model: nn.Module, adapter_config: dict) -> Path:
    """Write folder/adapters.safetensors (the trainable adapter weights) and folder/adapter_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    mx.save_safetensors(str(folder / ADAPTER_FILE), weights, metadata={"format": "mlx"})
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found: pass a LoRA checkpoint folder (adapters.safetensors + "
                             f"{ADAPTER_CONFIG_FILE})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
    if config.get("fine_tune_type", "lora") not in ADAPTER_TRAIN_TYPES:
        raise ModelLoadError(f"{path}: fine_tune_type {config.get('fine_tune_type')!r} is not lora or dora")
    return config


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json's "model")."""
    base = read_adapter_config(folder).get("model")
    if not base:
        raise ModelLoadError(f"{Path(folder) / ADAPTER_CONFIG_FILE} does not name its base model; "
                             "pass the base with --model and the adapters with --adapter-path")
    return base


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Load folder/adapters.safetensors into a model whose adapters add_adapters built (resume); strict."""
    from mlx_grpo.training.checkpoint import CheckpointError

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: this checkpoint holds no adapters (was the run "
                              "train_type = \"full\"? resume with the same train_type)")
    weights = mx.load(str(path))
    _check_adapter_weights(model, weights, path, CheckpointError)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def _check_adapter_weights(model, weights: dict, path, error) -> None:
    want = adapter_weights(model)
    extra, missing = sorted(set(weights) - set(want)), sorted(set(want) - set(weights))
    if extra or missing:
        raise error(f"{path} does not match the model's adapters (only in the file: {extra[:3]}, only in the "
                    f"model: {missing[:3]}): use the same train_type, lora_rank, lora_layers and lora_keys")
    wrong = [f"{k} {weights[k].shape} != {want[k].shape}" for k in want if weights[k].shape != want[k].shape]
    if wrong:
        raise error(f"{path}: adapter shapes do not match the model ({wrong[:2]}): use the same lora_rank")


def load_adapted_model(model: str | Path, adapter_path: str | Path | None = None, *, return_config: bool = False):
    """(model, tokenizer[, config]): a base model with trained adapters applied (not fused).

    `model` may be a LoRA checkpoint folder (recognised by its adapter_config.json): its base is the
    recorded model_name. With adapter_path, `model` is the base and adapter_path the adapters.
    Anything else loads as a plain model. A base quantized for QLoRA is quantized the same way here.
    config is the base's config.json content (with "quantization" for a quantized base).
    """
    from mlx_lm.tuner.utils import load_adapters

    if adapter_path is None and is_adapter_folder(model):
        adapter_path, model = model, adapter_base(model)
    elif adapter_path is not None and is_adapter_folder(model):
        raise ModelLoadError(f"{model} is itself an adapter folder; pass the base model with --model")
    base, tokenizer, config = load_model(model, return_config=True)
    if adapter_path is not None:
        adapter_config = read_adapter_config(adapter_path)
        if not (Path(adapter_path) / ADAPTER_FILE).is_file():
            raise ModelLoadError(f"{adapter_path} has {ADAPTER_CONFIG_FILE} but no {ADAPTER_FILE}")
        if quant := adapter_config.get("base_quantization"):
            config = _quantize_base(getattr(base, "quantization_root", base), quant["bits"], quant["group_size"],
                                    config)
        try:
            load_adapters(base, str(adapter_path))
        except ValueError as e:  # mlx-lm names the tensors that do not fit
            raise ModelLoadError(f"adapters in {adapter_path} do not fit the base {model}: "
                                 f"{' '.join(str(e).split())}") from e
        weights = mx.load(str(Path(adapter_path) / ADAPTER_FILE))
        _check_adapter_weights(base, weights, Path(adapter_path) / ADAPTER_FILE, ModelLoadError)
        base.eval()
    return (base, tokenizer, config) if return_config else (base, tokenizer)


# ---------------------------------------------------------------------------------------------
# Fusing


def fuse_adapters(model: nn.Module, config: dict, *, dequantize: bool = True) -> dict:
    """Merge the adapters into their base layers in place (mlx-lm's fuse); return the model's new config.

    dequantize (default): a quantized base becomes dense, so the fused model reproduces the adapted
    one exactly; False keeps the base's quantization (the merged weights are re-quantized: close,
    not exact).
    """
    from mlx_lm.utils import dequantize_model

    fused = [(name, layer.fuse(dequantize=dequantize)) for name, layer in adapter_modules(model)]
    if not fused:
        raise ModelLoadError("the model has no adapters to fuse")
    _swap(model, fused)
    config = dict(config)
    if dequantize:
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    mx.eval(model.parameters())
    return config
