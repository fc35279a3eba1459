"""A built model in the precision it decodes in: float32, bfloat16, float16, or int8 weights on the CPU.

bfloat16 and float16 cast the weights and buffers, so that the activations and the step caches follow. int8
replaces every `nn.Linear` by an `Int8Linear`: its weight quantized once, symmetrically, one scale per output
channel; each call quantizes its input per tensor and runs fbgemm's int8 matrix product with int32
accumulation, then dequantizes (dynamic quantization). The float weight stays the module's `weight`, for the
blocks that read it directly (a tied generator, a concat score) and for the state dict. Embeddings, norms and
attention's products stay float32, so int8 costs ≈ 1 % of an output's scale where the weights are read (the
decoder's Linear layers and the generator), which is what a decoding step of a small batch spends its time on.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Literal, TypeVar, get_args

import torch
from torch import nn

from blockgraph.common.errors import Problem, UsageError

Precision = Literal["float32", "bfloat16", "float16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
M = TypeVar("M", bound=nn.Module)
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check(precision: str, device: str | torch.device) -> None:
    """Refuse a precision the device cannot run well: float16 and int8 matrix products each on one side only."""
    kind = torch.device(device).type
    if precision not in PRECISIONS:
        raise UsageError(Problem(f"--precision {precision!r} is unknown", hint=f"use one of {', '.join(PRECISIONS)}"))
    if precision == "float16" and kind == "cpu":
        raise UsageError(
            Problem("float16 decoding is for GPUs: CPUs have no fast float16 matrix products", hint="use bfloat16")
        )
    if precision == "int8" and kind != "cpu":
        raise UsageError(
            Problem(f"int8 weights run on the CPU's int8 kernels, not on {kind}", hint="use bfloat16 (or float16)")
        )


def apply(model: M, precision: str) -> M:
    """`model` in `precision`, in place (and returned): its float weights cast, or its Linear layers in int8."""
    if precision in _FLOATS:
        return model.to(_FLOATS[precision])
    model.float()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return model


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W in int8 (a scale per output channel) and x quantized per call: fbgemm's int8 GEMM."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch marks its quantized tensors for a future move to torchao
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, _reduce_range())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


@functools.cache
def _reduce_range() -> bool:
    """fbgemm's 7-bit activations, needed where the CPU multiplies int8 pairs without VNNI (16-bit sums that
    would saturate); with VNNI (or AMX) the full 8 bits are exact and twice as fine."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return True
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
