"""GSM8K evaluation: greedy accuracy and pass@k, on the rollouts' generation engine."""

import math
import time
from dataclasses import dataclass

import numpy as np

from mlx_grpo.generation.engine import generate_completions
from mlx_grpo.generation.sampling import make_rollout_sampler


@dataclass
class EvalResult:
    accuracy: float  # greedy
    num_questions: int
    pass_at_k: dict  # {k: fraction} from sampled answers, empty when pass@k is off
    samples: list  # a few (question, completion, answer, correct) for the logs
    seconds: float
    generated_tokens: int


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod((num_samples - num_correct - i) / (num_samples - i) for i in range(k))


def evaluate(model, prompts, answers, *, decode, is_correct, stop_token_ids, max_new_tokens,
             calculator=None, pass_k=0, temperature=1.0, top_k=0, top_p=1.0, batch_size=64,
             questions=None, **generation):
    """Score `prompts` (token id lists) against `answers`; decode(completion) -> text for the checker.

    generation: further keywords of generate_completions (prefill_align, headroom)."""
    start = time.perf_counter()
    greedy = make_rollout_sampler(0.0)
    correct, samples, generated = [], [], 0
    for chunk in range(0, len(prompts), batch_size):
        part = slice(chunk, chunk + batch_size)
        completions, stats = generate_completions(
            model, prompts[part], group_size=1, max_new_tokens=max_new_tokens, sampler=greedy,
            stop_token_ids=stop_token_ids, calculator=calculator, **generation)
        generated += stats.generated_tokens
        for completion, answer, i in zip(completions, answers[part], range(chunk, len(prompts))):
            text = decode(completion)
            ok = is_correct(text, answer)
            correct.append(ok)
            if len(samples) < 4:
                samples.append({"question": questions[i] if questions else None, "completion": text,
                                "answer": answer, "correct": bool(ok)})

    pass_results = {}
    if pass_k > 0:
        sampler = make_rollout_sampler(temperature, top_p=top_p, top_k=top_k)
        num_correct = []
        group_chunk = max(1, batch_size // pass_k)
        for chunk in range(0, len(prompts), group_chunk):
            part = slice(chunk, chunk + group_chunk)
            completions, stats = generate_completions(
                model, prompts[part], group_size=pass_k, max_new_tokens=max_new_tokens, sampler=sampler,
                stop_token_ids=stop_token_ids, calculator=calculator, **generation)
            generated += stats.generated_tokens
            for q, answer in enumerate(answers[part]):
                group = completions[q * pass_k:(q + 1) * pass_k]
                num_correct.append(sum(bool(is_correct(decode(c), answer)) for c in group))
        for k in range(1, pass_k + 1):
            pass_results[k] = float(np.mean([pass_at_k(pass_k, c, k) for c in num_correct]))

    return EvalResult(
        accuracy=float(np.mean(correct)) if correct else 0.0,
        num_questions=len(prompts),
        pass_at_k=pass_results,
        samples=samples,
        seconds=time.perf_counter() - start,
        generated_tokens=generated,
    )
