"""nanochat's calculator tool: the one tool-call protocol (CalculatorTool, ToolCallReader) and its safe arithmetic.

The protocol, as nanochat's engine reads it, token by token along a completion (rollouts, evaluation and
inference all read it through utils/generation/engine.py):
- <|python_start|> opens a call; another <|python_start|> inside an open call starts it over;
- <|python_end|> closes the open call; a <|python_end|> with no open call is ordinary text;
- the tokens between them, decoded, are the expression. Valid arithmetic forces
  <|output_start|> result <|output_end|> into the sequence; anything else forces nothing.
- every closed call is one ToolCall with its result or None, an empty one too (nanochat's engine
  skips an empty call silently; here it counts as a failed call, so the tool metrics show it).

Safe arithmetic: the expression comes from model output, so it is never given to eval/exec: it is parsed with
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
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------
# The tool-call protocol


@dataclass(frozen=True)
class ToolCall:
    """One closed call: the expression as decoded and its result (None: not valid arithmetic, nothing forced)."""

    expression: str
    result: str | None


@dataclass(frozen=True)
class CalculatorTool:
    """<|python_start|> expr <|python_end|> -> forced <|output_start|> result <|output_end|>."""

    tokenizer: object  # nanochat's TiktokenTokenizerWrapper (encode/decode/special ids)
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def for_tokenizer(cls, tok) -> "CalculatorTool":
        ids = [tok.special_token_id(name) for name in
               ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")]
        return cls(tok, *ids)

    def call(self, expression_tokens: list) -> tuple[ToolCall, list]:
        """Evaluate one call: its record and the tokens to force after it (none for an invalid expression)."""
        expression = self.tokenizer.decode(expression_tokens)
        result = evaluate_expression(expression)
        forced = [] if result is None else [self.output_start, *self.tokenizer.encode(result), self.output_end]
        return ToolCall(expression, result), forced

    def reader(self) -> "ToolCallReader":
        return ToolCallReader(self)


class ToolCallReader:
    """The protocol (see the module docstring) read along one completion: feed() every token as it is appended."""

    def __init__(self, tool: CalculatorTool):
        self.tool = tool
        self.expression = None  # the open call's tokens; None outside a call

    def feed(self, token: int) -> tuple[ToolCall, list] | None:
        """(the call and the tokens to force) when `token` closes a call, else None."""
        if token == self.tool.python_start:
            self.expression = []
        elif self.expression is not None:
            if token == self.tool.python_end:
                expression, self.expression = self.expression, None
                return self.tool.call(expression)
            self.expression.append(token)
        return None
