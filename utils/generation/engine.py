"""The one generation engine: rollouts, evaluation and utils/inference.py all sample through generate_completions.

Every prompt x group_size is decoded in one batch, with nanochat's calculator (forced tool-output
tokens), mlx-lm's logits processors (they need each row's token history), a per-token callback for
streaming, and a KV cache kept across calls for a chat. mlx-lm's BatchGenerator cannot force tokens
into a row mid-generation, so the decode loop is written here: on mlx-lm's model and KV caches for any
model, or on a faster decode step: utils/nanochat/decoder.py's for nanochat models, utils/generation/llama_decoder.py's
for Llama and Qwen ones.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import common_prefix_len

from mlx_grpo.generation import llama_decoder
from mlx_grpo.nanochat import decoder as nanochat_decode


@dataclass
class Completion:
    """One sampled completion. `tokens` are the ids exactly as generated (never re-tokenized)."""

    prompt_index: int
    tokens: list = field(default_factory=list)
    sampled: list = field(default_factory=list)  # 1: sampled by the policy, 0: forced tool output
    stopped: bool = False  # ended on a stop token (the last token); otherwise truncated at the length limit
    calls: list = field(default_factory=list)  # ToolCall, in order

    @property
    def truncated(self) -> bool:
        return not self.stopped

    @property
    def content_tokens(self) -> list:
        """The tokens without the stop token that ended the completion: what its text is."""
        return self.tokens[:-1] if self.stopped else self.tokens

    @property
    def tool_calls(self) -> int:
        return len(self.calls)

    @property
    def tool_failures(self) -> int:
        return sum(call.result is None for call in self.calls)


@dataclass
class RolloutStats:
    generated_tokens: int  # tokens appended to completions (sampled + forced)
    seconds: float
    prefill_seconds: float = 0.0  # of `seconds`: prompts through the model, caches built
    prompt_tokens: int = 0  # prompt tokens put through the model (each prompt once; a kept cache's part not)

    @property
    def tokens_per_sec(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


class ReusableCache:
    """One conversation's mlx-lm KV cache and the tokens it holds, kept across generate_completions calls, so
    that a prompt extending them (a chat's next turn) is prefilled only from where it differs."""

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self.tokens = []

    def prepare(self, prompt: list) -> int:
        """Cut the cache back to its longest prefix shared with `prompt`, leaving at least the prompt's last
        token to feed; return how many tokens of `prompt` it holds."""
        keep = min(common_prefix_len(self.tokens, prompt), len(prompt) - 1)
        if keep < len(self.tokens):
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(self.tokens) - keep)
            else:  # e.g. a recurrent state: it cannot step back, so start over
                self.reset()
                keep = 0
        self.tokens = list(prompt[:keep])
        return keep

    def keep(self, cache: list, sequence: list, held: int) -> None:
        """After a call: `cache` holds the first `held` tokens of `sequence` (prompt + completion)."""
        self.cache, self.tokens = cache, list(sequence[:held])


class _Rows:
    """Per-completion bookkeeping of the decode loop: forced tokens, stops, tool calls, token histories."""

    def __init__(self, completions, prompts, stop_token_ids, calculator, logits_processors, on_token):
        self.completions = completions
        self.prompts = prompts
        self.stop_token_ids = stop_token_ids
        self.readers = [calculator.reader() if calculator is not None else None for _ in completions]
        self.logits_processors = logits_processors or []
        self.on_token = on_token
        self.forced = [deque() for _ in completions]
        self.generated = 0

    def forced_next(self, index):
        """The token forced at this row's next position, or None when the model samples it."""
        queue = self.forced[index]
        return queue[0] if queue else None

    def record(self, index, sampled_token):
        """Append this step's token (forced if due, else sampled). Row must not be stopped."""
        c = self.completions[index]
        if self.forced[index]:
            token, was_sampled = self.forced[index].popleft(), 0
        else:
            token, was_sampled = sampled_token, 1
        c.tokens.append(token)
        c.sampled.append(was_sampled)
        self.generated += 1
        if was_sampled and token in self.stop_token_ids:
            c.stopped = True
        elif self.readers[index] is not None:
            closed = self.readers[index].feed(token)
            if closed is not None:
                call, forced = closed
                c.calls.append(call)
                self.forced[index].extend(forced)
        if self.on_token is not None:
            self.on_token(c)

    def process_logits(self, logits, active, fed):
        """mlx-lm's logits processors, row by row, each on its row's history: the prompt, the tokens read back
        so far and `fed`, this step's inputs (still on the device; None at the first step, fed from the prompt)."""
        rows = []
        for row, index in enumerate(active):
            c = self.completions[index]
            history = mx.array(self.prompts[c.prompt_index] + c.tokens, dtype=mx.int32)
            if fed is not None:
                history = mx.concatenate([history, fed[row:row + 1]])
            row_logits = logits[row:row + 1]
            for processor in self.logits_processors:
                row_logits = processor(history, row_logits)
            rows.append(row_logits)
        return mx.concatenate(rows)


