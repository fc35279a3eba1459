"""The block registry: one object holds every block, built-in or from a plugin, with where it came from.

One decorator registers a block and checks its definition (Params model, ports matching `forward`, a
docstring); a name already taken is an error naming both sources; a plugin that fails halfway is rolled
back, so the registry never holds half a plugin.
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from blockgraph.blocks.stepping import StepCache, Stepping
from blockgraph.blocks.types import DtypeKind, Limit, TensorType

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


_WEIGHTS_FOLLOW: ContextVar[bool] = ContextVar("weights_follow", default=False)


def weights_follow() -> bool:
    """True while a model is rebuilt only to receive saved weights: blocks may skip initialisation work
    such as reading a pretrained-vectors file, whose values are about to be overwritten anyway."""
    return _WEIGHTS_FOLLOW.get()


@contextmanager
def receiving_weights() -> Iterator[None]:
    token = _WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FOLLOW.reset(token)


class BlockParams(BaseModel):
    """Base of every block's parameters: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Port:
    """A named input or output of a block, with the rank(s) and dtype kind it accepts."""

    name: str
    rank: int | tuple[int, ...] | None = None
    dtype: DtypeKind = "float"
    optional: bool = False
    doc: str = ""
    # a value over all positions beside per-position ones (a router's balancing loss): an input so marked feeds
    # only outputs so marked, and decoding step by step, which needs the per-position ones, leaves them out
    summary: bool = False

    @property
    def ranks(self) -> tuple[int, ...] | None:
        return (self.rank,) if isinstance(self.rank, int) else self.rank

    def describe(self) -> str:
        rank = "any rank" if self.ranks is None else "rank " + " or ".join(map(str, self.ranks))
        kind = "any dtype" if self.dtype == "any" else f"{self.dtype} dtype"
        return f"{rank}, {kind}" + (", optional" if self.optional else "")


class Block(nn.Module):
    """Base of every block: an `nn.Module` that also declares its params, ports and shape rule.

    `forward` takes the input ports as arguments, in order; a block with several output
    ports returns a tuple in the order of `out_ports`.
    """

    Params: ClassVar[type[BlockParams]] = BlockParams
    in_ports: ClassVar[tuple[Port, ...]] = (Port("x"),)
    out_ports: ClassVar[tuple[Port, ...]] = (Port("y"),)
    example: ClassVar[dict[str, Any] | None] = None
    # parameters whose initial values are part of the block's definition (a state-space layer's decay rates),
    # by name within the block: a trainer's generic initialisation leaves them as the block drew them
    own_init: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any = None) -> None:
        super().__init__()

    @classmethod
    def outputs_for(cls, params: Any) -> tuple[Port, ...]:
        """The output ports for these params; by default `out_ports`. Override when params add outputs
        (e.g. attention weights only when asked for), so the common case keeps its fast path."""
        return cls.out_ports

    @classmethod
    def infer(cls, params: Any, *args: Any, **inputs: Any) -> TensorType | tuple[TensorType, ...]:
        """The output type(s) for these input types, or raise `ShapeError`. Default: same as the first input.

        A block declares its ports as named parameters (`def infer(cls, p: Params, x: TensorType)`); the
        pipeline calls it with them by name."""
        first = inputs[cls.in_ports[0].name]
        if first is None:
            raise NotImplementedError(f"{cls.__name__} must define infer()")
        return first

    @classmethod
    def limits(cls, params: Any, *args: Any, **inputs: Any) -> tuple[Limit, ...]:
        """Upper bounds these params put on the inputs' dimensions (a position table's rows); none by default."""
        return ()

    @classmethod
    def flops(cls, params: Any, inputs: dict[str, TensorType | None], outputs: tuple[TensorType, ...]) -> Any:
        """Forward FLOPs as an expression of the dimensions; None where not counted."""
        return None

    @classmethod
    def active_parameters(cls, params: Any, total: int) -> int:
        """How many of the block's `total` parameters one token's forward reads: all of them by default; fewer
        where each token goes through some of the weights only (a mixture of experts' top_k experts)."""
        return total

    @classmethod
    def stepping(cls, params: Any, ports: Mapping[str, bool]) -> Stepping | None:
        """How the block decodes step by step when the connected `ports` grow (True) or stay fixed (False):
        "positions", "state" (it implements `step`) or None, it cannot (see blocks.stepping); None by default."""
        return None

    @classmethod
    def shares_fixed(cls, params: Any, ports: Mapping[str, bool]) -> bool:
        """Whether `step` takes its fixed inputs with one row per source while its growing ones hold `cache.width`
        hypotheses per source (beam search; see blocks.stepping); False by default: every row gets its own copy."""
        return False

    def step(self, cache: StepCache, *inputs: Any, **named: Any) -> Any:
        """`forward` for the new positions of the growing ports, keeping in `cache` what later steps need."""
        raise NotImplementedError(f"{type(self).__name__} does not step")


