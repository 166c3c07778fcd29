"""A vision-language policy: mlx-vlm's model behind the interface the rollout engine and the loss call.

    policy = load_vlm("models/qwen2-vl-2b-mlx")
    prompt = build_vlm_prompt(policy, "What colour is the square?", ["square.png"])   # a VlmPrompt
    logits = policy(token_ids[None])                   # text only: the language model
    logits = policy(vlm_batch)                         # a packed GRPO micro-batch with image features

A VlmPrompt is the prompt's token ids (a list, so the engine, packing and rewards treat it as any prompt)
carrying the processor's image inputs: the vision encoder runs once per prompt (utils/vlm/decode.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_grpo.vlm import VlmError, require_mlx_vlm

# Per-sequence state some mlx-vlm language models keep on themselves between prefill and decode (Qwen-VL's
# multimodal RoPE offsets): saved after each prompt's prefill and put back before its rows decode.
SEQUENCE_STATE = ("_rope_deltas", "_position_ids")


class VlmPrompt(list):
    """Prompt token ids (image placeholders expanded by the processor) with the processor's image inputs."""

    def __init__(self, tokens, vision: Optional[dict] = None, images: tuple = ()):
        super().__init__(tokens)
        self.vision = dict(vision or {})  # pixel_values, image_grid_thw, ...: what mlx-vlm's model takes
        self.images = tuple(images)  # the image paths, for logs


class VlmPolicy(nn.Module):
    """mlx-vlm's model as a policy. Its parameters are under `vlm.` (vlm.language_model..., vlm.vision_tower...)."""

    def __init__(self, vlm: nn.Module, processor, path: str):
        super().__init__()
        self.vlm = vlm
        self.processor = processor  # not a module or array: kept out of the parameter tree
        self.path = path
        from mlx_grpo.vlm.training import PromptFeatures

        self.train_vision = False  # vlm_train_vision: the loss forward runs the vision tower (utils/vlm/training.py)
        self.prompt_features = PromptFeatures()  # the last rollout's prompts, for the loss (utils/vlm/training.py)

    @property
    def layers(self):
        """The language model's blocks (what LoRA adapts and mlx-lm's caches are made for)."""
        return self.vlm.language_model.layers

    @property
    def quantization_root(self):
        """What QLoRA quantizes: the language model (the vision tower stays as it is)."""
        return self.vlm.language_model

    @property
    def language_model(self):
        return self.vlm.language_model

    @property
    def config(self):
        return self.vlm.config

    def embed_tokens(self, ids: mx.array) -> mx.array:
        model = getattr(self.vlm.language_model, "model", None)
        embed = getattr(model, "embed_tokens", None)
        if embed is None:
            raise VlmError(f"{type(self.vlm).__module__}: its language model has no model.embed_tokens; GRPO on "
                           "this VLM family is not supported yet (Qwen2-VL is tested)")
        return embed(ids)

    def __call__(self, inputs, cache=None):
        if isinstance(inputs, dict):  # a packed micro-batch with its image features (utils/vlm/training.py)
            from mlx_grpo.vlm.training import vlm_batch_logits

            return vlm_batch_logits(self, inputs)
        return self.vlm.language_model(inputs, cache=cache).logits

    def pack_micro_batches(self, prompts, completions, micro_batch_size, mask_truncated=False, pad_multiple=1):
        """The trainer's packing (utils/training/step.py) for this model: rows carry their image features."""
        from mlx_grpo.vlm.training import pack_vlm_micro_batches

        return pack_vlm_micro_batches(self, prompts, completions, micro_batch_size, mask_truncated,
                                      pad_multiple=pad_multiple)

    def load_weights(self, file_or_weights, strict: bool = True):
        """Weights by mlx-vlm's names (a folder's weight file as save_vlm_folder writes it, its shards
        included) or by this module's (`vlm.` first)."""
        if isinstance(file_or_weights, (str, Path)):
            file_or_weights = list(_read_vlm_weights(Path(file_or_weights)).items())
        named = [(k if k.startswith("vlm.") else f"vlm.{k}", v) for k, v in file_or_weights]
        return super().load_weights(named, strict=strict)

    def sequence_state(self) -> dict:
        return {name: getattr(self.language_model, name) for name in SEQUENCE_STATE
                if hasattr(self.language_model, name)}

    def set_sequence_state(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self.language_model, name, value)

    def rollout_decoder(self, prompts, group_size, prefilled=None):
        """The engine's decoder for this model (utils/generation/engine.py make_decoder)."""
        from mlx_grpo.vlm.decode import VlmDecoder

        if prefilled is not None:
            raise VlmError("a kept KV cache (chat cache reuse) is not supported for vision-language models")
        return VlmDecoder(self, prompts, group_size)


