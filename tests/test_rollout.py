"""Batched rollouts: group sharing of the prefix, per-row sampling, stop tokens, the calculator tool."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import KVCache

from mlx_grpo.generation.engine import CalculatorTool, Completion, _Rows, generate_completions, trim_buffer_cache
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.tokenizer import nanochat_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    return model, tokenizer, nanochat_tokenizer(tokenizer)


def greedy_reference(model, prompt, steps):
    """One sequence at a time with mlx-lm's plain KV cache: the decode the batched loop must match."""
    cache = [KVCache() for _ in model.layers]
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        out.append(token.item())
        logits = model(token[:, None], cache=cache)[:, -1]
    return out


def test_greedy_batch_matches_one_at_a_time_for_every_group_member(tiny):
    model, tokenizer, nano = tiny
    prompts = [nano.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("What is 2 plus 3?", "Tom has 12 apples and eats 5. How many are left now?")]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    completions, stats = generate_completions(
        model, prompts, group_size=3, max_new_tokens=8, sampler=make_rollout_sampler(0.0), stop_token_ids=set(),)
    assert len(completions) == 6 and stats.generated_tokens == 6 * 8
    for i, completion in enumerate(completions):
        assert completion.prompt_index == i // 3
        assert completion.tokens == greedy_reference(model, prompts[i // 3], 8)
        assert completion.sampled == [1] * 8 and completion.truncated


def test_every_sample_draws_its_own_first_token(tiny):
    model, _, nano = tiny
    prompt = nano.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    mx.random.seed(0)
    completions, _ = generate_completions(
        model, [prompt], group_size=16, max_new_tokens=1, sampler=make_rollout_sampler(5.0), stop_token_ids=set())
    first = {c.tokens[0] for c in completions}
    assert len(first) > 4  # nanochat's Oct-2025 engine copied one first token to the whole group


def test_stop_tokens_end_rows_and_count_as_sampled(tiny):
    model, _, nano = tiny
    prompt = nano.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    reference = greedy_reference(model, prompt, 6)
    stop = reference[2]
    completions, _ = generate_completions(
        model, [prompt, prompt], group_size=2, max_new_tokens=6, sampler=make_rollout_sampler(0.0),
        stop_token_ids={stop})
    for completion in completions:
        end = reference.index(stop) + 1
        assert completion.tokens == reference[:end]
        assert completion.stopped and not completion.truncated


class TransitionModel(nn.Module):
    """Greedy next token = table[input token]: a scripted policy that also runs compiled.

    It writes a dummy key/value per position so the batch caches fill as with a real model.
    """

    def __init__(self, transitions, vocab_size, default):
        super().__init__()
        table = [transitions.get(t, default) for t in range(vocab_size)]
        self.logits_table = mx.where(mx.arange(vocab_size)[None] == mx.array(table)[:, None], 0.0, -1e9)
        self.layers = [nn.Identity()]

    def __call__(self, inputs, cache=None):
        batch, length = inputs.shape
        if cache is not None:
            cache[0].update_and_fetch(mx.zeros((batch, 1, length, 4)), mx.zeros((batch, 1, length, 4)))
        return self.logits_table[inputs]


def chain(tokens):
    return {a: b for a, b in zip(tokens, tokens[1:])}


def test_calculator_forces_the_result_without_gradient(tiny):
    _, _, nano = tiny
    calc = CalculatorTool.for_tokenizer(nano)
    expr, result = nano.encode("12*3"), nano.encode("36")
    end, start = nano.special_token_id("<|assistant_end|>"), nano.encode(" x")[0]
    forced = [calc.output_start, *result, calc.output_end]
    call = [start, calc.python_start, *expr, calc.python_end]
    assert len(set(call)) == len(call)  # the scripted chain needs distinct tokens
    # The model wants: the python call, then anything while the output is forced, then the end.
    transitions = chain(call) | {calc.python_end: start, calc.output_end: end}
    model = TransitionModel(transitions, nano.vocab_size, default=start)
    prompt = [nano.bos_token_id, start]
    completions, _ = generate_completions(
        model, [prompt, prompt], group_size=2, max_new_tokens=40, sampler=make_rollout_sampler(0.0),
        stop_token_ids={end}, calculator=calc)
    for c in completions:
        assert c.tokens == [calc.python_start, *expr, calc.python_end, *forced, end]
        assert c.sampled == [1] * (len(expr) + 2) + [0] * len(forced) + [1]  # forced: no gradient
        assert c.tool_calls == 1 and c.tool_failures == 0 and c.stopped


def test_calculator_refuses_hostile_expressions_and_counts_the_failure(tiny):
    _, _, nano = tiny
    calc = CalculatorTool.for_tokenizer(nano)
    end = nano.special_token_id("<|assistant_end|>")
    hostile = nano.encode("__import__('os').system('touch /tmp/mlx_grpo_pwned')")
    rows = _Rows([Completion(0)], {end}, calc)
    for token in [calc.python_start, *hostile, calc.python_end, end]:
        rows.record(0, token)
    c = rows.completions[0]
    assert c.tool_calls == 1 and c.tool_failures == 1 and c.stopped
    assert all(c.sampled)  # nothing forced
    assert not Path("/tmp/mlx_grpo_pwned").exists()


def test_empty_prompt_is_a_clear_error(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        generate_completions(model, [[]], group_size=2, max_new_tokens=2, sampler=make_rollout_sampler(0.0),
                             stop_token_ids=set())


@pytest.fixture
def filled_cache():
    """16 MB of freed buffers in MLX's cache (the CPU's default cache limit is lower: raised, then restored)."""
    previous = mx.set_cache_limit(1 << 30)
    mx.clear_cache()
    arrays = [mx.ones((1 << 18,)) for _ in range(16)]  # 16 x 1 MB
    mx.eval(arrays)
    del arrays
    mx.synchronize()  # on a GPU, buffers return to the cache once the device is done with them
    assert mx.get_cache_memory() >= 16 << 20
    yield
    mx.set_cache_limit(previous)
    mx.clear_cache()


def test_trim_buffer_cache_leaves_the_headroom_and_keeps_the_rest(filled_cache):
    headroom = mx.get_memory_limit() - mx.get_active_memory() - (4 << 20)  # room for 4 MB of cache
    trim_buffer_cache(headroom)
    assert 0 < mx.get_cache_memory() <= (4 << 20) + (64 << 10)  # + the 64 KB allocation that trims
    assert mx.set_cache_limit(1 << 30) == 1 << 30  # the cache limit is restored


def test_trim_buffer_cache_keeps_a_cache_that_fits(filled_cache):
    before = mx.get_cache_memory()
    trim_buffer_cache(0)
    assert mx.get_cache_memory() == before


def test_trim_buffer_cache_stays_in_metals_recommended_working_set(filled_cache, monkeypatch):
    working_set = mx.get_active_memory() + (4 << 20)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": working_set})
    trim_buffer_cache(0)
    assert mx.get_cache_memory() <= (4 << 20) + (64 << 10)
