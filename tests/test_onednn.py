"""Tests for ppo_feedback.onednn: the same products and gradients as F.linear, and which layers are routed."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ppo_feedback import generation, onednn
from ppo_feedback.config import LoraSettings
from ppo_feedback.modeling import add_lora


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Float32 rounding of sums taken in another order: relative to the largest entry."""
    torch.testing.assert_close(a, b, atol=1e-5 * float(b.detach().abs().max()), rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (1, 7)])
def test_linear_matches_f_linear_and_its_input_gradient(shape, bias):
    torch.manual_seed(0)
    weight, b = torch.randn(11, 7), (torch.randn(11) if bias else None)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = onednn.linear(x, weight, b), F.linear(x_ref, weight, b)
    assert y.shape == y_ref.shape == (*shape[:-1], 11)
    _close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    _close(x.grad, x_ref.grad)


def test_linear_takes_a_weight_and_an_input_of_any_layout():
    torch.manual_seed(1)
    x, weight = torch.randn(6, 9), torch.randn(9, 4)  # (in, out), as GPT-2's Conv1D stores it
    expected = x @ weight
    _close(onednn.linear(x, weight.t()), expected)  # a column-major (out, in) view
    _close(onednn.linear(x, weight.t().contiguous()), expected)
    _close(onednn.linear(x.t().contiguous().t(), weight.t()), expected)  # a column-major input
    wide = torch.randn(6, 12)
    _close(onednn.linear(wide[:, 2:11], weight.t()), wide[:, 2:11] @ weight)  # a slice


def test_linear_leaves_what_it_cannot_compute_to_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(onednn, "_product", lambda *args: calls.append(args) or F.linear(args[0], args[1], args[2]))
    x = torch.randn(3, 4)
    trainable = torch.randn(2, 4, requires_grad=True)
    onednn.linear(x, trainable).sum().backward()  # a weight that trains gets its gradient from F.linear
    assert trainable.grad is not None and not calls
    with torch.no_grad():
        onednn.linear(x, trainable)  # no gradient taken here: oneDNN's
    assert len(calls) == 1
    calls.clear()
    onednn.linear(x.double(), torch.randn(2, 4, dtype=torch.float64))
    onednn.linear(x.bfloat16(), torch.randn(2, 4, dtype=torch.bfloat16))
    assert not calls
    onednn.linear(x, torch.randn(2, 4))
    assert len(calls) == 1


def _tiny_layers() -> nn.Module:
    conv = Conv1D(6, 5)  # weight (in 5, out 6)
    with torch.no_grad():
        conv.weight.data = conv.weight.data.t().contiguous().t()  # column-major, as modeling stores it
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), conv, nn.Linear(6, 3).to(torch.bfloat16))


def test_route_linears_routes_float32_linear_and_conv1d_only():
    torch.manual_seed(2)
    model = _tiny_layers().requires_grad_(False)
    x = torch.randn(2, 4)
    expected = model[2](model[1](model[0](x)))
    assert onednn.route_linears(model, force=True) == 2
    assert [onednn.is_routed(m) for m in model] == [True, False, True, False]
    assert onednn.route_linears(model, force=True) == 0  # once is enough
    _close(model[2](model[1](model[0](x))), expected)


def test_route_linears_only_on_the_capabilities_it_was_measured_on(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not onednn.routes_here()
    assert onednn.route_linears(_tiny_layers()) == 0
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert onednn.routes_here() == (torch.backends.mkldnn.is_available()
                                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def test_a_routed_lora_model_trains_as_an_unrouted_one(tiny_loaded):
    torch.manual_seed(3)
    plain = copy.deepcopy(tiny_loaded.model)
    for module in plain.modules():  # as loaded on a CPU that routes nothing
        module.__dict__.pop("forward", None)
    routed = copy.deepcopy(plain)
    assert onednn.route_linears(routed, force=True) > 0
    ids = torch.randint(100, (2, 9))
    grads = []
    for model in (plain, routed):
        torch.manual_seed(4)
        peft_model = add_lora(model, LoraSettings(lora_r=4, lora_alpha=8, lora_target_modules="c_attn"))
        peft_model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        _close(grads[1][name], grads[0][name])


def test_a_deep_copy_routes_its_own_layers():
    model = _tiny_layers().requires_grad_(False)
    onednn.route_linears(model, force=True)
    clone = copy.deepcopy(model)
    assert onednn.is_routed(clone[0]) and clone[0].forward.__self__ is clone[0]


def test_a_decode_streams_routed_layers_at_a_few_rows_and_routes_the_rest(tiny_loaded, monkeypatch):
    model = copy.deepcopy(tiny_loaded.model)
    onednn.route_linears(model, force=True)
    routed = [m for m in model.modules() if onednn.is_routed(m)]
    assert routed and set(routed) <= set(generation._skinny_candidates(model))
    calls = []
    product = onednn._product
    monkeypatch.setattr(onednn, "_product", lambda *args: calls.append(args[0].shape[0]) or product(*args))
    layer = routed[0]
    width = onednn.out_in_weight(layer).shape[1]
    with torch.no_grad(), generation.skinny_linears(routed):
        shapes = [layer(torch.randn(rows, 1, width)).shape[0] for rows in (4, 1, 5, 2)]
    assert shapes == [4, 1, 5, 2] and calls == [1, 5]  # 2 to 4 rows streamed, 1 and 5 by oneDNN
    assert all(onednn.is_routed(m) for m in routed)  # put back as they were
    generation.generate(model, tiny_loaded.tokenizer, "hello", 3, 4, seed=0)
    assert all(onednn.is_routed(m) for m in routed)
