import logging
import textwrap

import numpy as np
import pytest

from mlx_grpo.data.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    RewardResult,
    answers_match,
    compute_rewards,
    correctness_reward,
    count_xml,
    default_reward_names,
    extract_gsm8k_answer,
    extract_xml_answer,
    gsm8k_reward,
    int_reward,
    parse_number,
    resolve_reward_functions,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)

GOOD = "<reasoning>\n48/2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"


def xml(answer_text: str) -> str:
    return f"<reasoning>\nwork\n</reasoning>\n<answer>\n{answer_text}\n</answer>"


# ---- number parsing -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("18", 18.0), ("18.0", 18.0), ("$18", 18.0), (" 1,000 ", 1000.0), ("1000", 1000.0),
    ("-3", -3.0), ("-$3", -3.0), ("+2.5", 2.5), (".5", 0.5), ("72.", 72.0), ("0", 0.0),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", [None, "", "abc", "18 dollars", "1e5", "1/0", "1/2/3", "$", ".", "inf", "nan", "--3",
                                  "1.2.3"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_answers_match():
    for pred in ["18", "18.0", "$18", " 18 "]:
        assert answers_match(pred, "18")
    assert answers_match("1,000", "1000") and answers_match("1000", "1,000")
    assert not answers_match("17", "18")
    assert not answers_match(None, "18")
    assert not answers_match("", "") and not answers_match(" ", "")  # empty never matches
    assert answers_match("blue", " blue")  # non-numeric answers compare as text
    assert not answers_match("blue", "18")


def test_extractors():
    assert extract_xml_answer(GOOD) == "72"
    assert extract_xml_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"  # last block
    assert extract_xml_answer("no tags 72") is None
    assert extract_xml_answer("<answer>\n72") is None  # unclosed
    assert extract_gsm8k_answer("a\n#### 1,234\nmore #### 5") == "1234"  # first match
    assert extract_gsm8k_answer("####72") is None  # nanochat's regex needs the space
    assert extract_gsm8k_answer("#### -5") == "-5"


# ---- built-in rewards ---------------------------------------------------------------------

def test_correctness():
    completions = [GOOD, xml("72.0"), xml("$72"), xml("71"), "72", "<answer>\n72", xml("1,000")]
    answers = ["72"] * 6 + ["1000"]
    assert correctness_reward(completions, answer=answers) == [2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 2.0]


def test_correctness_needs_answers():
    with pytest.raises(RewardError, match="needs reference answers"):
        correctness_reward([GOOD])
    with pytest.raises(RewardError, match="2 completions but 1"):
        correctness_reward([GOOD, GOOD], answer=["72"])


def test_int():
    completions = [GOOD, xml("-3"), xml("72.0"), xml("$72"), xml("1,000"), xml("seventy"), "72"]
    assert int_reward(completions) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_strict_format():
    completions = [
        GOOD,
        "\n" + GOOD,
        "<reasoning>a</reasoning> <answer>b</answer>",
        GOOD + "Thanks!",
        "Sure. " + GOOD,
        "<answer>\n72\n</answer>",
        "<answer>1</answer><reasoning>r</reasoning>",
    ]
    assert strict_format_reward(completions) == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_soft_format():
    completions = [
        GOOD,
        "Sure! <reasoning>x\ny</reasoning>\n\n<answer>1</answer> bye",
        "<answer>1</answer><reasoning>r</reasoning>",
        "<reasoning>r</reasoning> text <answer>1</answer>",
        "nothing",
    ]
    assert soft_format_reward(completions) == [0.5, 0.5, 0.0, 0.0, 0.0]


def test_xmlcount():
    two_answers = "<reasoning>r</reasoning><answer>1</answer>\n<answer>2</answer>"
    cases = {
        GOOD: 0.5,  # trailing "\n" is whitespace: no penalty
        GOOD + "abc": 0.5 - 0.003,
        GOOD + "  abc  \n": 0.5 - 0.003,  # trailing text counted without surrounding whitespace
        "<reasoning>only</reasoning>": 0.25,
        "<answer>1</answer>" + "x" * 10: 0.25 - 0.010,
        two_answers: 0.5 - 0.001 * len("<answer>2</answer>"),  # text after the FIRST </answer>
        "no tags at all": 0.0,
        "</answer>" + "y" * 300: -0.3,
    }
    for text, expected in cases.items():
        assert count_xml(text) == pytest.approx(expected), text
    assert xmlcount_reward(list(cases)) == pytest.approx(list(cases.values()))


