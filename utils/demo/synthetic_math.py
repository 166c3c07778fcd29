"""Synthetic GSM8K-style word problems for the offline demo (one or two arithmetic steps).

Each problem is a short story with small numbers (1 to 3 digits, every result below 250),
a worked solution with GSM8K's calculator annotations and a "#### N" final answer:

    question: "Mia has 12 apples. She gets 7 more apples. How many apples does Mia have now?"
    solution: "That makes 12+7=<<12+7=19>>19 apples.\\n#### 19"

mlx_grpo.data.gsm8k.gsm8k_solution_to_nanochat_parts turns each <<expr=result>> into a calculator call
(python part) plus its forced output, so supervised training teaches the model to call the tool.
The result inside an annotation is exactly what the project's calculator prints for expr
("12/4" -> "3.0"), so the tool outputs seen in training are the ones forced at inference;
the text after it and the "#### N" answer are always integers. without_calculator() gives the
same solution with the results written from memory ("That makes 19 apples.\\n#### 19").

Everything is drawn from a random.Random(seed): same arguments, same problems, on any platform.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_grpo.generation.calculator import evaluate_expression

# "expr=<<expr=out>>N" as _step writes it; group 1 is N.
_CALCULATOR_STEP = re.compile(r"[0-9+\-*/]+=<<[^>]*>>(\d+)")

NAMES = {  # name -> subject pronoun
    "Mia": "she", "Tom": "he", "Ava": "she", "Leo": "he", "Zoe": "she", "Sam": "he",
    "Nora": "she", "Ben": "he", "Lily": "she", "Omar": "he", "Emma": "she", "Raj": "he",
    "Ines": "she", "Kofi": "he", "Hana": "she", "Luis": "he", "Anna": "she", "Jack": "he",
    "Maya": "she", "Ivan": "he",
}
ITEMS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells",
    "stamps", "flowers", "eggs", "coins", "toys", "candies", "balloons", "beads",
]
CONTAINERS = {"box": "boxes", "bag": "bags", "jar": "jars", "basket": "baskets", "pack": "packs", "crate": "crates"}
PLACES = ["shop", "school", "garden", "library", "kitchen", "park"]

ONE_STEP_KINDS = ("add", "sub", "mul", "div")
TWO_STEP_KINDS = ("add_sub", "mul_add", "mul_sub", "add_mul", "add_div", "div_sub")
KINDS = ONE_STEP_KINDS + TWO_STEP_KINDS


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # GSM8K-style: sentences with <<expr=result>> annotations, then "\n#### N"
    answer: int
    kind: str  # one of KINDS

    def to_gsm8k_row(self) -> dict:
        """The row as openai/gsm8k stores it: {"question", "answer"} (answer = the worked solution)."""
        return {"question": self.question, "answer": self.solution}


def _step(expr: str) -> tuple[str, int]:
    """'expr=<<expr=out>>N' for one calculator step, and N (the integer result)."""
    out = evaluate_expression(expr)
    if out is None:
        raise ValueError(f"the calculator cannot evaluate {expr!r}: a template produced a bad expression")
    value = float(out)
    if value != int(value) or value < 0:
        raise ValueError(f"{expr!r} = {out}: templates must give non-negative integer results")
    return f"{expr}=<<{expr}={out}>>{int(value)}", int(value)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _object_pronoun(he: str) -> str:
    return {"he": "him", "she": "her"}[he]


# --------------------------------------------------------------------------------------------
# Templates: each draws its numbers and wording from rng and returns (question, solution, answer).
# Numbers are drawn so that every intermediate result is a non-negative integer.


def _add(rng, name, he, item, other, container, containers, place):
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    s, r = _step(f"{a}+{b}")
    question = rng.choice([
        f"{name} has {a} {item}. {_cap(he)} gets {b} more {item}. How many {item} does {name} have now?",
        f"There are {a} {item} in the {place}. {name} brings {b} more. How many {item} are in the {place} now?",
        f"{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {he} collect in all?",
    ])
    return question, f"That makes {s} {item}.", r


def _sub(rng, name, he, item, other, container, containers, place):
    b = rng.randint(2, 40)
    a = b + rng.randint(1, 50)
    s, r = _step(f"{a}-{b}")
    question = rng.choice([
        f"{name} has {a} {item}. {_cap(he)} gives {b} of them to {other}. How many {item} does {name} have left?",
        f"The {place} had {a} {item}. {b} {item} were sold. How many {item} are left?",
        f"{name} needs {a} {item} and already has {b}. How many more {item} does {he} need?",
    ])
    return question, f"That leaves {s} {item}.", r


def _mul(rng, name, he, item, other, container, containers, place):
    a, b = rng.randint(2, 12), rng.randint(2, 15)
    s, r = _step(f"{a}*{b}")
    question = rng.choice([
        f"{name} buys {a} {containers} of {item}. Each {container} holds {b} {item}. How many {item} does {he} buy?",
        f"{name} gets {b} {item} every day. How many {item} does {he} get in {a} days?",
        f"There are {a} rows with {b} {item} in each row. How many {item} are there?",
    ])
    return question, f"There are {s} {item}.", r


def _div(rng, name, he, item, other, container, containers, place):
    b, q = rng.randint(2, 9), rng.randint(2, 15)
    a = b * q
    s, r = _step(f"{a}/{b}")
    question = rng.choice([
        f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?",
        f"{name} packs {a} {item} into {containers} of {b}. How many {containers} does {he} fill?",
        f"{a} {item} are split evenly into {b} {containers}. How many {item} are in each {container}?",
    ])
    return question, f"Each gets {s}.", r


def _add_sub(rng, name, he, item, other, container, containers, place):
    a, b = rng.randint(5, 50), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    s1, r1 = _step(f"{a}+{b}")
    s2, r2 = _step(f"{r1}-{c}")
    question = rng.choice([
        f"{name} has {a} {item}. {_cap(he)} buys {b} more and then gives {c} to {other}. How many {item} does {he} have now?",
        f"A {place} had {a} {item}. It got {b} more in the morning and used {c} in the afternoon. How many {item} are left?",
    ])
    return question, f"First there are {s1} {item}.\nThen {s2} are left.", r2


def _mul_add(rng, name, he, item, other, container, containers, place):
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 30)
    s1, r1 = _step(f"{a}*{b}")
    s2, r2 = _step(f"{r1}+{c}")
    question = rng.choice([
        f"{name} buys {a} {containers} with {b} {item} in each. {_cap(he)} already had {c} {item}. How many {item} does {he} have now?",
        f"{name} makes {b} {item} a day for {a} days, then {other} gives {_object_pronoun(he)} {c} more. How many {item} does {name} have?",
    ])
    return question, f"That is {s1} {item}.\nIn total {s2} {item}.", r2


def _mul_sub(rng, name, he, item, other, container, containers, place):
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    c = rng.randint(1, a * b - 1)
    s1, r1 = _step(f"{a}*{b}")
    s2, r2 = _step(f"{r1}-{c}")
    question = rng.choice([
        f"{name} has {a} {containers} of {b} {item}. {_cap(he)} uses {c} {item}. How many {item} are left?",
        f"There are {a} {containers} with {b} {item} each. {other} takes {c} {item}. How many {item} remain?",
    ])
    return question, f"There are {s1} {item}.\nThen {s2} are left.", r2


def _add_mul(rng, name, he, item, other, container, containers, place):
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 12)
    s1, r1 = _step(f"{a}+{b}")
    s2, r2 = _step(f"{r1}*{c}")
    question = rng.choice([
        f"Each {container} holds {c} {item}. {name} buys {a} {containers} on Monday and {b} on Tuesday. How many {item} did {he} buy?",
        f"{name} fills {a} {containers} and {other} fills {b} {containers}. Each {container} has {c} {item}. How many {item} is that?",
    ])
    return question, f"That is {s1} {containers}.\nSo {s2} {item}.", r2


def _add_div(rng, name, he, item, other, container, containers, place):
    c, q = rng.randint(2, 8), rng.randint(2, 12)
    total = c * q
    a = rng.randint(1, total - 1)
    b = total - a
    s1, r1 = _step(f"{a}+{b}")
    s2, r2 = _step(f"{r1}/{c}")
    question = rng.choice([
        f"{name} had {a} {item} and found {b} more. {_cap(he)} shares them equally among {c} friends. How many {item} does each friend get?",
        f"{name} has {a} {item} and {other} has {b}. They put them into {c} {containers} equally. How many {item} go in each {container}?",
    ])
    return question, f"Together there are {s1} {item}.\nEach gets {s2}.", r2


def _div_sub(rng, name, he, item, other, container, containers, place):
    b, q = rng.randint(2, 8), rng.randint(3, 15)
    a = b * q
    c = rng.randint(1, q - 1)
    s1, r1 = _step(f"{a}/{b}")
    s2, r2 = _step(f"{r1}-{c}")
    question = rng.choice([
        f"{a} {item} are shared equally among {b} kids. Each kid gives away {c}. How many {item} does each kid have left?",
        f"{name} splits {a} {item} into {b} equal {containers} and takes {c} out of one {container}. How many {item} are left in that {container}?",
    ])
    return question, f"Each has {s1}.\nThen {s2} are left.", r2


_TEMPLATES = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div,
    "add_sub": _add_sub, "mul_add": _mul_add, "mul_sub": _mul_sub,
    "add_mul": _add_mul, "add_div": _add_div, "div_sub": _div_sub,
}


def generate_problem(rng: random.Random, kind: str) -> Problem:
    """One problem of the given kind, wording and numbers drawn from rng."""
    if kind not in _TEMPLATES:
        raise ValueError(f"unknown problem kind {kind!r}; choose from {', '.join(KINDS)}")
    name, other = rng.sample(sorted(NAMES), 2)
    item, container, place = rng.choice(ITEMS), rng.choice(sorted(CONTAINERS)), rng.choice(PLACES)
    question, steps, answer = _TEMPLATES[kind](
        rng, name, NAMES[name], item, other, container, CONTAINERS[container], place)
    return Problem(question=question, solution=f"{steps}\n#### {answer}", answer=answer, kind=kind)


def generate_problems(num: int, seed: int, kinds: tuple = KINDS, exclude_questions=frozenset()) -> list[Problem]:
    """`num` problems with distinct question texts, kinds cycled evenly, none in exclude_questions."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    bad = [k for k in kinds if k not in _TEMPLATES]
    if bad or not kinds:
        raise ValueError(f"unknown problem kinds {bad or '(none given)'}; choose from {', '.join(KINDS)}")
    rng = random.Random(seed)
    seen, problems = set(exclude_questions), []
    attempts = 0
    while len(problems) < num:
        attempts += 1
        if attempts > 50 * num + 1000:
            raise ValueError(f"could not draw {num} distinct problems; ask for fewer")
        problem = generate_problem(rng, kinds[len(problems) % len(kinds)])
        if problem.question in seen:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def make_splits(num_train: int, num_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, test): test is drawn first, train never repeats a test question (held out by text)."""
    test = generate_problems(num_test, seed=seed * 2 + 1)
    train = generate_problems(num_train, seed=seed * 2, exclude_questions={p.question for p in test})
    return train, test


def without_calculator(solution: str) -> str:
    """The same solution answered from memory: each "expr=<<expr=out>>N" becomes just "N".

    Used for part of the supervised warm-up so the model learns two habits, calling the
    calculator (reliable) and guessing results (mostly wrong); GRPO then learns which pays.
    """
    return _CALCULATOR_STEP.sub(r"\1", solution)


def write_jsonl(problems: list[Problem], path: str | Path) -> Path:
    """GSM8K-format .jsonl: one {"question", "answer"} object per line (mlx_grpo.data.gsm8k.load_gsm8k reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_gsm8k_row(), ensure_ascii=False) + "\n")
    return path


def write_dataset(folder: str | Path, num_train: int, num_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Write folder/train.jsonl and folder/test.jsonl (a dataset_path folder for the trainer)."""
    train, test = make_splits(num_train, num_test, seed)
    write_jsonl(train, Path(folder) / "train.jsonl")
    write_jsonl(test, Path(folder) / "test.jsonl")
    return train, test
