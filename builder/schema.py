"""JSON Schema for spec files, generated from the pydantic models and every registered block's params.

Editors (VS Code's YAML extension) use it to complete block types and parameters and to flag mistakes as
you type, so it accepts what `blockgraph validate` accepts wherever JSON Schema can say so:

- a spec with `extends:` is partial: any key may be left to its base, and `null` deletes one;
- a number or a flag may be written as text the tool reads (`1e-12`, which YAML 1.1 leaves a string), except
  where the tool itself is strict (`dims`, `shape`, `high`, `repeat`);
- `${...}` stands for any value where it is substituted: everywhere outside `blocks:` and `vars:`, and in
  the params and `repeat` of a sub-graph's nodes;
- a node's `type` is a registered block. JSON Schema cannot compare a value with the keys of `blocks:`, so in
  a spec with `blocks:` (or `extends:`, whose base may have them) any name passes as a sub-graph's.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from blockgraph.blocks import REGISTRY
from blockgraph.builder.spec import EXPR_RE, NAME_RE, Spec

EXPRESSION = {"type": "string", "pattern": EXPR_RE, "description": "a ${...} expression"}
NULL = {"type": "null"}
BLOCK_TYPE = {"$ref": "#/$defs/BlockType"}
_ANNOTATIONS = ("title", "description", "default")
_STRING_CONSTRAINTS = ("pattern", "enum", "const", "format", "minLength", "maxLength")


def _any_case(word: str) -> str:
    """A regex for `word` in any letter case (JSON Schema's regexes have no case-insensitive flag)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


_DIGITS = "[0-9]+(_[0-9]+)*"
# the text pydantic reads as an integer, a float, a boolean (outside strict fields): tests compare with pydantic
INT_TEXT = rf"^\s*[+-]?{_DIGITS}(\.0+)?\s*$"
FLOAT_TEXT = (
    rf"^\s*[+-]?(({_DIGITS}(\.({_DIGITS})?)?|\.{_DIGITS})([eE][+-]?{_DIGITS})?"
    rf"|{_any_case('inf')}({_any_case('inity')})?|{_any_case('nan')})\s*$"
)
BOOL_TEXT = "^(" + "|".join(_any_case(w) for w in ("true", "false", "yes", "no", "on", "off", *"tfyn10")) + ")$"


class _LaxSchema(GenerateJsonSchema):
    """Numbers and flags as pydantic validates them: a lax field also takes its value as text."""

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        return _or_text(super().int_schema(schema), schema, INT_TEXT)

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        return _or_text(super().float_schema(schema), schema, FLOAT_TEXT)

    def bool_schema(self, schema: core_schema.BoolSchema) -> JsonSchemaValue:
        return _or_text(super().bool_schema(schema), schema, BOOL_TEXT)


def _or_text(json_schema: JsonSchemaValue, core: Any, pattern: str) -> JsonSchemaValue:
    """Bounds apply to numbers and `pattern` to strings only, so one schema says both."""
    if core.get("strict"):
        return json_schema
    return {**json_schema, "type": [json_schema["type"], "string"], "pattern": pattern}


def spec_schema() -> dict[str, Any]:
    """The schema of a spec file: a partial spec under `extends:`, else a whole one (see the module's notes)."""
    generated = Spec.model_json_schema(by_alias=True, schema_generator=_LaxSchema)
    defs: dict[str, Any] = generated.pop("$defs")
    defs["BlockType"] = {"enum": REGISTRY.names(), "description": "a registered block"}
    params_refs: dict[str, dict[str, str]] = {}
    for entry in REGISTRY.list():
        key = f"params.{entry.name}"
        params = entry.cls.Params.model_json_schema(schema_generator=_LaxSchema)
        for inner_name, inner in params.pop("$defs", {}).items():
            defs[f"{key}.{inner_name}"] = _inside(_rename_refs(inner, key), _substituted)
        defs[key] = _inside(_rename_refs(params, key), _substituted)  # params are substituted at every level
        params_refs[entry.name] = {"$ref": f"#/$defs/{key}"}
    node = defs.pop("NodeSpec")
    node["properties"]["type"] = {
        "anyOf": [
            BLOCK_TYPE,
            {"type": "string", "pattern": NAME_RE, "description": "a sub-graph defined under blocks:"},
            EXPRESSION,
        ],
        "description": node["properties"]["type"].get("description", ""),
    }
    # a sub-graph's nodes are substituted only in their type, params and `repeat` (which take `${...}` already)
    defs["SubgraphNodeSpec"] = {**copy.deepcopy(node), "allOf": _params_rules(params_refs)}
    defs["NodeSpec"] = {
        **_inside(node, _substituted),
        "allOf": _params_rules({name: _substituted(ref) for name, ref in params_refs.items()}),
    }
    defs["GraphSpec"]["properties"]["nodes"]["patternProperties"][NAME_RE] = {"$ref": "#/$defs/SubgraphNodeSpec"}
    for substituted in ("InputSpec", "RolesSpec"):  # read after substitution, every part of them
        defs[substituted] = _inside(defs[substituted], _substituted)
    for name, prop in generated["properties"].items():
        if name not in ("blocks", "vars", "extends"):  # `extends` is read before anything is substituted
            generated["properties"][name] = _substituted(prop)
    defs["Spec"] = generated
    defs["RegisteredTypes"] = {
        "description": "a spec without blocks: has no sub-graph: every node type is a registered block",
        "properties": {"nodes": {"additionalProperties": {"properties": {"type": _substituted(BLOCK_TYPE)}}}},
    }
    _close(defs)
    partial = _add_partial(defs, "Spec")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "blockgraph spec",
        "description": generated.get("description", ""),
        "if": {"required": ["extends"], "properties": {"extends": {"type": "string"}}},
        "then": {"$ref": partial},
        "else": {"$ref": "#/$defs/Spec", "if": {"required": ["blocks"]}, "else": {"$ref": "#/$defs/RegisteredTypes"}},
        "$defs": defs,
    }


