"""Reward functions, the reward registry, and the weighted reward sum used by the trainer.

Every reward has the signature of the original MLX-GRPO's, so reward files written for it work here:

    f(completions: list[str], prompts=None, answer: list[str] | None = None, **kwargs) -> list[float]

with one float per completion; `answer[i]` is the reference answer of completion i. Completions are
plain strings (not TRL's [{"content": ...}] chat lists).

Built-ins (name: value):
- correctness: 2.0 if the text inside the last <answer>...</answer> equals the reference as a
  number ("18", "18.0", "$18", "1,000" == "1000"); text compare if either side is not a number.
  Numbers compare as numbers because a right answer written "18.0" or "$18" is still right; a
  completion without a closed <answer> block has given no answer and scores 0.
- int: 0.5 if that extracted answer is an integer literal (optional sign, ASCII digits): "18" and
  "-3" score, "18.0", "$18" and "1,000" do not.
- strict_format: 0.5 if the whole completion is <reasoning>...</reasoning> then <answer>...</answer>,
  only whitespace around and between them (the regex
  ^\\s*<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>\\s*$ with DOTALL, so multi-line reasoning
  counts).
- soft_format: 0.5 if <reasoning>.*?</reasoning>\\s*<answer>.*?</answer> appears anywhere (DOTALL).
- xmlcount: +0.25 if a <reasoning>...</reasoning> pair appears, +0.25 if an <answer>...</answer>
  pair appears, minus 0.001 per character after the FIRST "</answer>" (that text stripped of
  surrounding whitespace), so rambling on after the answer costs; a second answer block counts as
  trailing text. Can go below 0 for long trailing text.
- gsm8k: 1.0 if the completion's first "#### N" (nanochat's regex, commas removed) equals the
  reference as a number ("#### 72." and "#### 72.0" score as "#### 72" does).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mlx_grpo.config import REWARD_ERRORS
from mlx_grpo.data.gsm8k import PROMPT_FORMATS, gsm8k_reference_answer

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]
MAX_REWARD = 1e6  # far above any useful reward, far below where float32 losses of its advantages overflow


class RewardError(ValueError):
    """A reward function is unknown, misconfigured, failed, or returned bad values."""


# --------------------------------------------------------------------------------------------
# Answer extraction and numeric comparison

_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_STRICT_FORMAT_RE = re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>\s*", re.DOTALL)
_SOFT_FORMAT_RE = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_REASONING_PAIR_RE = re.compile(r"<reasoning>.*?</reasoning>", re.DOTALL)
_ANSWER_PAIR_RE = re.compile(r"<answer>.*?</answer>", re.DOTALL)


def parse_number(text: str | None) -> float | None:
    """Parse an answer like "18", "-3", "18.0", "$1,000", "72." into a float; None if not a number.

    Strips whitespace, one leading "$" (also after a sign) and every comma; a trailing "."
    (sentence end) is allowed. A fraction "3/4" is its value (0.75), as GSM8K writes some answers.
    Exponents, units and words are not numbers here.
    """
    if text is None:
        return None
    numerator, slash, denominator = text.partition("/")
    if slash:
        top, bottom = parse_number(numerator), parse_number(denominator)
        if top is None or not bottom or "/" in denominator or "$" in denominator or denominator.strip()[:1] in "+-":
            return None
        return top / bottom
    s = text.strip().replace(",", "")
    sign = ""
    if s and s[0] in "+-":
        sign, s = s[0], s[1:].lstrip()
    if s.startswith("$"):
        s = s[1:].lstrip()
    s = sign + s  # a trailing "." ("72.") is accepted by _NUMBER_RE itself
    if not _NUMBER_RE.fullmatch(s):
        return None
    return float(s)


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True if both parse as numbers and are equal, else if the stripped strings are equal.

    Numbers are compared as floats, exactly: GSM8K answers are small decimals, well inside
    float precision. No extraction (None) never matches.
    """
    if predicted is None or reference is None or not predicted.strip():
        return False
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return p == r
    return predicted.strip() == reference.strip()


