"""Vision-language models through mlx-vlm: loading, prompts with images, batched generation, the GRPO forward.

mlx-vlm is an optional extra (`pip install -e ".[vlm]"`); every VLM path names that command in one line
when it is missing. Which models are VLMs is read from their config.json (a `vision_config`), so no
mlx-vlm import is needed to decide.
"""

from __future__ import annotations

import json
from pathlib import Path

INSTALL_HINT = 'pip install -e ".[vlm]" (or pip install mlx-vlm)'


class VlmError(ValueError):
    """A vision-language request that cannot be done as asked; the message says what to change."""


def require_mlx_vlm():
    """The mlx_vlm module, or a VlmError whose one line says how to install it."""
    try:
        import mlx_vlm
    except ImportError as e:
        raise VlmError(f"vision-language models need mlx-vlm, which is not installed: {INSTALL_HINT}") from e
    return mlx_vlm


def is_vlm_config(config: dict) -> bool:
    """A Hugging Face or mlx-vlm config.json of a vision-language model: it describes a vision tower."""
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def read_config(source: str | Path) -> dict | None:
    """config.json of a local folder, or of a hub repo already in the local Hugging Face cache; None if neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        try:
            cached = try_to_load_from_cache(str(source), "config.json")
        except ValueError:  # HFValidationError: not a repo id either (a missing local path)
            return None
        file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def is_vlm_source(source: str | Path) -> bool:
    config = read_config(source)
    return config is not None and is_vlm_config(config)


def check_vlm_config(cfg) -> None:
    """The settings GRPO on a vision-language policy does not support yet, each refused in one line."""
    from mlx_grpo.config import ConfigError

    if cfg.vlm_train_vision and (cfg.train_type != "full" or cfg.use_compile):
        raise ConfigError("vlm_train_vision = true trains the vision tower with the language model: it needs "
                          "train_type = \"full\" (adapter checkpoints hold no tower) and use_compile = false "
                          "(the tower's forward is not compiled)")
    if cfg.quantize_for_rollouts:
        raise ConfigError("quantize_for_rollouts: a vision-language policy samples its rollouts itself (no "
                          "quantized copy yet); set quantize_for_rollouts = false")
    if cfg.train_type == "full" and (cfg.beta > 0 or cfg.compute_dtype != "float32"):
        raise ConfigError("full training of a vision-language policy needs beta = 0 and compute_dtype = "
                          "\"float32\" (no frozen copy of it yet); or train adapters (train_type = \"lora\"), "
                          "whose base is the reference")