def test_gsm8k():
    completions = [
        "48/2 = 24, 48+24 = 72.\n#### 72",
        "#### 1,000",
        "#### 72.0",
        "#### 72.",
        "#### 71\n#### 72",  # first match counts
        "The answer is 72",
        "####72",
        "#### -5",
    ]
    answers = ["72", "1000", "72", "72", "72", "72", "72", "-5"]
    assert gsm8k_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_registry_and_defaults():
    assert set(BUILTIN_REWARDS) == {"correctness", "int", "strict_format", "soft_format", "xmlcount", "gsm8k"}
    assert default_reward_names("nanochat") == ["gsm8k"]
    assert default_reward_names("xml") == ["xmlcount", "soft_format", "strict_format", "int", "correctness"]
    with pytest.raises(ValueError, match="nanochat"):
        default_reward_names("chatml")
    for fn in BUILTIN_REWARDS.values():  # the original signature: prompts/answer optional keywords
        out = fn([GOOD], prompts=[[{"role": "user", "content": "q"}]], answer=["72"], extra="ignored")
        assert len(out) == 1 and isinstance(out[0], float)


# ---- resolving ----------------------------------------------------------------------------

def write_reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        def length_penalty(completions, **kwargs):
            return [-0.01 * len(c) for c in completions]

        def correctness(completions, answer=None, **kwargs):  # overrides the built-in name
            return [9.0 for _ in completions]

        def _helper():
            pass
    """))
    return path


def test_resolve_builtins():
    resolved = resolve_reward_functions(["gsm8k", "xmlcount"])
    assert [name for name, _ in resolved] == ["gsm8k", "xmlcount"]
    assert resolved[0][1] is gsm8k_reward


def test_resolve_from_file(tmp_path):
    path = write_reward_file(tmp_path)
    resolved = dict(resolve_reward_functions(["length_penalty", "correctness", "int"], reward_file=str(path)))
    assert resolved["length_penalty"](["abcd"]) == [pytest.approx(-0.04)]
    assert resolved["correctness"](["x"]) == [9.0]  # the user's file wins over the built-in
    assert resolved["int"] is int_reward


def test_resolve_errors(tmp_path):
    with pytest.raises(RewardError, match=r"unknown reward function 'nope'.*gsm8k"):
        resolve_reward_functions(["nope"])
    path = write_reward_file(tmp_path)
    with pytest.raises(RewardError, match=r"length_penalty"):
        resolve_reward_functions(["_helper"], reward_file=str(path))
    with pytest.raises(RewardError, match="not an existing .py file"):
        resolve_reward_functions(["gsm8k"], reward_file=str(tmp_path / "missing.py"))
    with pytest.raises(RewardError, match="more than once"):
        resolve_reward_functions(["gsm8k", "gsm8k"])
    with pytest.raises(RewardError, match="at least one"):
        resolve_reward_functions([])
    with pytest.raises(RewardError, match="list of strings"):
        resolve_reward_functions("gsm8k")


# ---- compute_rewards ----------------------------------------------------------------------

def test_compute_rewards_weighted_sum():
    fns = resolve_reward_functions(["correctness", "xmlcount"])
    completions = [GOOD, GOOD + "abc", "72"]
    result = compute_rewards(fns, [1.0, 2.0], completions, prompts=None, answers=["72", "72", "72"])
    assert isinstance(result, RewardResult)
    np.testing.assert_allclose(result.per_function["correctness"], [2.0, 2.0, 0.0])
    np.testing.assert_allclose(result.per_function["xmlcount"], [0.5, 0.497, 0.0])  # raw, unweighted
    np.testing.assert_allclose(result.total, [3.0, 2.994, 0.0])
    assert result.failures == {"correctness": 0, "xmlcount": 0}
    # Empty weights mean 1.0 each.
    np.testing.assert_allclose(compute_rewards(fns, [], completions, None, ["72"] * 3).total, [2.5, 2.497, 0.0])


def test_compute_rewards_calls_functions_without_kwargs():
    seen = {}

    def only_completions(completions):
        return [1.0] * len(completions)

    def with_answer(completions, answer):
        seen["answer"] = answer
        return [0.0] * len(completions)

    result = compute_rewards([("a", only_completions), ("b", with_answer)], None, ["x", "y"], ["p", "p"], ["1", "2"])
    np.testing.assert_allclose(result.total, [1.0, 1.0])
    assert seen["answer"] == ["1", "2"]


def test_compute_rewards_bad_weights():
    fns = resolve_reward_functions(["correctness", "xmlcount"])
    with pytest.raises(RewardError, match="1 reward weights for 2"):
        compute_rewards(fns, [1.0], [GOOD], None, ["72"])
    with pytest.raises(RewardError, match="finite"):
        compute_rewards(fns, [1.0, float("nan")], [GOOD], None, ["72"])


@pytest.mark.parametrize("values, message", [
    ([1.0], "returned 1 values for 2"),
    ([1.0, float("nan")], "the NaN value nan at index 1"),
    ([1.0, float("inf")], "the infinite value inf at index 1"),
    ([1.0, None], "'bad' returned NoneType None at index 1"),
    ([1.0, True], "'bad' returned bool True at index 1"),  # never coerced to 1.0
    (["0.5", 1.0], "'bad' returned str '0.5' at index 0"),  # never parsed
    ([1.0, 1e308], "beyond"),  # finite, but its advantages would not be
    (0.5, "must return a list"),
])
def test_compute_rewards_bad_return_values(values, message):
    def bad(completions, **kwargs):
        return values

    for errors in ("raise", "zero"):  # bad values are bugs: always an error
        with pytest.raises(RewardError, match=message):
            compute_rewards([("bad", bad)], None, ["x", "y"], None, None, errors=errors)


def test_numpy_numbers_are_numbers():
    values = compute_rewards([("np", lambda completions, **kw: np.array([0.5, 1], dtype=np.float32))], None,
                             ["x", "y"], None, None)
    assert values.total.tolist() == [0.5, 1.0]


def test_fraction_answers_compare_as_numbers():
    assert parse_number("3/4") == 0.75 and parse_number("-1/2") == -0.5
    assert parse_number("1/0") is None and parse_number("1/2/3") is None and parse_number("a/2") is None
    assert answers_match("0.75", "3/4") and answers_match("3/4", "3/4") and not answers_match("3", "3/4")
    assert gsm8k_reward(["so #### 3/4"], answer=["3/4"]) == [1.0]
    assert gsm8k_reward(["so #### 3"], answer=["3/4"]) == [0.0]


def test_compute_rewards_raising_function_reraises_with_name():
    def boom(completions, **kwargs):
        raise KeyError("missing field")

    with pytest.raises(RewardError, match="reward function 'boom' failed: KeyError") as info:
        compute_rewards([("boom", boom)], None, ["x"], None, None)
    assert isinstance(info.value.__cause__, KeyError)


def test_compute_rewards_errors_zero_counts_and_warns(caplog):
    def boom(completions, **kwargs):
        raise RuntimeError("flaky")

    fns = [("boom", boom), ("xmlcount", xmlcount_reward)]
    with caplog.at_level(logging.WARNING, logger="mlx_grpo.data.rewards"):
        result = compute_rewards(fns, [1.0, 1.0], [GOOD, "x"], None, None, errors="zero")
    np.testing.assert_allclose(result.per_function["boom"], [0.0, 0.0])
    np.testing.assert_allclose(result.total, [0.5, 0.0])
    assert result.failures == {"boom": 1, "xmlcount": 0}
    assert any("'boom' failed" in r.getMessage() and "flaky" in r.getMessage() for r in caplog.records)


def test_original_style_reward_gets_a_hint():
    def original_style(completions, **kwargs):  # the original wrapped completions as [{"content": ...}]
        return [1.0 if c[0]["content"] else 0.0 for c in completions]

    with pytest.raises(RewardError, match="plain strings"):
        compute_rewards([("original_style", original_style)], None, ["x"], None, None)


def test_compute_rewards_rejects_unknown_errors_mode():
    with pytest.raises(RewardError, match=r"one of \['raise', 'zero'\], got 'ignore'"):
        compute_rewards([("int", int_reward)], None, ["x"], None, None, errors="ignore")
