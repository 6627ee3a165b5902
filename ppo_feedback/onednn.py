"""Float32 linear layers on the CPU through oneDNN's matrix product instead of MKL's.

torch's float32 CPU products (`F.linear`, `addmm`, `mm`) call MKL's sgemm, which on AMD processors
takes a code path without AVX-512; oneDNN (also inside torch) picks its kernels by the CPU's features
alone. On a 2-core AMD EPYC with AVX-512 its products of training's shapes ran 2-2.5x faster (README,
issue #16, has the figures). The same products in float32, summed in another order: results agree to
float32 rounding, not bit for bit.

`route_linears(model)` routes the frozen float32 CPU `nn.Linear` layers and GPT-2 `Conv1D` layers of
a model through `linear`, an autograd function whose backward gives the input's gradient by a
oneDNN product too (frozen weights need no gradient of their own). Only where torch's CPU capability
is AVX-512 (`routes_here`); elsewhere nothing changes.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

ROUTED_CAPABILITIES = ("AVX512",)
"""torch CPU capabilities (`torch.backends.cpu.get_cpu_capability()`) on which layers are routed: those measured."""


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ weight^T + bias for a 2-D x (rows, in) and an (out, in) weight of any strides, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x @ weight^T + bias with a frozen weight and bias: both products (forward, input gradient) by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return _product(grad_y.contiguous(), weight.t(), None), None, None  # grad_x = grad_y @ weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return `F.linear(x, weight, bias)` (x (..., in), weight (out, in)) computed by oneDNN when it can be:
    float32 CPU tensors, and a weight and bias that take no gradient here; otherwise by `F.linear`."""
    trains = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or trains or not x.numel():
        return F.linear(x, weight, bias)
    y = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def out_in_weight(layer: nn.Module) -> torch.Tensor:
    """Return a linear layer's weight as an (out, in) matrix: nn.Linear's own, the transpose of GPT-2 Conv1D's."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


def _routed_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A routed layer's forward: its product by `linear`."""
    return linear(x, out_in_weight(self), self.bias)


def routes_here() -> bool:
    """Return True when this machine routes float32 products through oneDNN: torch has it, on an AVX-512 CPU."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability() in ROUTED_CAPABILITIES)


def routable(module: nn.Module) -> bool:
    """Return True for a float32 CPU `nn.Linear` or GPT-2 `Conv1D` layer (exactly those types)."""
    from transformers.pytorch_utils import Conv1D

    weight = getattr(module, "weight", None)
    return (type(module) in (nn.Linear, Conv1D) and weight is not None and weight.device.type == "cpu"
            and weight.dtype == torch.float32)


def route_linears(model: nn.Module, force: bool = False) -> int:
    """Compute every routable layer of `model` with `linear` (oneDNN) from now on; return how many were routed.

    Does nothing unless `routes_here()` (or `force`). A layer whose weight takes a gradient when it
    runs (grad enabled, weight not frozen) takes `F.linear`'s path then, so full fine-tuning still works.
    """
    if not (force or routes_here()):
        return 0
    layers = [m for m in model.modules() if routable(m) and not is_routed(m)]
    for layer in layers:
        layer.forward = MethodType(_routed_forward, layer)
    return len(layers)


def is_routed(layer: nn.Module) -> bool:
    """Return True when `route_linears` routed this layer."""
    forward = layer.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _routed_forward
