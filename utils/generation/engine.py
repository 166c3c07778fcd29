"""Batched rollouts: every prompt x num_generations sampled together, with nanochat's calculator tool.

mlx-lm's BatchGenerator samples batches well, but it cannot force tool-output tokens into a row
mid-generation, so the decode loop is written here: on mlx-lm's model and KV caches for any model,
or on utils/nanochat/decoder.py's faster decode step for nanochat models.
"""

import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_grpo.generation.calculator import evaluate_expression
from mlx_grpo.nanochat import decoder as nanochat_decode


@dataclass
class Completion:
    """One sampled completion. `tokens` are the ids exactly as generated (never re-tokenized)."""

    prompt_index: int
    tokens: list = field(default_factory=list)
    sampled: list = field(default_factory=list)  # 1: sampled by the policy, 0: forced tool output
    stopped: bool = False  # ended on a stop token; otherwise truncated at the length limit
    tool_calls: int = 0
    tool_failures: int = 0

    @property
    def truncated(self) -> bool:
        return not self.stopped


@dataclass
class RolloutStats:
    generated_tokens: int  # tokens appended to completions (sampled + forced)
    seconds: float
    prefill_seconds: float = 0.0  # of `seconds`: prompts through the model, caches built

    @property
    def tokens_per_sec(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


@dataclass
class CalculatorTool:
    """nanochat's calculator: python_start expr python_end -> forced output_start result output_end."""

    tokenizer: object  # nanochat TiktokenTokenizerWrapper (encode/decode/special ids)
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def for_tokenizer(cls, tok):
        ids = [tok.special_token_id(name) for name in
               ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")]
        return cls(tok, *ids)

    def forced_output(self, expression_tokens):
        """Tokens to force after a call, or None when the expression is not valid arithmetic."""
        result = evaluate_expression(self.tokenizer.decode(expression_tokens))
        if result is None:
            return None
        return [self.output_start, *self.tokenizer.encode(result), self.output_end]


class _Rows:
    """Per-completion bookkeeping of the decode loop: forced tokens, stops, tool calls."""

    def __init__(self, completions, stop_token_ids, calculator):
        self.completions = completions
        self.stop_token_ids = stop_token_ids
        self.calculator = calculator
        self.forced = [deque() for _ in completions]
        self.expression = [None] * len(completions)  # token list while inside a python call
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
        elif self.calculator is not None and was_sampled:
            self._observe_tool_token(index, token)

    def _observe_tool_token(self, index, token):
        calc = self.calculator
        if token == calc.python_start:
            self.expression[index] = []
        elif self.expression[index] is not None:
            if token == calc.python_end:
                self.completions[index].tool_calls += 1
                output = calc.forced_output(self.expression[index])
                self.expression[index] = None
                if output is None:
                    self.completions[index].tool_failures += 1
                else:
                    self.forced[index].extend(output)
            else:
                self.expression[index].append(token)


class MlxLmDecoder:
    """Any mlx-lm model on its own batch KV cache: `step(tokens)` -> next-token logits."""

    def __init__(self, model, prompts, group_size):
        self.model = model
        self.cache = _prefill_shared(model, prompts, group_size)

    def step(self, tokens):
        return self.model(tokens[:, None], cache=self.cache)[:, -1, :]

    def filter(self, keep):
        for layer_cache in self.cache:
            layer_cache.filter(keep)


def _prefill_shared(model, prompts, group_size):
    """Prefill each prompt once (all but its last token) and share the cache across its group."""
    per_prompt = []
    for prompt in prompts:
        cache = make_prompt_cache(model)
        if len(prompt) > 1:
            model(mx.array(prompt[:-1])[None], cache=cache)
            mx.eval([c.state for c in cache])
        per_prompt.append(cache)
    rows = [per_prompt[i] for i in range(len(prompts)) for _ in range(group_size)]
    # mlx-lm's cache classes know how to merge single-sequence caches into a left-padded batch one
    return [rows[0][layer].merge([row[layer] for row in rows]) for layer in range(len(rows[0]))]


def make_decoder(model, prompts, group_size, max_new_tokens, fast_decode=True):
    """The fast nanochat decoder where it applies (nanochat, no adapters), else mlx-lm's model call."""
    if fast_decode and nanochat_decode.supports(model):
        return nanochat_decode.NanochatDecoder(model, prompts, group_size, max_new_tokens)
    return MlxLmDecoder(model, prompts, group_size)


# Memory the rollout may claim without evicting, as a fraction of MLX's memory limit: d20's rollout at
# nanochat's RL shape (256 rows x ~360 positions) claims 7.4 GB of an H100's 80.8 GB limit. Too little
# or too much only costs time (cached buffers freed one by one, or allocated afresh).
ROLLOUT_HEADROOM = 0.15


def trim_buffer_cache(headroom_bytes):
    """Shrink MLX's buffer cache so that `headroom_bytes` more fit under the memory limit (and, on Metal,
    under the recommended working set) without evicting; the rest of the cache stays for reuse.

    A GRPO update leaves tens of GB of freed buffers in the cache. Emptying it makes the rollout allocate
    afresh (on an H100, 20 x 335 MB took 55 ms new against 3 ms from the cache, and a d20 prefill 0.16 s
    against 0.03 s); keeping all of it makes allocations at the limit free cached buffers one at a
    time, each waiting for the device.
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
):
    """Sample `group_size` completions for every prompt (token id lists), all in one batch.

    Returns (completions ordered prompt by prompt, group contiguous; RolloutStats).
    Every row samples its own first token from the shared prefix. `sampler` maps (rows, vocab)
    logits to token ids (mlx_grpo.generation.sampling.make_rollout_sampler); fast_decode=False forces mlx-lm's model call.
    """
    start = time.perf_counter()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_completions: got an empty prompt; every prompt needs at least one token")
    completions = [Completion(prompt_index=i) for i in range(len(prompts)) for _ in range(group_size)]
    trim_buffer_cache(ROLLOUT_HEADROOM * mx.get_memory_limit())
    rows = _Rows(completions, set(stop_token_ids), calculator)
    decoder = make_decoder(model, prompts, group_size, max_new_tokens, fast_decode)
    prefilled = time.perf_counter()
    first_inputs = [prompts[c.prompt_index][-1] for c in completions]
    _decode(decoder, first_inputs, rows, max_new_tokens, sampler, compact_fraction)
    end = time.perf_counter()
    return completions, RolloutStats(rows.generated, end - start, prefilled - start)


def _decode(decoder, first_inputs, rows, max_new_tokens, sampler, compact_fraction):
    """Decode with the device one step ahead of the host.

    Step t's input is step t-1's sampled token unless a forced (tool-output) token is due at t-1,
    which the host knows from tokens up to t-2: so step t is queued before step t-1 is read back,
    and building the next graph overlaps the device's work. Finished rows leave the batch once
    `compact_fraction` of it is done (each compaction copies the cache).
    """
    completions = rows.completions
    active = np.arange(len(completions))  # batch row -> completion index
    inputs = mx.array(first_inputs, dtype=mx.int32)
    pending, pending_forced = None, None  # step t-1's sampled tokens (unread) and its forced tokens
    for t in range(max_new_tokens + 1):
        if t < max_new_tokens:
            if pending is not None:
                inputs = pending if pending_forced is None else mx.where(pending_forced[0], pending_forced[1], pending)
            sampled = sampler(decoder.step(inputs))
            mx.async_eval(sampled)
        if pending is not None:  # the host catches up with step t-1 while step t runs
            for row, token in enumerate(np.array(pending).tolist()):
                index = active[row]
                if not completions[index].stopped:
                    rows.record(index, token)
            stopped = np.array([completions[i].stopped for i in active])
            if stopped.all():
                break
            if t < max_new_tokens and stopped.sum() >= compact_fraction * len(active):
                keep = mx.array(np.flatnonzero(~stopped))
                decoder.filter(keep)
                sampled, active = sampled[keep], active[~stopped]
        if t < max_new_tokens:
            pending, pending_forced = sampled, _forced_arrays(rows, active)


def _forced_arrays(rows, active):
    """(mask, tokens) of the forced tokens due next for the batch rows, or None when none is due."""
    due = [rows.forced_next(i) for i in active]
    if all(t is None for t in due):
        return None
    return mx.array([t is not None for t in due]), mx.array([t or 0 for t in due], dtype=mx.int32)