def _params_rules(refs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One rule per block: a node of that type has that block's params."""
    return [
        {
            "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
            "then": {"properties": {"params": ref}},
        }
        for name, ref in refs.items()
    ]


def _rename_refs(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    text = json.dumps(schema).replace('"#/$defs/', f'"#/$defs/{prefix}.')
    return json.loads(text)


def _inside(schema: dict[str, Any], transform: Any) -> dict[str, Any]:
    """`schema` with `transform` applied to the schema of each part of its value: property, entry, item."""
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in schema:
            out[key] = {name: transform(part) for name, part in schema[key].items()}
    for key in ("additionalProperties", "items"):
        if isinstance(schema.get(key), dict):
            out[key] = transform(schema[key])
    if "prefixItems" in schema:
        out["prefixItems"] = [transform(part) for part in schema["prefixItems"]]
    if "anyOf" in schema:
        out["anyOf"] = [_inside(member, transform) for member in schema["anyOf"]]
    return out


def _substituted(schema: dict[str, Any]) -> dict[str, Any]:
    """A value `${...}` is substituted into before validation: it, and each part of it, may be an expression."""
    inner = _inside(schema, _substituted)
    if _takes_expression(inner):
        return inner
    if set(inner) - set(_ANNOTATIONS) == {"anyOf"}:
        return {**inner, "anyOf": [*inner["anyOf"], EXPRESSION]}
    return {"anyOf": [inner, EXPRESSION], **_annotations(inner)}


def _takes_expression(schema: dict[str, Any]) -> bool:
    if "anyOf" in schema:
        return any(_takes_expression(member) for member in schema["anyOf"])
    if schema.keys() & {"$ref", "allOf", "oneOf", "not", "if", *_STRING_CONSTRAINTS}:
        return False
    kind = schema.get("type")
    return kind is None or kind == "string" or (isinstance(kind, list) and "string" in kind)


def _annotations(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: schema[k] for k in _ANNOTATIONS if k in schema}


def _close(schema: Any) -> None:
    """A mapping whose keys must be names (`patternProperties`) has no other keys: pydantic refuses them."""
    if isinstance(schema, dict):
        if "patternProperties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _close(value)
    elif isinstance(schema, list):
        for value in schema:
            _close(value)


def _add_partial(defs: dict[str, Any], name: str) -> str:
    """A ref to `partial.NAME`: the definition NAME as a spec that extends another may write it."""
    partial = f"partial.{name}"
    if partial not in defs:
        defs[partial] = {}  # taken before it is filled, so that a definition may refer to itself
        defs[partial] = _partial(defs[name], defs)
    return f"#/$defs/{partial}"


def _partial(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` as merged over a base: mappings merge (nothing is required, `null` deletes a key); lists and
    `if` conditions stay whole (a list replaces the base's)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "required":
            continue
        if key == "$ref":
            out[key] = _add_partial(defs, value.removeprefix("#/$defs/"))
        elif key in ("properties", "patternProperties"):
            out[key] = {name: _nullable(_partial(part, defs)) for name, part in value.items()}
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _nullable(_partial(value, defs))
        elif key in ("anyOf", "allOf"):
            out[key] = [_partial(member, defs) for member in value]
        elif key in ("then", "else"):
            out[key] = _partial(value, defs)
        else:
            out[key] = value
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if NULL in schema.get("anyOf", []):
        return schema
    return {"anyOf": [schema, NULL], **_annotations(schema)}


def fields_markdown() -> str:
    """The spec's keys as Markdown tables, generated from the pydantic models (docs/spec.md embeds them)."""
    from blockgraph.builder.spec import GraphSpec, InputSpec, NodeSpec, RolesSpec

    sections: list[tuple[str, type[BaseModel]]] = [
        ("Top level", Spec),
        ("`inputs.<name>`", InputSpec),
        ("`nodes.<name>` (also inside sub-graphs)", NodeSpec),
        ("`blocks.<name>` (sub-graphs)", GraphSpec),
        ("`roles`", RolesSpec),
    ]
    lines: list[str] = []
    for title, model in sections:
        lines += [f"### {title}", "", "| key | required | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            default = "" if info.is_required() else _default_text(info)
            meaning = (info.description or "").replace("|", "\\|")
            lines.append(
                f"| `{info.alias or name}` | {'yes' if info.is_required() else 'no'} | {default} | {meaning} |"
            )
        lines.append("")
    return "\n".join(lines)


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        made = info.default_factory()
        return f"`{made.model_dump() if isinstance(made, BaseModel) else made!r}`"
    return f"`{info.default!r}`"
