"""Load a policy model and its tokenizer, and write one back as a folder that loads the same way.

A folder with tokenizer.pkl is a converted nanochat model (see utils/nanochat/folder.py): mlx-lm's
nanochat model (October 2025) or the 2026 architecture's (utils/nanochat/model.py), strictly loaded,
with the tiktoken tokenizer wrapped for mlx-lm. Every other path or hub id goes through mlx_lm.load
unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.nn as nn

from mlx_grpo.nanochat.folder import load_nanochat_model, read_nanochat_meta, save_nanochat_folder
from mlx_grpo.nanochat.tokenizer import TOKENIZER_FILENAME, TiktokenTokenizerWrapper, nanochat_tokenizer
from mlx_grpo.vlm import is_vlm_source, read_config

ADAPTER_CONFIG_FILE = "adapter_config.json"  # marks a LoRA checkpoint / mlx-lm adapter folder


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to pass instead."""


def is_nanochat_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / TOKENIZER_FILENAME).is_file()


def is_adapter_folder(path: str | Path) -> bool:
    """A LoRA checkpoint or mlx-lm adapter folder (adapter_config.json, no model weights of its own)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG_FILE).is_file()


def load_model(path: str | Path, *, lazy: bool = False, return_config: bool = False):
    """(model, tokenizer), or (model, tokenizer, config) with return_config.

    The tokenizer is an mlx_lm TokenizerWrapper in both cases, so mlx_lm.generate and
    stream_generate work on either.
    """
    if is_adapter_folder(path):  # a LoRA checkpoint: adapters only
        raise ModelLoadError(f"{path} holds LoRA adapters, not a model: load it with mlx_grpo.training.lora.load_adapted_model "
                             f"(utils/inference.py does), or fuse it first: python utils/fuse.py --checkpoint "
                             f"{path} --output DIR")
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
