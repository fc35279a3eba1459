"""`${...}` substitution: variable names and small arithmetic, evaluated over a whitelisted AST (never `eval`).

Each node type the evaluator meets must be on its list, and every result is bounded in magnitude and length,
so an expression can compute a size (`${d_model * 4}`) but never reach Python, a file or all the memory.
"""

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
MAX_EXPRESSION = 500  # characters in one `${...}`: keeps the parser and the evaluator's recursion shallow
MAX_STRING = 10_000  # characters in a string result: `${'a' * 10**9}` must not allocate a gigabyte
MAX_VAR_DEPTH = 64  # variables referring to variables referring to ...
MAX_VALUES = 200_000  # items in one substituted value: as many as a spec file may hold (see load.MAX_VALUES)

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
    def __init__(self, message: str, hint: str | None = None, path: tuple[str | int, ...] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = path  # the spec path of the variable whose definition failed, if it was a variable's


class ReportedError(ExpressionError):
    """A use of a variable whose own definition failed: that failure is reported once, at the definition."""


class Scope:
    """Variables visible to `${...}`; a variable may refer to others, resolved lazily with cycle detection.

    `origin` is where the variables are defined in the spec (`("vars",)`, or a sub-graph's params), so that
    a failing variable is reported at its own line, not at the line that happened to use it first.
    """

    def __init__(
        self,
        raw: Mapping[str, Any],
        parent: Scope | None = None,
        *,
        origin: tuple[str | int, ...] = ("vars",),
        resolved: Mapping[str, Any] | None = None,
    ):
        self.raw = {**raw, **(resolved or {})}
        self.parent = parent
        self.origin = origin
        self._resolved: dict[str, Any] = dict(resolved or {})
        self._resolving: list[str] = []
        self._failed: set[str] = set()
        self.used: set[str] = set()

    def names(self) -> set[str]:
        return set(self.raw) | (self.parent.names() if self.parent else set())

    def __contains__(self, name: str) -> bool:
        return name in self.raw or (self.parent is not None and name in self.parent)

    def get(self, name: str) -> Any:
        """The value of a variable used by an expression (which marks it used)."""
        self.used.add(name)
        if name not in self.raw and self.parent is not None and name in self.parent:
            return self.parent.get(name)
        return self.value(name)

    def value(self, name: str) -> Any:
        """The value of a variable of this scope, without marking it used."""
        if name not in self.raw:
            close = difflib.get_close_matches(name, sorted(self.names()), n=1)
            raise ExpressionError(
                f"unknown variable {name!r}",
                hint=f"did you mean {close[0]!r}?" if close else "define it under vars: or pass it as a param",
            )
        if name in self._resolved:
            return self._resolved[name]
        if name in self._failed:
            raise ReportedError(f"variable {name!r} is invalid")
        if name in self._resolving:
            cycle = " → ".join([*self._resolving[self._resolving.index(name) :], name])
            raise ExpressionError(f"variables refer to each other in a cycle: {cycle}", path=(*self.origin, name))
        if len(self._resolving) >= MAX_VAR_DEPTH:
            raise ExpressionError(f"variables refer to variables more than {MAX_VAR_DEPTH} levels deep: {name!r}")
        self._resolving.append(name)
        try:
            value = substitute(self.raw[name], self)
            check_size(value)
        except ExpressionError as exc:
            self._failed.add(name)
            if exc.path is None:
                exc.path = (*self.origin, name)
            raise
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
            return _interpolate(value, scope)
        return value
    if isinstance(value, list):
        return [substitute(v, scope) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, scope) for k, v in value.items()}
    return value


def _interpolate(template: str, scope: Scope) -> str:
    """`"a ${x} b"` → a string; bounded as it grows, since each `${x}` may itself be a long string."""
    parts, size, end = [], 0, 0
    for match in PLACEHOLDER.finditer(template):
        piece = str(evaluate(match.group(1), scope))
        size += match.start() - end + len(piece)
        if size > MAX_STRING:
            raise ExpressionError(f"substituting into {template[:40]!r} makes a string over {MAX_STRING:,} characters")
        parts += [template[end : match.start()], piece]
        end = match.end()
    return "".join([*parts, template[end:]])


def check_size(value: Any) -> None:
    """Refuse a substituted value that expands to too many items: lists of `${list}` of `${list}`... share
    structure, so a few lines can stand for billions of values (the billion laughs, made of variables)."""
    budget = MAX_VALUES
    stack = [value]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise ExpressionError(
                f"the value expands to more than {MAX_VALUES:,} items",
                hint="variables holding lists of variables holding lists multiply",
            )
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def mentions(value: Any, name: str) -> bool:
    """Whether some `${...}` in `value` (text, or lists and mappings of it) reads the variable `name`."""
    if isinstance(value, dict):
        return any(mentions(item, name) for item in value.values())
    if isinstance(value, list):
        return any(mentions(item, name) for item in value)
    if not isinstance(value, str):
        return False
    for expression in PLACEHOLDER.findall(value):
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except (SyntaxError, RecursionError, MemoryError):
            continue  # substitution reports it
        if any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(tree)):
            return True
    return False