def _read_vlm_weights(file: Path) -> dict:
    """The weights of `file`, or of every shard its folder's index names (mlx-vlm shards large models)."""
    import json

    index = file.parent / "model.safetensors.index.json"
    files = [file]
    if index.is_file():
        files = [file.parent / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    weights = {}
    for shard in files:
        weights.update(mx.load(str(shard)))
    return weights


def load_vlm(path: str | Path, *, lazy: bool = False) -> VlmPolicy:
    """mlx-vlm's load (model and processor) as a VlmPolicy."""
    require_mlx_vlm()
    from mlx_vlm import load

    try:
        model, processor = load(str(path), lazy=lazy)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        raise VlmError(f"cannot load the vision-language model {str(path)!r} ({type(e).__name__}: {reason}); pass "
                       f"a folder converted with python utils/convert_model.py --vlm") from e
    return VlmPolicy(model, processor, str(path))


def save_vlm_folder(folder: str | Path, policy: VlmPolicy, source: str | Path) -> Path:
    """The policy's weights (mlx-vlm's names) with source's config, tokenizer and processor files: a folder
    load_vlm (and mlx-vlm's own load) reads back."""
    import shutil

    from mlx_grpo.training.checkpoint import _RESERVED_FILES

    not_model_files = set(_RESERVED_FILES)  # a checkpoint's own files, when source is a trainer checkpoint
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from mlx_vlm.utils import save_weights

    # mlx-vlm's writer: its index names the weight files, so a trainer checkpoint's optimizer.safetensors
    # beside them is not read as weights
    save_weights(folder, policy.vlm)
    for path in Path(source).expanduser().iterdir():
        if (path.is_file() and path.suffix in (".json", ".jinja", ".txt", ".model", ".py")
                and not path.name.startswith("model.safetensors") and path.name not in not_model_files):
            shutil.copy(path, folder / path.name)
    return folder


def vlm_tokenizer(policy: VlmPolicy):
    """The processor's tokenizer wrapped as mlx-lm's TokenizerWrapper (eos ids, streaming detokenizer)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = getattr(policy.processor, "tokenizer", policy.processor)
    eos = getattr(policy.config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return TokenizerWrapper(tokenizer, eos_token_ids=eos_ids or None)


def check_images(images) -> list[str]:
    paths = [str(image) for image in images]
    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise VlmError(f"image file not found: {', '.join(missing)}; pass existing image paths with --image PATH")
    return paths


def chat_messages(policy: VlmPolicy, text: str, images: list, system: Optional[str] = None,
                  history: Optional[list] = None) -> list:
    """The conversation, its first user turn holding the images as mlx-vlm lays them out for the family (so a
    one-turn prompt is the one mlx-vlm's generate builds, and the images stay in that turn as the chat goes on)."""
    from mlx_vlm.prompt_utils import get_message_json

    turns = list(history or []) + [{"role": "user", "content": text}]
    if images:
        turns[0] = get_message_json(policy.config.model_type, turns[0]["content"], role="user",
                                    num_images=len(images))
    return ([{"role": "system", "content": system}] if system else []) + turns


def build_vlm_prompt(policy: VlmPolicy, text: str, images=(), *, system: Optional[str] = None, raw: bool = False,
                     history: Optional[list] = None) -> VlmPrompt:
    """The prompt as mlx-vlm's generate builds it: its chat template for the family, then its processor
    (image placeholders expanded to the image's tokens, pixel values and grid sizes)."""
    require_mlx_vlm()
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    images = check_images(images)
    if raw:
        if system is not None:
            raise VlmError("--system needs the chat template; drop --raw or put the system text in the prompt")
        prompt_text = text
    else:
        messages = chat_messages(policy, text, images, system, history)
        prompt_text = apply_chat_template(policy.processor, policy.config, messages, num_images=len(images))
    inputs = prepare_inputs(policy.processor, images=images or None, prompts=prompt_text,
                            image_token_index=getattr(policy.config, "image_token_index", None),
                            add_special_tokens=should_add_special_tokens(policy.config.model_type, policy.processor))
    ids = inputs["input_ids"]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
    return VlmPrompt(ids[0].tolist(), vision, images)