def _prefill_prompt(model, tokens, cache):
    """`tokens` through the model into `cache` (a single-sequence mlx-lm prompt cache)."""
    if tokens:
        model(mx.array(tokens)[None], cache=cache)
        mx.eval([c.state for c in cache])


class MlxLmDecoder:
    """Any mlx-lm model on its own batch KV cache: `step(tokens)` -> next-token logits.

    `prefilled`: for each prompt, an mlx-lm prompt cache that already holds all of it but its last token
    (a chat's kept cache); without it each prompt is prefilled here.
    """

    def __init__(self, model, prompts, group_size, prefilled=None):
        self.model = model
        if prefilled is None:
            prefilled = []
            for prompt in prompts:  # each prompt once, all but its last token; its group shares the cache
                prefilled.append(make_prompt_cache(model))
                _prefill_prompt(model, prompt[:-1], prefilled[-1])
        rows = [prefilled[i] for i in range(len(prompts)) for _ in range(group_size)]
        # mlx-lm's cache classes know how to merge single-sequence caches into a left-padded batch one
        self.cache = [rows[0][layer].merge([row[layer] for row in rows]) for layer in range(len(rows[0]))]

    def step(self, tokens):
        return self.model(tokens[:, None], cache=self.cache)[:, -1, :]

    def filter(self, keep):
        for layer_cache in self.cache:
            layer_cache.filter(keep)

    def row_cache(self, row):
        """Batch row `row`'s cache as a single-sequence mlx-lm prompt cache."""
        return [layer_cache.extract(row) for layer_cache in self.cache]


def make_decoder(model, prompts, group_size, max_new_tokens, fast_decode=True, prefilled=None, prefill_align=None,
                 kv_buffers=None):
    """A model's own decoder (a vision-language policy, utils/vlm/), a fast decoder where one applies (nanochat;
    llama, qwen2, qwen3; no adapters), else mlx-lm's model call. prefill_align: the fast decoders' prompt
    batches are prefilled in lengths of a multiple of it (None: nanochat_decode.PREFILL_ALIGN); kv_buffers: their
    per-row layout's KV buffers per layer (None: nanochat_decode.ALTERNATE_BUFFERS)."""
    if hasattr(model, "rollout_decoder"):  # first: a VLM must not reach the text-only fast decoders
        return model.rollout_decoder(prompts, group_size, prefilled)
    align = prefill_align or nanochat_decode.PREFILL_ALIGN
    if fast_decode and nanochat_decode.supports(model):
        return nanochat_decode.NanochatDecoder(model, prompts, group_size, max_new_tokens, prefilled=prefilled,
                                               alternate_buffers=kv_buffers, prefill_align=align)
    if fast_decode and llama_decoder.supports(model):
        return llama_decoder.LlamaDecoder(model, prompts, group_size, max_new_tokens, prefilled=prefilled,
                                          alternate_buffers=kv_buffers, prefill_align=align)
    return MlxLmDecoder(model, prompts, group_size, prefilled)


# Memory the rollout may claim without evicting, as a fraction of MLX's memory limit (BENCHMARKS.md
# measures d20's rollout at nanochat's RL shape). Too little or too much only costs time: cached
# buffers freed one by one, or allocated afresh.
ROLLOUT_HEADROOM = 0.15


def trim_buffer_cache(headroom_bytes):
    """Shrink MLX's buffer cache so that `headroom_bytes` more fit under the memory limit (and, on Metal,
    under the recommended working set) without evicting; the rest of the cache stays for reuse.

    A GRPO update leaves tens of GB of freed buffers in the cache. Emptying it makes the rollout allocate
    its KV caches afresh, which is slower than reusing cached buffers (BENCHMARKS.md); keeping all of it
    makes allocations at the limit free cached buffers one at a time, each waiting for the device.
    """
    ceiling = mx.get_memory_limit()
    working_set = mx.device_info().get("max_recommended_working_set_size")  # Metal only
    if working_set:
        ceiling = min(ceiling, working_set)
    budget = max(0, int(ceiling - mx.get_active_memory() - headroom_bytes))
    if mx.get_cache_memory() <= budget:
        return
    previous = mx.set_cache_limit(budget)
    mx.eval(mx.zeros((1 << 14,)))  # MLX trims the cache to its limit at the next allocation (this 64 KB one)
    mx.set_cache_limit(previous)