def extract_xml_answer(text: str) -> str | None:
    """Stripped text inside the last <answer> and the next </answer>; None without both tags."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0:
        return None
    return text[start:end].strip()


# The first "#### N" number, commas removed (nanochat's extract_answer): the same rule for
# completions as for the references in the data set.
extract_gsm8k_answer = gsm8k_reference_answer


def count_xml(text: str) -> float:
    """The xmlcount score of one completion (see the module docstring)."""
    score = 0.0
    if _REASONING_PAIR_RE.search(text):
        score += 0.25
    if _ANSWER_PAIR_RE.search(text):
        score += 0.25
    end = text.find("</answer>")
    if end >= 0:
        score -= len(text[end + len("</answer>"):].strip()) * 0.001
    return score


# --------------------------------------------------------------------------------------------
# Built-in reward functions


def _require_answers(name: str, completions: Sequence[str], answer) -> Sequence[str]:
    if answer is None:
        raise RewardError(f"reward '{name}' needs reference answers: pass answer=[...] (one per completion)")
    if len(answer) != len(completions):
        raise RewardError(
            f"reward '{name}': got {len(completions)} completions but {len(answer)} reference answers"
        )
    return answer


def correctness_reward(completions, prompts=None, answer=None, **kwargs) -> list[float]:
    answer = _require_answers("correctness", completions, answer)
    return [2.0 if answers_match(extract_xml_answer(c), a) else 0.0 for c, a in zip(completions, answer)]


def int_reward(completions, prompts=None, answer=None, **kwargs) -> list[float]:
    scores = []
    for c in completions:
        extracted = extract_xml_answer(c)
        scores.append(0.5 if extracted is not None and _INT_RE.fullmatch(extracted) else 0.0)
    return scores


def strict_format_reward(completions, prompts=None, answer=None, **kwargs) -> list[float]:
    return [0.5 if _STRICT_FORMAT_RE.fullmatch(c) else 0.0 for c in completions]


def soft_format_reward(completions, prompts=None, answer=None, **kwargs) -> list[float]:
    return [0.5 if _SOFT_FORMAT_RE.search(c) else 0.0 for c in completions]


def xmlcount_reward(completions, prompts=None, answer=None, **kwargs) -> list[float]:
    return [count_xml(c) for c in completions]


def gsm8k_reward(completions, prompts=None, answer=None, **kwargs) -> list[float]:
    answer = _require_answers("gsm8k", completions, answer)
    return [1.0 if answers_match(extract_gsm8k_answer(c), a) else 0.0 for c, a in zip(completions, answer)]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "correctness": correctness_reward,
    "int": int_reward,
    "strict_format": strict_format_reward,
    "soft_format": soft_format_reward,
    "xmlcount": xmlcount_reward,
    "gsm8k": gsm8k_reward,
}

# The xml format's five rewards in the original MLX-GRPO's order, so its reward_weights lists keep their meaning.
XML_REWARD_NAMES = ["xmlcount", "soft_format", "strict_format", "int", "correctness"]


def default_reward_names(prompt_format: str) -> list[str]:
    """Rewards used when the config names none: nanochat -> gsm8k; xml -> XML_REWARD_NAMES."""
    if prompt_format == "nanochat":
        return ["gsm8k"]
    if prompt_format == "xml":
        return list(XML_REWARD_NAMES)
    raise RewardError(f"unknown prompt_format {prompt_format!r}: expected one of {list(PROMPT_FORMATS)}")


# --------------------------------------------------------------------------------------------
# Resolving names (built-ins or a user's Python file)


def load_reward_file(reward_file: str) -> dict[str, RewardFn]:
    """Import a user's reward file and return its public top-level functions by name.

    The file is the user's own config code, so executing it is intended.
    """
    path = Path(reward_file).expanduser()
    if path.suffix != ".py" or not path.is_file():
        raise RewardError(
            f"reward_file {reward_file!r} is not an existing .py file: fix the path or set reward_file = \"\""
        )
    spec = importlib.util.spec_from_file_location(f"mlx_grpo_user_rewards_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward_file {reward_file!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # errors in the user's file propagate with their traceback
    return {
        name: obj
        for name, obj in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(obj)
    }


def resolve_reward_functions(names: Sequence[str], reward_file: str = "") -> list[tuple[str, RewardFn]]:
    """Map reward names to functions: from reward_file when it defines the name, else built-ins."""
    if isinstance(names, str):
        raise RewardError(f"reward names must be a list of strings, got the string {names!r}: write [{names!r}]")
    if not names:
        raise RewardError(f"no reward functions named: give at least one of {sorted(BUILTIN_REWARDS)}")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise RewardError(f"reward names listed more than once: {duplicates}")
    user = load_reward_file(reward_file) if reward_file else {}
    resolved = []
    for name in names:
        fn = user.get(name) or BUILTIN_REWARDS.get(name)
        if fn is None:
            available = f"built-ins {sorted(BUILTIN_REWARDS)}"
            if reward_file:
                available += f", functions in {reward_file}: {sorted(user)}"
            raise RewardError(f"unknown reward function {name!r}; available: {available}")
        resolved.append((name, fn))
    return resolved


# --------------------------------------------------------------------------------------------
# Weighted sum


@dataclass
class RewardResult:
    total: np.ndarray  # [N] float64, weighted sum over functions
    per_function: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N] raw (unweighted)
    failures: dict[str, int] = field(default_factory=dict)  # name -> batches where it raised (errors="zero")


def _call_reward(fn: RewardFn, completions, prompts, answers, extra: dict):
    # prompts/answer go only to functions that accept them, so f(completions) and f(completions, answer) work.
    kwargs = {"prompts": prompts, "answer": answers, **extra}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins/C callables without a signature: pass everything
        return fn(completions, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(completions, **kwargs)


def _to_array(name: str, values, n: int) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward '{name}' returned {type(values).__name__}; it must return a list of {n} floats")
    if len(values) != n:
        raise RewardError(f"reward '{name}' returned {len(values)} values for {n} completions")
    # Numbers only: a bool or a string ("0.5") is a bug in the reward, not a value to coerce.
    wrong = [i for i, v in enumerate(values) if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)]
    if wrong:
        value = values[wrong[0]]
        raise RewardError(f"reward function '{name}' returned {type(value).__name__} {value!r:.40} at index "
                          f"{wrong[0]}: return one int or float per completion (e.g. float(x))")
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        kind = "NaN" if np.isnan(arr[bad[0]]) else "infinite"
        raise RewardError(f"reward function '{name}' returned the {kind} value {values[bad[0]]!r} at index "
                          f"{bad[0]}: return finite numbers")
    total_scale = np.abs(arr).max(initial=0.0)
    if total_scale > MAX_REWARD:
        raise RewardError(f"reward function '{name}' returned {values[int(np.abs(arr).argmax())]!r}, beyond "
                          f"+-{MAX_REWARD:g}: advantages of such values overflow; scale the reward down")
    return arr


def compute_rewards(
    reward_fns: Sequence[tuple[str, RewardFn]],
    weights: Sequence[float] | None,
    completions: Sequence[str],
    prompts=None,
    answers: Sequence[str] | None = None,
    errors: str = "raise",
    **extra,
) -> RewardResult:
    """Run every reward on the batch and sum them with weights (empty/None weights = all 1.0).

    errors="raise": a reward that raises is re-raised as RewardError naming it (chained to its exception).
    errors="zero": its values for this batch become 0.0, failures[name] += 1 and a warning is
    logged. Wrong-length, non-numeric or non-finite return values always raise.
    Extra keyword arguments are passed on to reward functions that accept them.
    """
    if errors not in REWARD_ERRORS:
        raise RewardError(f"errors must be one of {list(REWARD_ERRORS)}, got {errors!r}")
    names = [name for name, _ in reward_fns]
    if not weights:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise RewardError(
            f"{len(weights)} reward weights for {len(names)} reward functions {names}: give one weight each, or none"
        )
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise RewardError(f"reward weights must be finite numbers, got {list(weights)}")
    n = len(completions)
    result = RewardResult(total=np.zeros(n, dtype=np.float64), failures={name: 0 for name in names})
    for (name, fn), weight in zip(reward_fns, weights):
        try:
            values = _call_reward(fn, completions, prompts, answers, extra)
        except Exception as e:
            hint = ""
            if isinstance(e, TypeError):
                hint = " (reward functions get completions as a list of plain strings; see utils/data/rewards.py)"
            if errors == "raise":
                raise RewardError(f"reward function '{name}' failed: {type(e).__name__}: {e}{hint}") from e
            result.failures[name] += 1
            logger.warning("reward function '%s' failed on this batch, its rewards set to 0.0: %s: %s%s",
                           name, type(e).__name__, e, hint)
            values = [0.0] * n
        arr = _to_array(name, values, n)
        result.per_function[name] = arr
        result.total += float(weight) * arr
    return result
