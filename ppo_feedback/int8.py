"""Int8 base weights for the page's decode on a CPU (`--serving-weights int8`).

A CPU decode step reads every weight once (memory-bound: README, "Measured results behind design
choices"); torch's dynamic int8 linear layers store each frozen base weight in a quarter of float32's
bytes and quantise the few activation rows on the fly, per step. Only the page's copy of the base is
quantised: LoRA's own A and B (which hot swaps copy versions into), the embeddings and the value head
stay float32, and the worker trains on the unquantised base. The sampled text is the int8 model's; its
recorded behaviour log-probabilities are the int8 model's too, which PPO treats like any behaviour
policy's (old log-probabilities come from a forward of the training policy).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import default_dynamic_qconfig

from .modeling import ModelSpecError

SERVING_WEIGHTS = ("same", "int8")
"""What `--serving-weights` accepts: the base as loaded, or its linear layers in dynamic int8 (CPU only)."""


def is_lora_part(name: str) -> bool:
    """Return True when module `name` is one of LoRA's own layers (lora_A, lora_B, ...), never quantised."""
    return any(part.startswith("lora_") for part in name.split("."))


def as_linear(module: nn.Module) -> nn.Linear | None:
    """Return `module` as a float32 `nn.Linear` (GPT-2's Conv1D is one with its weight transposed), or None."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        return module
    if type(module) is Conv1D and module.weight.dtype == torch.float32:
        linear = nn.Linear(module.weight.shape[0], module.nf, device=module.weight.device)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            linear.bias.copy_(module.bias)
        return linear
    return None


def quantize_base_linears(model: nn.Module) -> int:
    """Replace every float32 linear layer of `model` (`nn.Linear`, GPT-2's Conv1D) outside LoRA's own layers
    by torch's dynamic int8 Linear (weights int8 per tensor, activations quantised per step); return how
    many were replaced.

    Raises ModelSpecError when the model is not on the CPU (the int8 kernels are CPU kernels).
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ModelSpecError("--serving-weights int8 quantises the base for CPU kernels; this model is not on the CPU")
    targets = [(name, linear) for name, module in model.named_modules()
               if not is_lora_part(name) and (linear := as_linear(module)) is not None]
    for name, linear in targets:
        linear.qconfig = default_dynamic_qconfig
        quantized = DynamicInt8Linear.from_float(linear)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
    return len(targets)


def has_int8_linears(model: nn.Module) -> bool:
    """Return True when some layer of `model` computes with dynamic int8 weights."""
    return any(isinstance(m, DynamicInt8Linear) for m in model.modules())