@dataclass(frozen=True)
class BlockEntry:
    """A registered block and where it came from."""

    name: str
    cls: type[Block]
    family: str
    source: str

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.cls) or ""


class RegistrationError(Exception):
    """A block definition is unusable or its name is taken."""


class UnknownBlockError(LookupError):
    def __init__(self, name: str, suggestions: list[str]):
        super().__init__(name)
        self.name = name
        self.suggestions = suggestions


B = TypeVar("B", bound=type[Block])


class Registry:
    """Name → block. A taken name is an error unless the registering source explicitly overrides."""

    def __init__(self) -> None:
        self._entries: dict[str, BlockEntry] = {}
        self._source = "built-in"
        self._override = False
        self.plugins: dict[str, str] = {}  # loaded plugin key (file path or module) → its origin label
        self.entry_points_loaded = False  # installed packages' blocks are loaded once per process

    def register(self, name: str, *, family: str = "misc") -> Callable[[B], B]:
        def decorate(cls: B) -> B:
            self.add(name, cls, family=family)
            return cls

        return decorate

    def add(self, name: str, cls: type[Block], *, family: str = "misc") -> BlockEntry:
        _check_definition(name, cls)
        taken = self._entries.get(name)
        if taken is not None and not self._override:
            raise RegistrationError(
                f"block name {name!r} from {self._source} is already taken by {taken.source} "
                f"({taken.cls.__module__}.{taken.cls.__qualname__}); rename it, or load the plugin "
                "with override allowed"
            )
        entry = BlockEntry(name=name, cls=cls, family=family, source=self._source)
        self._entries[name] = entry
        return entry

    @contextmanager
    def source(self, origin: str, *, override: bool = False) -> Iterator[None]:
        """Stamp blocks registered inside this context with `origin` (a plugin's name).

        All or nothing: if the body raises, every block it registered (or overrode) is rolled back.
        """
        saved = self._source, self._override
        snapshot = dict(self._entries)
        self._source, self._override = origin, override
        try:
            yield
        except BaseException:
            self._entries = snapshot
            raise
        finally:
            self._source, self._override = saved

    def get(self, name: str) -> BlockEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownBlockError(name, difflib.get_close_matches(name, self._entries, n=3))
        return entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def list(self, pattern: str = "*") -> list[BlockEntry]:
        """Blocks whose name or family matches a shell-style wildcard, sorted by family then name; a word without
        wildcards matches the names and families holding it (`attention` as `*attention*`)."""
        wildcard = pattern if is_wildcard(pattern) else f"*{pattern.lower()}*"
        found = [e for e in self._entries.values() if any(fnmatch.fnmatchcase(t, wildcard) for t in (e.name, e.family))]
        return sorted(found, key=lambda e: (e.family, e.name))

    def names(self) -> builtins.list[str]:  # `list` here is the method above
        return sorted(self._entries)


def is_wildcard(pattern: str) -> bool:
    """Whether `pattern` holds a shell wildcard (`*`, `?`, `[...]`) rather than being a plain word."""
    return any(c in pattern for c in "*?[")


def _check_definition(name: str, cls: type[Block]) -> None:
    where = f"block {name!r} ({cls.__module__}.{cls.__qualname__})"
    if not NAME_PATTERN.match(name):
        raise RegistrationError(f"{where}: names are lower_snake_case (a-z, 0-9, _), starting with a letter")
    if not (isinstance(cls, type) and issubclass(cls, Block)):
        raise RegistrationError(f"{where}: must subclass blocks.Block")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, BlockParams)):
        raise RegistrationError(f"{where}: Params must subclass blocks.BlockParams")
    if not inspect.getdoc(cls) or cls.__doc__ is None:
        raise RegistrationError(f"{where}: needs a docstring; its first line is the block's summary")
    declared = [p.name for p in cls.in_ports]
    signature = list(inspect.signature(cls.forward).parameters)[1:]
    if signature != declared:
        raise RegistrationError(f"{where}: forward{tuple(signature)} must take the in_ports {tuple(declared)}")
    if not cls.out_ports:
        raise RegistrationError(f"{where}: declares no out_ports")
    if cls.step is not Block.step:
        stepped = list(inspect.signature(cls.step).parameters)[1:]
        if stepped != ["cache", *declared]:
            raise RegistrationError(f"{where}: step{tuple(stepped)} must take cache, then the in_ports")


REGISTRY = Registry()
register = REGISTRY.register
