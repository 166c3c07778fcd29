"""The synthetic word-problem generator behind the demo data (utils/demo/synthetic_math.py)."""

import random
import re

import pytest

from mlx_grpo.data.gsm8k import gsm8k_reference_answer, gsm8k_solution_to_nanochat_parts, load_gsm8k
from mlx_grpo.demo.synthetic_math import (
    KINDS,
    ONE_STEP_KINDS,
    generate_problem,
    generate_problems,
    make_splits,
    without_calculator,
    write_dataset,
)
from mlx_grpo.generation.calculator import evaluate_expression

ANNOTATION = re.compile(r"<<([^=>]+)=([^>]+)>>(\d+)")


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_gsm8k_shaped_and_correct(kind):
    rng = random.Random(kind)
    for _ in range(40):
        p = generate_problem(rng, kind)
        assert p.kind == kind and isinstance(p.answer, int) and p.answer >= 0
        assert p.solution.endswith(f"\n#### {p.answer}")
        assert gsm8k_reference_answer(p.solution) == str(p.answer)
        steps = ANNOTATION.findall(p.solution)
        assert len(steps) == (1 if kind in ONE_STEP_KINDS else 2)
        for expr, out, copied in steps:
            # The annotation holds exactly what the calculator tool prints; the text copies it as an int.
            assert evaluate_expression(expr) == out
            assert float(out) == int(copied)
            assert f"{expr}=<<" in p.solution  # GSM8K style: the expression is written before the call
        assert int(steps[-1][2]) == p.answer
        # Operands stay small: 1-3 digits.
        assert all(len(n) <= 3 for n in re.findall(r"\d+", p.question))


def test_solution_becomes_calculator_parts():
    p = generate_problem(random.Random(0), "add_div")
    parts = gsm8k_solution_to_nanochat_parts(p.solution)
    types = [part["type"] for part in parts]
    assert types.count("python") == 2 and types.count("python_output") == 2
    for call, output in zip(parts, parts[1:]):
        if call["type"] == "python":
            assert output == {"type": "python_output", "text": evaluate_expression(call["text"])}
    assert parts[-1]["text"].endswith(f"#### {p.answer}")


def test_problems_are_distinct_and_kinds_balanced():
    problems = generate_problems(200, seed=0)
    assert len({p.question for p in problems}) == 200
    counts = {k: sum(p.kind == k for p in problems) for k in KINDS}
    assert set(counts.values()) == {200 // len(KINDS)}
    assert len({p.question.split()[0] for p in problems}) > 10  # varied names and wordings


def test_splits_hold_out_test_questions():
    train, test = make_splits(300, 60, seed=1)
    assert len(train) == 300 and len(test) == 60
    assert not {p.question for p in train} & {p.question for p in test}
    assert make_splits(300, 60, seed=1) == (train, test)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown problem kind"):
        generate_problem(random.Random(0), "pow")
    with pytest.raises(ValueError, match="unknown problem kinds"):
        generate_problems(3, seed=0, kinds=("add", "mod"))
    with pytest.raises(ValueError, match="num must be >= 0"):
        generate_problems(-1, seed=0)


def test_written_dataset_loads_as_gsm8k(tmp_path):
    train, test = write_dataset(tmp_path, num_train=20, num_test=5, seed=2)
    loaded = load_gsm8k(dataset_path=str(tmp_path), split="test")
    assert [e.question for e in loaded] == [p.question for p in test]
    assert [e.answer for e in loaded] == [str(p.answer) for p in test]
    assert [e.solution for e in loaded] == [p.solution for p in test]
    assert len(load_gsm8k(dataset_path=str(tmp_path), split="train")) == 20


def test_without_calculator_keeps_the_text_and_drops_the_calls():
    problem = generate_problem(random.Random(5), "add_mul")
    direct = without_calculator(problem.solution)
    assert "<<" not in direct and "=" not in direct
    assert direct.endswith(f"\n#### {problem.answer}")
    assert gsm8k_solution_to_nanochat_parts(direct) == [{"type": "text", "text": direct}]
    assert without_calculator("That makes 12+7=<<12+7=19>>19 apples.\n#### 19") == "That makes 19 apples.\n#### 19"
