"""Batched decoding of vision-language prompts: each prompt's images through the vision encoder once, its
prefill once, its KV cache shared by the group_size rows that sample from it.

mlx-vlm's generate prefills one prompt (get_input_embeddings: image features merged into the token
embeddings, multimodal positions) and decodes it alone. VlmDecoder does the same prefill per prompt and
then decodes all rows of the step; it has the engine's decoder interface (step, filter, row_cache), so
rollouts, evaluation and utils/inference.py sample VLMs through generate_completions as text models.
Prompts differ in length and in their multimodal position offsets (kept on mlx-vlm's language model as
state), so the rows of one prompt form one batch of the decode step and the prompts' batches run one
after the other within the step.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_grpo.vlm import VlmError


def _cache_states(cache) -> list:
    states = []
    for layer in cache:
        state = layer.state
        if not (isinstance(state, tuple) and len(state) == 2 and all(isinstance(a, mx.array) for a in state)):
            raise VlmError(f"{type(layer).__name__}: a KV cache of another kind than keys and values; batched "
                           "decoding of this VLM family is not supported yet (Qwen2-VL is tested)")
        states.append(state)
    return states


def _select_rows(cache, rows: mx.array) -> None:
    """Keep (or repeat) batch rows of every layer's keys and values."""
    for layer, (keys, values) in zip(cache, _cache_states(cache)):
        layer.state = (keys[rows], values[rows])


def prompt_embeddings(policy, prompt):
    """As mlx-vlm's generate_step: the prompt's embeddings with its image features merged in ([T, D]; the
    vision encoder runs here) and the metadata the language model takes with them (multimodal positions)."""
    ids = mx.array(list(prompt))[None]
    vision = dict(getattr(prompt, "vision", {}))
    pixel_values = vision.pop("pixel_values", None)
    features = policy.vlm.get_input_embeddings(ids, pixel_values, mask=mx.ones(ids.shape, mx.int32), **vision)
    extra = {k: v for k, v in features.to_dict().items() if k != "inputs_embeds" and v is not None}
    embeds = features.inputs_embeds[0]
    mx.eval(embeds, extra)
    return embeds, extra


def prefill_prompt(policy, prompt):
    """prompt[:-1] (the image placeholders among it) through the model into a new one-row cache; the
    prompt's last token is the first decode step's input, as in the engine. Returns the cache and the
    language model's sequence state; the prompt's features are kept for the loss (policy.prompt_features)."""
    from mlx_vlm.models.cache import make_prompt_cache

    embeds, extra = policy.prompt_features.get(policy, prompt)
    cache = make_prompt_cache(policy.language_model)
    if len(prompt) > 1:  # the language model slices the whole prompt's positions at its cache offset
        ids = mx.array(list(prompt))[None]
        policy.language_model(ids[:, :-1], inputs_embeds=embeds[None, :-1], cache=cache, **extra)
        mx.eval([c.state for c in cache])
    return cache, policy.sequence_state()


class _PromptRows:
    """The rows decoding from one prompt: its cache (one row per sample) and its sequence state."""

    def __init__(self, policy, prompt, group_size):
        self.policy = policy
        self.cache, self.state = prefill_prompt(policy, prompt)
        self.size = group_size
        if len(prompt) > 1 and group_size > 1:
            _select_rows(self.cache, mx.zeros((group_size,), mx.int32))

    def step(self, tokens):
        self.policy.set_sequence_state(self.state)
        return self.policy.language_model(tokens[:, None], cache=self.cache).logits[:, -1, :]


class VlmDecoder:
    """step(tokens) -> next-token logits for every active row, rows grouped prompt by prompt."""

    def __init__(self, policy, prompts, group_size):
        policy.prompt_features.clear()  # this call's prompts' features replace the last call's
        self.groups = [_PromptRows(policy, prompt, group_size) for prompt in prompts]

    def step(self, tokens):
        logits, start = [], 0
        for group in self.groups:
            logits.append(group.step(tokens[start:start + group.size]))
            start += group.size
        return mx.concatenate(logits) if len(logits) > 1 else logits[0]

    def filter(self, keep):
        keep = np.array(keep).tolist()
        kept, start = [], 0
        for group in self.groups:
            rows = [k - start for k in keep if start <= k < start + group.size]
            start += group.size
            if rows:
                if len(rows) < group.size:
                    _select_rows(group.cache, mx.array(rows, dtype=mx.int32))
                    group.size = len(rows)
                kept.append(group)
        self.groups = kept

    def row_cache(self, row):
        raise VlmError("a kept KV cache (chat cache reuse) is not supported for vision-language models")
