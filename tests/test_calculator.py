import builtins
import json
import re

import pytest

from mlx_grpo.data.gsm8k import default_gsm8k_path
from mlx_grpo.generation import calculator
from mlx_grpo.generation.calculator import CALCULATOR_MAX_EXPR_CHARS, CalculatorTool, ToolCall, evaluate_expression


@pytest.fixture
def no_code_execution(monkeypatch):
    """Fail the test if anything is eval'd, exec'd, or compiled to bytecode (ast-only is fine)."""
    import ast

    real_compile = builtins.compile

    def guarded_compile(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "calculator compiled code to run"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("calculator called eval/exec")

    monkeypatch.setattr(builtins, "compile", guarded_compile)
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)


@pytest.mark.parametrize("expr, expected", [
    ("2+3*4", "14"),
    ("(1.5+2)/7", "0.5"),
    ("10/4", "2.5"),
    ("10/5", "2.0"),  # division always gives a float, like nanochat's str(eval(...))
    ("-3*-2", "6"),
    ("+4 - -1", "5"),
    ("  2 + 3 ", "5"),
    ("0.2*50", "10.0"),
    ("123456789*1000", "123456789000"),
    ("1,000+1", "1001"),
    ("1,000,000*2", "2000000"),
    ("((((7))))", "7"),
    (".5+5.", "5.5"),
    ("1000000000000000", "1000000000000000"),  # exactly the bound
])
def test_valid_expressions(expr, expected, no_code_execution):
    assert evaluate_expression(expr) == expected


@pytest.mark.parametrize("expr", [
    "", "   ", "2+", "abc", "2**10", "7//2", "7%2", "1/0", "1/(2-2)", "1/0.0", "1..2", "...",
    "007", "(2+3", "2+3)", "1,2", "1,0000", "2\t+3", "2;3", "[1]", "1e5",
    "x" * 200, "1+" * 60 + "1",
])
def test_invalid_expressions(expr, no_code_execution):
    assert evaluate_expression(expr) is None


@pytest.mark.parametrize("expr", [
    "__import__('os').system('x')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "9**9**9",
    "10**1000",
    "1e308*10",
    "99999999999999999999",  # literal too large
    "9" + "*9" * 40,  # product far beyond the bound
    "1000000000000000*10/100",  # intermediate beyond the bound even though the result is small
    "(" * 60 + "1" + ")" * 60,  # too long
    "(" * 1000 + "1" + ")" * 1000,
    "-" * 99 + "1",  # within the length limit, but over the AST node limit
    "lambda: 0",
    "'1'+'2'",
    "open('f')",
])
def test_hostile_expressions_are_rejected_without_running_code(expr, no_code_execution):
    assert evaluate_expression(expr) is None


def test_nesting_within_length_limit_is_fine():
    depth = (CALCULATOR_MAX_EXPR_CHARS - 1) // 2
    assert evaluate_expression("(" * depth + "1" + ")" * depth) == "1"
    assert evaluate_expression("(" * (depth + 1) + "1" + ")" * (depth + 1)) is None
    assert evaluate_expression("-" * 41 + "1") == "-1"


def test_max_chars_constant_and_type_error():
    assert CALCULATOR_MAX_EXPR_CHARS == 100
    with pytest.raises(TypeError):
        evaluate_expression(12)


def test_node_limit(monkeypatch):
    monkeypatch.setattr(calculator, "CALCULATOR_MAX_NODES", 5)
    assert evaluate_expression("1+2") == "3"
    assert evaluate_expression("1+2+3+4") is None


def test_gsm8k_annotations_evaluate_to_their_results():
    """The test split's <<expr=result>> annotations: the calculator reproduces almost all of them."""
    ok = total = 0
    with open(default_gsm8k_path("test")) as f:
        for line in f:
            for inner in re.findall(r"<<([^>]+)>>", json.loads(line)["answer"]):
                if "=" not in inner:
                    continue
                expr, result = inner.rsplit("=", 1)
                try:
                    expected = float(result.replace(",", ""))
                except ValueError:  # a few annotations have results like "3/4"
                    continue
                total += 1
                out = evaluate_expression(expr)
                ok += out is not None and float(out) == pytest.approx(expected, rel=1e-6)
    assert total > 4000
    assert ok / total > 0.999


class CharTokenizer:
    """One token a character (its code point); the four tool specials above the characters."""

    SPECIALS = {"<|python_start|>": 1000, "<|python_end|>": 1001, "<|output_start|>": 1002, "<|output_end|>": 1003}

    def special_token_id(self, name):
        return self.SPECIALS[name]

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_the_tool_call_protocol():
    tool = CalculatorTool.for_tokenizer(CharTokenizer())
    start, end, out_start, out_end = tool.python_start, tool.python_end, tool.output_start, tool.output_end
    reader = tool.reader()

    def feed(*pieces):
        closed = []
        for piece in pieces:
            for token in (piece if isinstance(piece, list) else [piece]):
                result = reader.feed(token)
                if result is not None:
                    closed.append(result)
        return closed

    assert feed(tool.tokenizer.encode("so "), end) == []  # no open call: a python_end is text
    assert feed(start, tool.tokenizer.encode("6*7"), end) == [(ToolCall("6*7", "42"), [out_start, 52, 50, out_end])]
    assert feed(start, tool.tokenizer.encode("1+"), start, tool.tokenizer.encode("2+2"), end) == [
        (ToolCall("2+2", "4"), [out_start, 52, out_end])]  # a second python_start starts the call over
    assert feed(start, end) == [(ToolCall("", None), [])]  # an empty call: a failure, nothing forced
    assert feed(start, tool.tokenizer.encode("2**99"), end) == [(ToolCall("2**99", None), [])]
    assert feed(end, out_start, out_end) == []  # closed again: nothing open
