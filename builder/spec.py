"""The spec language as pydantic models: one definition gives validation, JSON Schema and docs."""

from __future__ import annotations

import keyword
import re
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
MAX_DIM = 2**31 - 1  # the largest size of one dimension (torch indexes with int64, and products of sizes must fit)
REF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
EXPR_RE = r"^\s*\$\{[^{}]*\}\s*$"

Name = Annotated[str, StringConstraints(pattern=NAME_RE)]
Expr = Annotated[str, StringConstraints(pattern=EXPR_RE)]
Repeat = Annotated[int, Field(ge=1, le=10_000, strict=True)]  # copies of a `repeat:` stack


def _argument_name(name: str) -> str:
    """Spec inputs become the parameters of the generated `forward(self, ...)`, so they must be usable there."""
    if keyword.iskeyword(name) or name == "self" or name.startswith("_"):
        raise ValueError(
            f"input name {name!r} cannot be a parameter of forward(): "
            "Python keywords, self and names starting with _ are not allowed"
        )
    return name


InputName = Annotated[str, StringConstraints(pattern=NAME_RE), AfterValidator(_argument_name)]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def check_ref(value: str) -> str:
    if not isinstance(value, str) or not REF_RE.match(value):
        raise ValueError(f"{value!r} is not a reference; write `node` or `node.port` (letters, digits, _)")
    return value


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputSpec(SpecModel):
    """A tensor the model takes when called."""

    dtype: str = Field(
        "float32", description="torch dtype name: " + ", ".join(DTYPES), json_schema_extra={"enum": list(DTYPES)}
    )
    shape: list[Annotated[int, Field(gt=0, le=MAX_DIM, strict=True)] | Name] = Field(
        min_length=1, description="sizes: integers or dimension names such as batch, seq"
    )
    optional: bool = Field(False, description="may be omitted (None) when the model is called, e.g. a padding mask")
    high: int | None = Field(
        None, gt=0, strict=True, description="exclusive upper bound of dummy integer values (e.g. the vocab)"
    )
    doc: str | None = Field(None, description="what the input holds")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"{value!r} is not a torch dtype; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _high_fits(self) -> InputSpec:
        dtype = DTYPES[self.dtype]
        if self.high is not None and not dtype.is_floating_point and dtype != torch.bool:
            most = min(torch.iinfo(dtype).max + 1, 2**63 - 1)  # exclusive; torch takes a bound up to int64
            if self.high > most:
                raise ValueError(f"high {self.high} does not fit {self.dtype}: at most {most}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


_REF = {"type": "string", "pattern": REF_RE.pattern, "description": "`node`, `node.port` or a spec input"}

Inputs = Annotated[
    Any,
    Field(
        description="where the inputs come from: `ref` (first port), a list (ports in order; null skips one), "
        "or a mapping port → ref. A ref is `node`, `node.port` or a spec input",
        json_schema_extra={
            "anyOf": [
                _REF,
                {"type": "array", "items": {"anyOf": [_REF, {"type": "null"}]}},
                {"type": "object", "propertyNames": {"pattern": NAME_RE}, "additionalProperties": _REF},
            ]
        },
    ),
]


class NodeSpec(SpecModel):
    """One use of a block (or of a sub-graph from `blocks:`)."""

    type: Name | Expr = Field(
        description="registered block name or a sub-graph defined under blocks: (a `${...}` may choose it; in a "
        "repeat, `${copy}` is the copy's index)"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the block's parameters")
    inputs: Inputs = Field(None, alias="in")
    repeat: Repeat | Expr | None = Field(
        None,
        description="stack N independent copies, each one's first output feeding the next one's first input (and "
        "an output named like an input feeding that input); `${copy}` in type and params is the copy's index",
    )
    share: Name | None = Field(
        None,
        description="reuse the module (and so the weights) of this node, a block node at the same level; "
        "params may be omitted or must be identical",
    )
    doc: str | None = Field(None, description="a note shown by inspect")

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value if value is None else check_ref(value)
        if isinstance(value, list):
            return [None if v is None else check_ref(v) for v in value]
        if isinstance(value, dict):
            for port, ref in value.items():
                if not re.match(NAME_RE, port):
                    raise ValueError(f"{port!r} is not a port name")
                check_ref(ref)
            return value
        raise ValueError("`in` must be a ref, a list of refs, or a mapping port → ref")


Outputs = Annotated[
    Any,
    Field(
        description="a ref (the model returns one tensor) or a mapping name → ref (the model returns a dict)",
        json_schema_extra={
            "anyOf": [
                _REF,
                {
                    "type": "object",
                    "propertyNames": {"pattern": NAME_RE},
                    "additionalProperties": _REF,
                    "minProperties": 1,
                },
            ]
        },
    ),
]


def check_outputs(cls: type, value: Any) -> Any:
    if isinstance(value, str):
        return check_ref(value)
    if isinstance(value, dict) and value:
        for name, ref in value.items():
            if not re.match(NAME_RE, name):
                raise ValueError(f"{name!r} is not an output name")
            check_ref(ref)
        return value
    raise ValueError("outputs must be a ref or a non-empty mapping name → ref")


class GraphSpec(SpecModel):
    """A reusable sub-graph: its own inputs, parameters, nodes and outputs; used as a node `type`."""

    inputs: list[Name] = Field(description="input names, in the order a list `in:` binds them")
    params: dict[Name, Any] = Field(default_factory=dict, description="parameters and their defaults")
    nodes: dict[Name, NodeSpec] = Field(description="the sub-graph's nodes; refs see its inputs and its nodes")
    outputs: Outputs
    doc: str | None = Field(None, description="what the sub-graph is")

    _check_outputs = field_validator("outputs")(check_outputs)


class RolesSpec(SpecModel):
    """What training makes of the outputs besides the one it trains on (trainer.roles checks them)."""

    loss: dict[Name, Annotated[float, Field(strict=True, allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="outputs added to the training loss, each a scalar times its weight (a router's "
        "load-balancing loss, an auxiliary head), e.g. {aux: 0.01}",
    )


PARAM_PATH_RE = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+$"
ParamPath = Annotated[str, StringConstraints(pattern=PARAM_PATH_RE)]


class Spec(SpecModel):
    """A model architecture: inputs, nodes wired by reference, outputs."""

    name: str = Field(description="the model's name")
    description: str | None = Field(None, description="what the model is")
    extends: str | None = Field(None, description="a base spec file (relative to this one) to inherit and override")
    vars: dict[Name, Any] = Field(default_factory=dict, description="values substituted for ${name} anywhere below")
    dims: dict[Name, Annotated[int, Field(gt=0, le=MAX_DIM, strict=True)]] = Field(
        default_factory=dict, description="default sizes of named dimensions for dummy runs (e.g. batch: 2)"
    )
    inputs: dict[InputName, InputSpec] = Field(description="the tensors the model is called with")
    blocks: dict[Name, GraphSpec] = Field(default_factory=dict, description="reusable sub-graphs")
    nodes: dict[Name, NodeSpec] = Field(description="block uses, wired by `in`")
    outputs: Outputs
    tie: dict[ParamPath, ParamPath] = Field(
        default_factory=dict,
        description="weight tying: parameter → the parameter whose tensor it shares, e.g. "
        "generator.proj.weight: tgt_embed.lut.weight",
    )
    roles: RolesSpec = Field(default_factory=RolesSpec, description="what training makes of the outputs")

    _check_outputs = field_validator("outputs")(check_outputs)
