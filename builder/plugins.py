"""Loading users' blocks: files and modules they name, `BLOCKGRAPH_PLUGINS`, and installed entry points.

Loading code is always the user's explicit act (a flag, the environment variable, an installed package);
a spec only names block types. A plugin that fails is reported by name and leaves the registry as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from pathlib import Path

from blockgraph.blocks import REGISTRY
from blockgraph.blocks.registry import RegistrationError
from blockgraph.builder import families
from blockgraph.common.errors import Location, PluginError, Problem

ENTRY_POINT_GROUP = "blockgraph.blocks"
FAMILY_ENTRY_POINT_GROUP = "blockgraph.families"  # packages that `register` a model family (builder.families)
ENV_VAR = "BLOCKGRAPH_PLUGINS"


def activate(explicit: Iterable[str] = (), *, allow_override: bool = False) -> list[Problem]:
    """Load installed entry points, then `$BLOCKGRAPH_PLUGINS`, then `explicit` (each at most once).

    Named plugins (env var, explicit) that fail raise `PluginError`; a broken installed package only warns,
    so that one bad install cannot take the built-in blocks down with it.
    """
    warnings = [] if REGISTRY.entry_points_loaded else _load_entry_points(allow_override)
    REGISTRY.entry_points_loaded = True
    from_env = [p.strip() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    problems = []
    for name, via in [(n, f"${ENV_VAR}") for n in from_env] + [(n, "--plugin") for n in explicit]:
        try:
            load_plugin(name, allow_override=allow_override)
        except PluginError as exc:
            problems += [Problem(f"{p.message} (named by {via})", p.location, p.hint) for p in exc.problems]
    if problems:
        raise PluginError(problems)
    return warnings


def load_plugin(name: str, *, allow_override: bool = False) -> str:
    """Import one plugin (a `.py` file or a module name) with its blocks stamped as coming from it."""
    path = Path(name)
    is_file = name.endswith(".py") or path.is_file()
    key = str(path.resolve()) if is_file else name
    if key in REGISTRY.plugins:
        return REGISTRY.plugins[key]
    origin = f"plugin {path.name}" if is_file else f"plugin {name}"
    if is_file and not path.is_file():
        raise PluginError(Problem(f"{origin}: file not found: {path}", Location(str(path)), hint="check the path"))
    importer: Callable[[], object] = (
        (lambda: _import_file(path)) if is_file else (lambda: importlib.import_module(name))
    )
    _run(origin, importer, allow_override, str(path) if is_file else None)
    REGISTRY.plugins[key] = origin
    return origin


def _load_entry_points(allow_override: bool) -> list[Problem]:
    warnings = []
    for ep in [*entry_points(group=ENTRY_POINT_GROUP), *entry_points(group=FAMILY_ENTRY_POINT_GROUP)]:
        dist = getattr(ep.dist, "name", None) or ep.value
        origin = f"package {dist}"
        try:
            _run(origin, ep.load, allow_override, None)
        except PluginError as exc:
            warnings += [
                Problem(p.message, p.location, p.hint or "reinstall or uninstall the package", "warning")
                for p in exc.problems
            ]
    return warnings


def _run(origin: str, importer: Callable[[], object], allow_override: bool, file: str | None) -> None:
    try:
        with REGISTRY.source(origin, override=allow_override), families.loading(override=allow_override):
            importer()
    except PluginError as exc:  # a family's model_type taken (builder.families.register)
        raise PluginError([Problem(f"{origin}: {p.message}", Location(file), p.hint) for p in exc.problems]) from exc
    except RegistrationError as exc:
        hint = (
            "rename the block, or pass --allow-override to let plugins replace blocks" if "taken" in str(exc) else None
        )
        raise PluginError(Problem(f"{origin}: {exc}", Location(file), hint=hint)) from exc
    except SyntaxError as exc:
        where = Location(exc.filename or file, exc.lineno, exc.offset)
        raise PluginError(Problem(f"{origin} has a syntax error: {exc.msg}", where)) from exc
    except Exception as exc:
        raise PluginError(
            Problem(
                f"{origin} failed to load: {type(exc).__name__}: {exc}",
                Location(file),
                hint="run with --debug to see the traceback",
            )
        ) from exc


def _import_file(path: Path) -> object:
    """Import a plugin file under a private module name, so two files called `blocks.py` don't collide."""
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"blockgraph_plugin_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
