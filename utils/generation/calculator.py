"""Safe arithmetic for the calculator tool (nanochat's <|python_start|> expr <|python_end|>).

The expression comes from model output, so it is never given to eval/exec: it is parsed with
Python's ast in "eval" mode and the tree is walked here, allowing only numbers, + - * /,
unary + - and parentheses. Everything is bounded (length, node count, magnitudes), so a hostile
expression costs microseconds and can execute nothing.

Conventions (matching nanochat's engine so that tool outputs look like its SFT data):
- Allowed characters: digits, + - * / . ( ) and spaces, as nanochat. "**" (power), "//" and
  "%" are rejected, as are names, calls, attributes, strings, subscripts and exponents ("1e5").
- Commas: nanochat deleted every comma. Here only thousands separators are removed
  ("1,000+1" -> "1000+1"); any other comma ("1,2", "f(1,2)") makes the expression invalid,
  because a stray comma is a tuple in Python and guessing its meaning could give a wrong result.
- Result text is Python's str() of the value, like nanochat: integer arithmetic stays int
  ("2+3*4" -> "14"), any division or float literal gives a float ("10/5" -> "2.0",
  "10/4" -> "2.5"). Results and intermediates with abs > 1e15 are rejected, so str() never
  switches to exponent notation for large values (tiny values such as "1e-06" can still appear).
- Invalid input of any kind gives None (division by zero, syntax errors, too long, too deep,
  too large); the caller counts those failures. Only a non-str argument raises (a caller bug).
"""

from __future__ import annotations

import ast
import math
import operator
import re

CALCULATOR_MAX_EXPR_CHARS = 100  # longest GSM8K annotation is far shorter; see tests
CALCULATOR_MAX_NODES = 100  # AST nodes; 100 chars cannot legitimately need more
CALCULATOR_MAX_ABS = 1e15  # bound on literals, intermediates and the result

_ALLOWED_CHARS = frozenset("0123456789+-*/.() ")
# A comma between digits that is followed by exactly three digits: "1,000", "12,345,678".
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Invalid(Exception):
    """Internal: the expression is not acceptable; evaluate_expression turns it into None."""


def _check_magnitude(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid("non-finite")
    if abs(value) > CALCULATOR_MAX_ABS:
        raise _Invalid("too large")
    return value


def _evaluate_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate_node(node.body)
    if isinstance(node, ast.Constant):
        # bool is an int subclass but cannot come from the allowed characters; reject anyway.
        if type(node.value) not in (int, float):
            raise _Invalid("not a number")
        return _check_magnitude(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left = _evaluate_node(node.left)
        right = _evaluate_node(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Invalid("division by zero")
        return _check_magnitude(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _check_magnitude(_UNARY_OPS[type(node.op)](_evaluate_node(node.operand)))
    raise _Invalid(f"{type(node).__name__} is not allowed")


def evaluate_expression(expr: str) -> str | None:
    """Evaluate a calculator expression; return str(result), or None if it is not valid.

    Examples: "2+3*4" -> "14", "10/4" -> "2.5", "(1.5+2)/7" -> "0.5", "1,000+1" -> "1001",
    "2**10" -> None, "1/0" -> None, "__import__('os')" -> None.
    """
    if not isinstance(expr, str):
        raise TypeError(f"evaluate_expression expects a str, got {type(expr).__name__}")
    if len(expr) > CALCULATOR_MAX_EXPR_CHARS:
        return None
    expr = _THOUSANDS_COMMA.sub("", expr).strip()
    if not expr or not set(expr) <= _ALLOWED_CHARS or "**" in expr or "//" in expr:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None  # not arithmetic (e.g. "2+", "007", unbalanced parentheses)
    if sum(1 for _ in ast.walk(tree)) > CALCULATOR_MAX_NODES:
        return None
    try:
        result = _evaluate_node(tree)
    except _Invalid:
        return None
    return str(result)
