"""`${...}` substitution: variable names and small arithmetic, evaluated over a whitelisted AST (never `eval`)."""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

PLACEHOLDER = re.compile(r"\$\{([^{}]*)\}")
MAX_MAGNITUDE = 10**18

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Not: operator.not_,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "int": int,
    "float": float,
    "round": round,
    "abs": abs,
    "sqrt": math.sqrt,
}


class ExpressionError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class Scope:
    """Variables visible to `${...}`; a variable may refer to others, resolved lazily with cycle detection."""

    def __init__(self, raw: Mapping[str, Any], parent: Scope | None = None):
        self.raw = dict(raw)
        self.parent = parent
        self._resolved: dict[str, Any] = {}
        self._resolving: list[str] = []
        self.used: set[str] = set()

    def names(self) -> set[str]:
        return set(self.raw) | (self.parent.names() if self.parent else set())

    def __contains__(self, name: str) -> bool:
        return name in self.raw or (self.parent is not None and name in self.parent)

    def get(self, name: str) -> Any:
        self.used.add(name)
        if name not in self.raw:
            if self.parent is not None and name in self.parent:
                return self.parent.get(name)
            close = difflib.get_close_matches(name, sorted(self.names()), n=1)
            raise ExpressionError(
                f"unknown variable {name!r}",
                hint=f"did you mean {close[0]!r}?" if close else "define it under vars: or pass it as a param",
            )
        if name in self._resolved:
            return self._resolved[name]
        if name in self._resolving:
            cycle = " → ".join([*self._resolving[self._resolving.index(name) :], name])
            raise ExpressionError(f"variables refer to each other in a cycle: {cycle}")
        self._resolving.append(name)
        try:
            value = substitute(self.raw[name], self)
        finally:
            self._resolving.pop()
        self._resolved[name] = value
        return value


def substitute(value: Any, scope: Scope) -> Any:
    """Replace `${expr}` in strings (recursively in lists and dicts). A whole-string `${expr}` keeps its type."""
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value.strip())
        if whole:
            return evaluate(whole.group(1), scope)
        if "${" in value:
            return PLACEHOLDER.sub(lambda m: str(evaluate(m.group(1), scope)), value)
        return value
    if isinstance(value, list):
        return [substitute(v, scope) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, scope) for k, v in value.items()}
    return value


def evaluate(expression: str, scope: Scope) -> Any:
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"cannot parse ${{{expression}}}: {exc.msg}") from exc
    return _Evaluator(scope, expression).visit(tree.body)


class _Evaluator:
    def __init__(self, scope: Scope, text: str):
        self.scope = scope
        self.text = text

    def visit(self, node: ast.AST) -> Any:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise ExpressionError(
                f"${{{self.text}}}: {type(node).__name__} is not allowed",
                hint="expressions may use numbers, strings, variables, + - * / // % **, comparisons, "
                "and/or/not, `a if c else b`, and " + ", ".join(FUNCTIONS),
            )
        result = method(node)
        if isinstance(result, int | float) and not isinstance(result, bool) and abs(result) > MAX_MAGNITUDE:
            raise ExpressionError(f"${{{self.text}}} is too large ({result:.3g})")
        return result

    def _Constant(self, node: ast.Constant) -> Any:
        if not isinstance(node.value, int | float | str | bool | type(None)):
            raise ExpressionError(f"${{{self.text}}}: constant {node.value!r} is not allowed")
        return node.value

    def _Name(self, node: ast.Name) -> Any:
        return self.scope.get(node.id)

    def _BinOp(self, node: ast.BinOp) -> Any:
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, ast.Pow) and (not isinstance(right, int | float) or abs(right) > 64):
            raise ExpressionError(f"${{{self.text}}}: exponents are limited to 64")
        op = _BINARY.get(type(node.op))
        if op is None:
            raise ExpressionError(f"${{{self.text}}}: operator {type(node.op).__name__} is not allowed")
        try:
            return op(left, right)
        except (TypeError, ZeroDivisionError, OverflowError, ValueError) as exc:
            raise ExpressionError(f"${{{self.text}}}: {exc}") from exc

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        op = _UNARY.get(type(node.op))
        if op is None:
            raise ExpressionError(f"${{{self.text}}}: operator {type(node.op).__name__} is not allowed")
        try:
            return op(self.visit(node.operand))
        except TypeError as exc:
            raise ExpressionError(f"${{{self.text}}}: {exc}") from exc

    def _Compare(self, node: ast.Compare) -> Any:
        left = self.visit(node.left)
        for op_node, right_node in zip(node.ops, node.comparators, strict=True):
            op = _COMPARE.get(type(op_node))
            if op is None:
                raise ExpressionError(f"${{{self.text}}}: comparison {type(op_node).__name__} is not allowed")
            right = self.visit(right_node)
            try:
                if not op(left, right):
                    return False
            except TypeError as exc:
                raise ExpressionError(f"${{{self.text}}}: {exc}") from exc
            left = right
        return True

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        is_and = isinstance(node.op, ast.And)
        value: Any = is_and
        for item in node.values:
            value = self.visit(item)
            if bool(value) != is_and:
                return value
        return value

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.visit(node.body) if self.visit(node.test) else self.visit(node.orelse)

    def _Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise ExpressionError(f"${{{self.text}}}: only these functions may be called: {', '.join(FUNCTIONS)}")
        args = [self.visit(a) for a in node.args]
        try:
            return FUNCTIONS[node.func.id](*args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ExpressionError(f"${{{self.text}}}: {exc}") from exc