def evaluate(expression: str, scope: Scope) -> Any:
    if len(expression) > MAX_EXPRESSION:
        raise ExpressionError(
            f"${{{expression[:40]}...}} is {len(expression):,} characters long; the limit is {MAX_EXPRESSION}",
            hint="split it over several variables",
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"cannot parse ${{{expression}}}: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:  # the parser's own limits on nesting
        raise ExpressionError(f"${{{expression[:40]}...}} is nested too deeply") from exc
    try:
        return _Evaluator(scope, expression).visit(tree.body)
    except RecursionError as exc:
        raise ExpressionError(f"${{{expression[:40]}...}} is nested too deeply") from exc


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
                "and/or/not, `a if c else b`, lists indexed by an integer, and " + ", ".join(FUNCTIONS),
            )
        result = method(node)
        if isinstance(result, int | float) and not isinstance(result, bool) and abs(result) > MAX_MAGNITUDE:
            raise ExpressionError(f"${{{self.text}}} is too large ({_magnitude(result)})")
        if isinstance(result, str) and len(result) > MAX_STRING:
            raise ExpressionError(f"${{{self.text}}} makes a string longer than {MAX_STRING:,} characters")
        if isinstance(result, list) and len(result) > MAX_VALUES:
            raise ExpressionError(f"${{{self.text}}} makes a list of more than {MAX_VALUES:,} items")
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
        if isinstance(left, str) and isinstance(node.op, ast.Mod):  # `'%09999999d' % 1` formats a huge string
            raise ExpressionError(f"${{{self.text}}}: % formatting of strings is not allowed")
        if isinstance(node.op, ast.Mult) and _repeats_string(left, right):
            raise ExpressionError(f"${{{self.text}}} makes a string longer than {MAX_STRING:,} characters")
        if isinstance(node.op, ast.Mult) and _repeats_list(left, right):  # `[0] * 10**12`: refused, not allocated
            raise ExpressionError(f"${{{self.text}}} makes a list of more than {MAX_VALUES:,} items")
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

    def _List(self, node: ast.List) -> list[Any]:
        """A list literal, to pick from by index (`${[4096, None][copy % 2]}`)."""
        if len(node.elts) > MAX_VALUES:
            raise ExpressionError(f"${{{self.text[:40]}...}}: a list of more than {MAX_VALUES:,} items")
        return [self.visit(item) for item in node.elts]

    def _Subscript(self, node: ast.Subscript) -> Any:
        """One item of a list or string by an integer index (no slices)."""
        if isinstance(node.slice, ast.Slice):
            raise ExpressionError(f"${{{self.text}}}: slices are not allowed", hint="index one item: `[a, b][i]`")
        value, index = self.visit(node.value), self.visit(node.slice)
        if not isinstance(value, list | str) or not isinstance(index, int) or isinstance(index, bool):
            raise ExpressionError(f"${{{self.text}}}: only a list or a string can be indexed, by an integer")
        if not -len(value) <= index < len(value):
            raise ExpressionError(f"${{{self.text}}}: index {index} is out of range for {len(value)} items")
        return value[index]

    def _Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise ExpressionError(f"${{{self.text}}}: only these functions may be called: {', '.join(FUNCTIONS)}")
        args = [self.visit(a) for a in node.args]
        if node.func.id == "round" and len(args) > 1 and not (isinstance(args[1], int) and abs(args[1]) <= 64):
            # round(5, -10**8) computes 10**(10**8): seconds to hours of CPU for one expression
            raise ExpressionError(f"${{{self.text}}}: round() takes at most 64 digits")
        try:
            return FUNCTIONS[node.func.id](*args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ExpressionError(f"${{{self.text}}}: {exc}") from exc


def _repeats_string(left: Any, right: Any) -> bool:
    """Whether `left * right` would build a string over the limit; checked before Python allocates it."""
    text, count = (left, right) if isinstance(left, str) else (right, left)
    if not isinstance(text, str) or not isinstance(count, int):
        return False
    return len(text) * count > MAX_STRING


def _repeats_list(left: Any, right: Any) -> bool:
    """Whether `left * right` would build a list of more than MAX_VALUES items."""
    items, count = (left, right) if isinstance(left, list) else (right, left)
    return isinstance(items, list) and isinstance(count, int) and len(items) * count > MAX_VALUES


def _magnitude(value: int | float) -> str:
    """A too-large number in words: `1e+72`, or the digits of an integer too large even for a float."""
    try:
        return f"{value:.3g}"
    except OverflowError:
        return f"an integer of {len(str(abs(int(value))))} digits"
