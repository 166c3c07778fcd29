"""GRPO on vision-language models: micro-batches that carry each prompt's image features, and their forward.

The loss forward of a row (prompt + completion) is the language model on the prompt's embeddings with the
image features merged in, at the prompt's multimodal positions, followed by the completion's token
embeddings at the positions decoding gave them. The features come from the rollout's prefill (the vision
encoder ran once per prompt, utils/vlm/decode.py); with the vision tower frozen they are constants of the
step. Positions that are not image features embed their tokens inside the forward, so full training
trains the token embeddings too.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_grpo.training.update import PackedBatch, pack_micro_batches
from mlx_grpo.vlm import VlmError


class PromptFeatures:
    """Each prompt's merged embeddings and multimodal metadata from its last prefill, keyed by id(prompt).

    A plain object (not a dict) so that mlx's Module does not take it for parameters."""

    def __init__(self):
        self.by_prompt = {}

    def put(self, prompt, embeds, extra):
        self.by_prompt[id(prompt)] = (prompt, embeds, extra)

    def get(self, policy, prompt):
        held = self.by_prompt.get(id(prompt))
        if held is not None and held[0] is prompt:
            return held[1], held[2]
        from mlx_grpo.vlm.decode import prompt_embeddings

        embeds, extra = prompt_embeddings(policy, prompt)
        self.put(prompt, embeds, extra)
        return embeds, extra

    def clear(self):
        self.by_prompt = {}


def image_token_id(config):
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _row_positions(extra: dict, prompt_len: int, width: int):
    """The row's positions: the prompt's (multimodal: [3, T]) then the completion's, each + 1 from the
    prompt's last, shifted by the prompt's rope delta as decoding shifts them. None: the model's default."""
    positions = extra.get("position_ids")
    if positions is None:
        return None
    delta = extra.get("rope_deltas")
    delta = mx.array(0) if delta is None else delta.reshape(-1)[0]
    after = mx.arange(prompt_len, width) + delta
    if positions.ndim == 3:  # [3, 1, T]: temporal, height, width sections
        prompt_part = positions[:, 0, :prompt_len]
        return mx.concatenate([prompt_part, mx.broadcast_to(after[None], (positions.shape[0], after.size))], axis=1)
    if positions.ndim == 2:  # [1, T]
        return mx.concatenate([positions[0, :prompt_len], after])
    raise VlmError(f"position ids of shape {positions.shape}: not a layout this trainer knows")


def vlm_batch(policy, batch: PackedBatch, prompts: list) -> PackedBatch:
    """A packed text micro-batch (rows: prompt + completion, right-padded) with the image features of each
    row's prompt; prompts[r] is row r's VlmPrompt. With policy.train_vision the batch carries each distinct
    prompt's processor inputs instead, and the forward runs the vision tower (once per prompt)."""
    inputs = batch.inputs
    rows, width = inputs.shape
    image_id = image_token_id(policy.config)
    embeds, use, positions = [], [], []
    for r, prompt in enumerate(prompts):
        features, extra = policy.prompt_features.get(policy, prompt)
        length = len(prompt)
        pad = mx.zeros((width - length, features.shape[-1]), features.dtype)
        embeds.append(mx.concatenate([features, pad]))
        ids = mx.array(list(prompt))
        from_features = ids == image_id if image_id is not None else mx.ones((length,), mx.bool_)
        use.append(mx.concatenate([from_features, mx.zeros((width - length,), mx.bool_)]))
        positions.append(_row_positions(extra, length, width))
    model_inputs = {"ids": inputs, "use_embeds": mx.stack(use)[..., None]}
    if policy.train_vision:
        distinct = list({id(p): p for p in prompts}.values())
        model_inputs["vision"] = [{"ids": mx.array(list(p))[None], **p.vision} for p in distinct]
        model_inputs["row_prompt"] = mx.array([[id(q) for q in distinct].index(id(p)) for p in prompts])
    else:
        model_inputs["embeds"] = mx.stack(embeds)
    if positions[0] is not None:
        model_inputs["position_ids"] = mx.stack(positions, axis=-2)  # [3, B, W] or [B, W]
    return PackedBatch(model_inputs, batch.targets, batch.mask)


def _live_prompt_embeds(policy, inputs: dict, width: int) -> mx.array:
    """[B, W, D]: each row's prompt embeddings, the vision tower run inside the forward (vlm_train_vision)."""
    per_prompt = []
    for vision in inputs["vision"]:
        vision = dict(vision)
        ids, pixel_values = vision.pop("ids"), vision.pop("pixel_values", None)
        embeds = policy.vlm.get_input_embeddings(ids, pixel_values, mask=mx.ones(ids.shape, mx.int32), **vision)
        prompt = embeds.inputs_embeds[0]
        per_prompt.append(mx.concatenate([prompt, mx.zeros((width - prompt.shape[0], prompt.shape[1]), prompt.dtype)]))
    return mx.stack(per_prompt)[inputs["row_prompt"]]


def pack_vlm_micro_batches(policy, prompts, completions, micro_batch_size, mask_truncated=False, pad_id=0,
                           pad_multiple=1):
    """pack_micro_batches, each micro-batch carrying its rows' image features (see vlm_batch)."""
    slices, batches = pack_micro_batches(prompts, completions, micro_batch_size, mask_truncated, pad_id=pad_id,
                                         pad_multiple=pad_multiple)
    row_prompts = [prompts[c.prompt_index] for c in completions]
    return slices, [vlm_batch(policy, batch, row_prompts[rows]) for rows, batch in zip(slices, batches)]


def vlm_batch_logits(policy, inputs: dict) -> mx.array:
    """Logits of a vlm_batch's rows: token embeddings, the prompt's image features where they belong."""
    ids = inputs["ids"]
    token_embeds = policy.embed_tokens(ids)
    prompt_embeds = inputs["embeds"] if "embeds" in inputs else _live_prompt_embeds(policy, inputs, ids.shape[1])
    embeds = mx.where(inputs["use_embeds"], prompt_embeds.astype(token_embeds.dtype), token_embeds)
    kwargs = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
    return policy.language_model(ids, inputs_embeds=embeds, **kwargs).logits


def prepare_vlm_policy(policy, cfg) -> None:
    """Full training trains the language model; the vision tower stays frozen (its features constants of each
    step) unless vlm_train_vision. Adapters (LoRA/DoRA) freeze the whole base, the tower with it."""
    policy.train_vision = bool(cfg.vlm_train_vision)
    tower = getattr(policy.vlm, "vision_tower", None)
    if cfg.train_type == "full" and tower is not None and not policy.train_vision:
        tower.freeze()
