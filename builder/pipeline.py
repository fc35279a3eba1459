"""The pipeline, one way: load → validate → graph → shapes → compile, as one call per stage or all at once.

Each stage is a module of its own (builder.source, .validate with .resolve, .graph, .shapes, .compile); these
functions only chain them. A warning of any stage (an unused node, a broken plugin package) is a `Problem`
of severity "warning" that travels with the stage's result, in `Graph.warnings`, for the caller to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from blockgraph.builder import footprint
from blockgraph.builder.compile import compile_graph
from blockgraph.builder.graph import assemble
from blockgraph.builder.model import GraphModel
from blockgraph.builder.plugins import activate
from blockgraph.builder.shapes import TypedGraph, infer_shapes
from blockgraph.builder.source import Document, SourceMap, load_file
from blockgraph.builder.spec import DTYPES
from blockgraph.builder.validate import ValidSpec, validate_document
from blockgraph.common.errors import Problem, UsageError

SpecSource = str | Path | dict[str, Any] | ValidSpec


def load_spec(
    source: SpecSource,
    overrides: dict[str, Any] | None = None,
    *,
    plugins: Sequence[str] = (),
    allow_external_files: bool = False,
) -> ValidSpec:
    """A spec file (or a mapping already in memory) validated, with `--set`-style variable overrides applied.

    `allow_external_files` lets the spec name files outside its folder (docs/security.md).
    """
    notes = activate(plugins)  # installed plugin packages, $BLOCKGRAPH_PLUGINS and these: a broken package warns
    if isinstance(source, ValidSpec):
        return source
    document = Document(source, SourceMap("<dict>")) if isinstance(source, dict) else load_file(source)
    valid = validate_document(document, overrides, allow_external_files=allow_external_files)
    return replace(valid, warnings=(*notes, *valid.warnings)) if notes else valid


def typed_graph(
    source: SpecSource,
    overrides: dict[str, Any] | None = None,
    *,
    plugins: Sequence[str] = (),
    allow_external_files: bool = False,
) -> TypedGraph:
    """Everything short of allocating weights: validated, wired and shape-checked."""
    valid = load_spec(source, overrides, plugins=plugins, allow_external_files=allow_external_files)
    return infer_shapes(assemble(valid))


def build(
    source: SpecSource,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
    plugins: Sequence[str] = (),
    allow_external_files: bool = False,
    check_memory: bool = True,
) -> GraphModel:
    """Build a spec into an ordinary `nn.Module` (weights on `device`; `meta` allocates none).

    `plugins` are files or modules whose blocks the spec may use (see docs/plugins.md); `allow_external_files`
    lets the spec name files outside its own folder (docs/security.md). A model that would not fit in the
    memory left on `device` is refused first (`MemoryLimitError`, builder.footprint) unless `check_memory` is
    False.
    """
    typed = typed_graph(source, overrides, plugins=plugins, allow_external_files=allow_external_files)
    dtype = parse_dtype(dtype)
    if check_memory and footprint.checking(device):
        footprint.check(footprint.weights_need(typed, device=device, dtype=dtype))
    return compile_graph(typed, device=device, dtype=dtype)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES or not DTYPES[dtype].is_floating_point:
        floats = [n for n, d in DTYPES.items() if d.is_floating_point]
        raise UsageError(Problem(f"--dtype {dtype!r} is not a floating dtype", hint=f"use one of {', '.join(floats)}"))
    return DTYPES[dtype]
