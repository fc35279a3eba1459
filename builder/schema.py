"""JSON Schema for spec files, generated from the pydantic models and every registered block's params.

Editors (VS Code's YAML extension) use it to complete block types and parameters and to flag mistakes as
you type. Any value may also be a `${...}` expression, so every property admits one.
"""

from __future__ import annotations

import json
from typing import Any

from blocks import REGISTRY
from builder.spec import EXPR_RE, NAME_RE, Spec

EXPRESSION = {"type": "string", "pattern": EXPR_RE, "description": "a ${...} expression"}


def spec_schema() -> dict[str, Any]:
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "blockgraph spec"
    defs = schema.setdefault("$defs", {})
    rules = []
    for entry in REGISTRY.list():
        key = f"params.{entry.name}"
        params = entry.cls.Params.model_json_schema()
        for inner_name, inner in params.pop("$defs", {}).items():
            defs[f"{key}.{inner_name}"] = _rename_refs(inner, key)
        defs[key] = _rename_refs(params, key)
        rules.append(
            {
                "if": {"properties": {"type": {"const": entry.name}}, "required": ["type"]},
                "then": {"properties": {"params": {"$ref": f"#/$defs/{key}"}}},
            }
        )
    node = defs["NodeSpec"]
    node["properties"]["type"] = {
        "anyOf": [
            {"enum": REGISTRY.names(), "description": "a registered block"},
            {"type": "string", "pattern": NAME_RE, "description": "a sub-graph defined under blocks:"},
        ],
        "description": node["properties"]["type"].get("description", ""),
    }
    node["allOf"] = rules
    for definition in defs.values():
        _admit_expressions(definition)
    return schema


def _rename_refs(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    text = json.dumps(schema).replace('"#/$defs/', f'"#/$defs/{prefix}.')
    return json.loads(text)


def _admit_expressions(definition: dict[str, Any]) -> None:
    """Let every property also be a `${...}` string (variables are substituted before validation)."""
    for name, prop in definition.get("properties", {}).items():
        if name != "type" and prop.get("type") != "string":
            definition["properties"][name] = {"anyOf": [prop, EXPRESSION], **_annotations(prop)}


def _annotations(prop: dict[str, Any]) -> dict[str, Any]:
    return {k: prop[k] for k in ("title", "description", "default") if k in prop}


def fields_markdown() -> str:
    """The spec's keys as Markdown tables, generated from the pydantic models (docs/spec.md embeds them)."""
    from builder.spec import GraphSpec, InputSpec, NodeSpec

    sections = [
        ("Top level", Spec),
        ("`inputs.<name>`", InputSpec),
        ("`nodes.<name>` (also inside sub-graphs)", NodeSpec),
        ("`blocks.<name>` (sub-graphs)", GraphSpec),
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
        return f"`{info.default_factory()!r}`"
    return f"`{info.default!r}`"