def generate_completions(
    model,
    prompts,
    *,
    group_size,
    max_new_tokens,
    sampler,
    stop_token_ids,
    calculator=None,
    compact_fraction=0.25,
    fast_decode=True,
    logits_processors=None,
    on_token: Optional[Callable[[Completion], None]] = None,
    cache: Optional[ReusableCache] = None,
    prefill_align: Optional[int] = None,
    headroom: Optional[float] = None,
    kv_buffers: Optional[int] = None,
):
    """Sample `group_size` completions for every prompt (token id lists), all in one batch.

    Returns (completions ordered prompt by prompt, group contiguous; RolloutStats).
    Every row samples its own first token from the shared prefix. `sampler` maps (rows, vocab)
    logits to token ids (mlx_grpo.generation.sampling.make_rollout_sampler); `calculator` a
    CalculatorTool or None; fast_decode=False forces mlx-lm's model call.
    - logits_processors: mlx-lm's (tokens, logits) -> logits functions (make_logits_processors), given
      each row's whole history, prompt included;
    - on_token(completion): called after each token is appended to a completion (stop and forced tokens
      too), as soon as the host has it;
    - cache: a ReusableCache for one prompt and group_size 1 (a chat): only the part of the prompt it does
      not hold is prefilled, and afterwards it holds the prompt and the completion. An exception while
      generating (Ctrl-C) resets it.
    - prefill_align, headroom, kv_buffers: the run's prefill_align, rollout_headroom and rollout_kv_buffers (None:
      the defaults: CUDA's measured prefill_align and headroom, the decoders' two KV buffers).
    """
    start = time.perf_counter()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_completions: got an empty prompt; every prompt needs at least one token")
    if cache is not None and (len(prompts) != 1 or group_size != 1):
        raise ValueError("generate_completions: a ReusableCache holds one conversation; pass one prompt and "
                         "group_size=1 with it")
    completions = [Completion(prompt_index=i) for i in range(len(prompts)) for _ in range(group_size)]
    rows = _Rows(completions, prompts, set(stop_token_ids), calculator, logits_processors, on_token)
    trim_buffer_cache((ROLLOUT_HEADROOM if headroom is None else headroom) * mx.get_memory_limit())
    try:
        prefilled, prompt_tokens = None, sum(len(p) for p in prompts)
        if cache is not None:
            held = cache.prepare(prompts[0])
            _prefill_prompt(model, prompts[0][held:-1], cache.cache)
            prefilled, prompt_tokens = [cache.cache], len(prompts[0]) - held
        decoder = make_decoder(model, prompts, group_size, max_new_tokens, fast_decode, prefilled, prefill_align,
                               kv_buffers)
        prefill_end = time.perf_counter()
        first_inputs = [prompts[c.prompt_index][-1] for c in completions]
        steps = _decode(decoder, first_inputs, rows, max_new_tokens, sampler, compact_fraction)
        if cache is not None:  # every prompt token but the last is prefilled, and each step feeds one token
            cache.keep(decoder.row_cache(0), prompts[0] + completions[0].tokens, len(prompts[0]) - 1 + steps)
    except BaseException:
        if cache is not None:  # what it holds is not known any more
            cache.reset()
        raise
    end = time.perf_counter()
    return completions, RolloutStats(rows.generated, end - start, prefill_end - start, prompt_tokens)


def _decode(decoder, first_inputs, rows, max_new_tokens, sampler, compact_fraction):
    """Decode with the device one step ahead of the host; return the number of decode steps run.

    Step t's input is step t-1's sampled token unless a forced (tool-output) token is due at t-1,
    which the host knows from tokens up to t-2: so step t is queued before step t-1 is read back,
    and building the next graph overlaps the device's work. Finished rows leave the batch once
    `compact_fraction` of it is done (each compaction copies the cache).
    """
    completions = rows.completions
    active = np.arange(len(completions))  # batch row -> completion index
    inputs = mx.array(first_inputs, dtype=mx.int32)
    pending, pending_forced = None, None  # step t-1's sampled tokens (unread) and its forced tokens
    steps = 0
    for t in range(max_new_tokens + 1):
        if t < max_new_tokens:
            if pending is not None:
                inputs = pending if pending_forced is None else mx.where(pending_forced[0], pending_forced[1], pending)
            logits = decoder.step(inputs)
            if rows.logits_processors:
                logits = rows.process_logits(logits, active, inputs if pending is not None else None)
            sampled = sampler(logits)
            mx.async_eval(sampled)
            steps += 1
        if pending is not None:  # the host catches up with step t-1 while step t runs
            for row, token in enumerate(np.array(pending).tolist()):
                index = active[row]
                if not completions[index].stopped:
                    rows.record(index, token)
            stopped = np.array([completions[i].stopped for i in active])
            if stopped.all():
                break
            if t < max_new_tokens and stopped.any() and stopped.sum() >= compact_fraction * len(active):
                keep = mx.array(np.flatnonzero(~stopped))
                decoder.filter(keep)
                sampled, active = sampled[keep], active[~stopped]
        if t < max_new_tokens:
            pending, pending_forced = sampled, _forced_arrays(rows, active)
    return steps


def _forced_arrays(rows, active):
    """(mask, tokens) of the forced tokens due next for the batch rows, or None when none is due."""
    due = [rows.forced_next(i) for i in active]
    if all(t is None for t in due):
        return None
    return mx.array([t is not None for t in due]), mx.array([t or 0 for t in due], dtype=mx.int32)
