"""The generation engine: group sharing of the prefix, per-row sampling, stop tokens, the calculator tool,
logits processors, the per-token callback and a KV cache kept across calls."""

import builtins
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_repetition_penalty

from mlx_grpo.generation.calculator import CalculatorTool, ToolCall
from mlx_grpo.generation.chat import GenerationOptions, generate_reply
from mlx_grpo.generation.engine import ReusableCache, generate_completions, trim_buffer_cache
from mlx_grpo.generation.sampling import make_rollout_sampler
from mlx_grpo.models import load_model
from mlx_grpo.nanochat.tokenizer import nanochat_tokenizer
from mlx_grpo.training.evaluation import evaluate


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
    assert len(first) > 4  # a first token copied to the whole group would make its samples alike


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


def fill_cache(cache, inputs):
    """A dummy key/value per position, so that the batch caches fill as with a real model."""
    if cache is not None:
        batch, length = inputs.shape
        cache[0].update_and_fetch(mx.zeros((batch, 1, length, 4)), mx.zeros((batch, 1, length, 4)))


class TransitionModel(nn.Module):
    """Greedy next token = table[input token]: a scripted policy that also runs compiled."""

    def __init__(self, transitions, vocab_size, default):
        super().__init__()
        table = [transitions.get(t, default) for t in range(vocab_size)]
        self.logits_table = mx.where(mx.arange(vocab_size)[None] == mx.array(table)[:, None], 0.0, -1e9)
        self.layers = [nn.Identity()]

    def __call__(self, inputs, cache=None):
        fill_cache(cache, inputs)
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


class ScriptModel(nn.Module):
    """Writes `script` after a prompt of `prompt_len` tokens whatever it is fed: the logits at position p pick
    script[p + 1 - prompt_len], so forced tokens take their place in the script (it holds them too)."""

    def __init__(self, script, prompt_len, vocab_size):
        super().__init__()
        self.script = mx.array(script)
        self.prompt_len, self.vocab_size = prompt_len, vocab_size
        self.layers = [nn.Identity()]

    def __call__(self, inputs, cache=None):
        start = cache[0].offset if cache is not None else 0  # an int, or one per row in a batch cache
        fill_cache(cache, inputs)
        positions = mx.array(start).reshape(-1, 1) + mx.arange(inputs.shape[1])[None]
        target = self.script[mx.clip(positions + 1 - self.prompt_len, 0, self.script.size - 1)]
        return mx.where(mx.arange(self.vocab_size) == target[..., None], 0.0, -1e9)


def test_rollouts_evaluation_and_chat_read_tool_calls_by_one_protocol(tiny):
    """A stray <|python_end|> (no open call) is text, a valid call forces its result, an empty and an invalid
    call force nothing and count as failures: the same for rollouts, evaluation and chat (one engine)."""
    _, tokenizer, nano = tiny
    calc = CalculatorTool.for_tokenizer(nano)
    end = nano.special_token_id("<|assistant_end|>")
    text = lambda t: nano.encode(t)
    forced = [calc.output_start, *text("42"), calc.output_end]
    script = [*text(" a"), calc.python_end, *text(" b"), calc.python_start, *text("6*7"), calc.python_end, *forced,
              *text(" c"), calc.python_start, calc.python_end, calc.python_start, *text("1/0"), calc.python_end, end]
    prompt = nano.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True)
    model = ScriptModel(script, len(prompt), nano.vocab_size)
    calls = [ToolCall("6*7", "42"), ToolCall("", None), ToolCall("1/0", None)]
    first_forced = script.index(calc.output_start)
    rollouts, _ = generate_completions(model, [prompt], group_size=2, max_new_tokens=60,
                                       sampler=make_rollout_sampler(0.0), stop_token_ids={end}, calculator=calc)
    for c in rollouts:
        assert c.tokens == script and c.calls == calls and (c.tool_calls, c.tool_failures) == (3, 2)
        assert c.sampled == [0 if first_forced <= i < first_forced + len(forced) else 1 for i in range(len(script))]
    result = evaluate(model, [prompt], ["42"], decode=lambda c: nano.decode(c.content_tokens),
                      is_correct=lambda t, a: a in t, stop_token_ids={end}, max_new_tokens=60, calculator=calc)
    assert result.samples[0]["completion"] == nano.decode(script[:-1]) and result.accuracy == 1.0
    reply = generate_reply(model, tokenizer, prompt, GenerationOptions(max_tokens=60, temperature=0.0))
    assert reply.tokens == script[:-1] and reply.tool_calls == calls and reply.finish_reason == "stop"


def test_calculator_refuses_hostile_expressions_and_counts_the_failure(tiny, tmp_path, monkeypatch):
    _, _, nano = tiny
    calc = CalculatorTool.for_tokenizer(nano)
    end = nano.special_token_id("<|assistant_end|>")
    ran = []  # anything that would run the expression records itself here
    monkeypatch.setattr(os, "system", lambda *a: ran.append(("os.system", a)))
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: ran.append(("eval", a)))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: ran.append(("exec", a)))
    monkeypatch.chdir(tmp_path)
    expression = "__import__('os').system('touch pwned')"
    assert len(expression) < 100  # within the length limit: it reaches the parser
    script = [calc.python_start, *nano.encode(expression), calc.python_end, end]
    prompt = [nano.bos_token_id]
    (c,), _ = generate_completions(ScriptModel(script, len(prompt), nano.vocab_size), [prompt], group_size=1,
                                   max_new_tokens=len(script) + 2, sampler=make_rollout_sampler(0.0),
                                   stop_token_ids={end}, calculator=calc)
    assert c.calls == [ToolCall(expression, None)] and c.tool_failures == 1 and c.stopped
    assert c.tokens == script and all(c.sampled)  # nothing forced
    assert ran == [] and not (tmp_path / "pwned").exists()


