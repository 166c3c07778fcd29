"""Batched rollouts: every prompt x num_generations sampled together, with nanochat's calculator tool.

mlx-lm's BatchGenerator samples batches well, but it cannot force tool-output tokens into a row
mid-generation, so the decode loop is written here on top of mlx-lm's KV caches and samplers.
"""

import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .calculator import evaluate_expression


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


def make_rollout_sampler(temperature, top_p=1.0, top_k=0, min_p=0.0):
    """mlx-lm's sampler; temperature 0 is greedy."""
    return make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)


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
):
    """Sample `group_size` completions for every prompt (token id lists), all in one batch.

    Returns (completions ordered prompt by prompt, group contiguous; RolloutStats).
    Every row samples its own first token from the shared prefix. Rows that stop are dropped from
    the batch once `compact_fraction` of the active rows are done (each drop copies the cache).
    """
    start = time.perf_counter()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_completions: got an empty prompt; every prompt needs at least one token")
    stop_token_ids = set(stop_token_ids)
    completions = [Completion(prompt_index=i) for i in range(len(prompts)) for _ in range(group_size)]
    forced = [deque() for _ in completions]
    expression = [None] * len(completions)  # token list while inside a python call

    cache = _prefill_shared(model, prompts, group_size)
    active = list(range(len(completions)))
    inputs = mx.array([prompts[c.prompt_index][-1] for c in completions])
    done_in_batch = 0
    generated = 0

    for _ in range(max_new_tokens):
        logits = model(inputs[:, None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled_tokens = sampler(logprobs).tolist()

        next_inputs = []
        for row, index in enumerate(active):
            c = completions[index]
            if c.stopped:
                next_inputs.append(c.tokens[-1])  # finished row still in the batch: its output is ignored
                continue
            if forced[index]:
                token, was_sampled = forced[index].popleft(), 0
            else:
                token, was_sampled = sampled_tokens[row], 1
            c.tokens.append(token)
            c.sampled.append(was_sampled)
            generated += 1
            if was_sampled and token in stop_token_ids:
                c.stopped = True
                done_in_batch += 1
            elif calculator is not None and was_sampled:
                _observe_tool_token(calculator, c, index, token, expression, forced)
            next_inputs.append(token)

        if done_in_batch == len(active):
            break
        if done_in_batch and done_in_batch >= compact_fraction * len(active):
            keep = [row for row, index in enumerate(active) if not completions[index].stopped]
            keep_array = mx.array(keep)
            for layer_cache in cache:
                layer_cache.filter(keep_array)
            active = [active[row] for row in keep]
            next_inputs = [next_inputs[row] for row in keep]
            done_in_batch = 0
        inputs = mx.array(next_inputs)

    return completions, RolloutStats(generated, time.perf_counter() - start)


def _observe_tool_token(calculator, completion, index, token, expression, forced):
    if token == calculator.python_start:
        expression[index] = []
    elif expression[index] is not None:
        if token == calculator.python_end:
            completion.tool_calls += 1
            output = calculator.forced_output(expression[index])
            expression[index] = None
            if output is None:
                completion.tool_failures += 1
            else:
                forced[index].extend(output)
        else:
            expression[index].append(token)