def test_every_token_reaches_the_callback_in_order(tiny):
    model, _, nano = tiny
    prompts = [[nano.bos_token_id, *nano.encode("hello")], [nano.bos_token_id]]
    seen = {}
    completions, stats = generate_completions(
        model, prompts, group_size=2, max_new_tokens=5, sampler=make_rollout_sampler(1.0), stop_token_ids=set(),
        on_token=lambda c: seen.setdefault(id(c), []).append(list(c.tokens)))
    for c in completions:
        assert seen[id(c)] == [c.tokens[:n] for n in range(1, len(c.tokens) + 1)]
    assert sum(len(v) for v in seen.values()) == stats.generated_tokens == 4 * 5
    assert stats.prompt_tokens == 7


def penalized_greedy_reference(model, prompt, steps, processor):
    """One sequence, a full forward per token (no cache), the processor given the whole history."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = processor(mx.array(tokens), model(mx.array([tokens]))[:, -1, :])
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("fast_decode", [True, False])
def test_repetition_penalty_sees_each_rows_own_history(tiny, fast_decode):
    model, _, nano = tiny
    prompts = [[nano.bos_token_id, *nano.encode("the the the cat")], [nano.bos_token_id, *nano.encode("a b")]]
    penalty = make_repetition_penalty(3.0, context_size=20)
    completions, _ = generate_completions(
        model, prompts, group_size=2, max_new_tokens=12, sampler=make_rollout_sampler(0.0), stop_token_ids=set(),
        logits_processors=[penalty], fast_decode=fast_decode)
    plain, _ = generate_completions(model, prompts, group_size=1, max_new_tokens=12,
                                    sampler=make_rollout_sampler(0.0), stop_token_ids=set())
    for i, c in enumerate(completions):
        assert c.tokens == penalized_greedy_reference(model, prompts[i // 2], 12, penalty)
    assert [c.tokens for c in completions[::2]] != [c.tokens for c in plain]  # the penalty changed something


class FixedDistribution(nn.Module):
    """The same next-token probabilities at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = mx.log(mx.array(probs))
        self.layers = [nn.Identity()]

    def __call__(self, inputs, cache=None):
        fill_cache(cache, inputs)
        return mx.broadcast_to(self.logits, (*inputs.shape, self.logits.size))


def test_top_p_on_the_engine_samples_from_the_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps tokens 0 and 1, renormalised to 0.625 / 0.375.
    model = FixedDistribution([0.5, 0.3, 0.15, 0.05])
    mx.random.seed(0)
    completions, _ = generate_completions(model, [[0, 1]], group_size=400, max_new_tokens=2,
                                          sampler=make_rollout_sampler(1.0, top_p=0.7), stop_token_ids=set())
    tokens = np.array([c.tokens for c in completions]).ravel()
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).mean() - 0.625) < 0.05


@pytest.mark.parametrize("fast_decode", [True, False])
def test_a_kept_cache_gives_the_tokens_of_a_fresh_prefill(tiny, fast_decode):
    model, _, nano = tiny
    greedy = dict(group_size=1, max_new_tokens=6, sampler=make_rollout_sampler(0.0), stop_token_ids=set(),
                  fast_decode=fast_decode)
    cache = ReusableCache(model)
    first = [nano.bos_token_id, *nano.encode("Tom has 12 apples")]
    (turn1,), _ = generate_completions(model, [first], cache=cache, **greedy)
    assert cache.tokens == (first + turn1.tokens)[:len(first) + 5]  # the last sampled token was never fed
    second = first + turn1.tokens + nano.encode(" and eats 5.")
    (kept,), stats = generate_completions(model, [second], cache=cache, **greedy)
    (fresh,), _ = generate_completions(model, [second], **greedy)
    assert kept.tokens == fresh.tokens
    assert stats.prompt_tokens == len(second) - (len(first) + 5)
    # A prompt that leaves the held tokens early (an edited history): the cache steps back to the shared part.
    (edited,), _ = generate_completions(model, [first + nano.encode(" today")], cache=cache, **greedy)
    assert edited.tokens == generate_completions(model, [first + nano.encode(" today")], **greedy)[0][0].tokens


def test_an_interrupted_call_resets_the_kept_cache(tiny):
    model, _, nano = tiny
    cache = ReusableCache(model)
    prompt = [nano.bos_token_id, *nano.encode("hello there")]

    def interrupt(completion):
        if len(completion.tokens) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_completions(model, [prompt], group_size=1, max_new_tokens=6, sampler=make_rollout_sampler(0.0),
                             stop_token_ids=set(), on_token=interrupt, cache=cache)
    assert cache.tokens == []
    with pytest.raises(ValueError, match="one conversation"):
        generate_completions(model, [prompt, prompt], group_size=1, max_new_tokens=2,
                             sampler=make_rollout_sampler(0.0), stop_token_ids=set(), cache=cache)


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
