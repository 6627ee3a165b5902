"""Int8 serving weights (`--serving-weights int8`) on the tiny GPT-2: LoRA untouched, swaps still land."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ppo_feedback.config import AppConfig, LoraSettings, ModelConfig, SamplingConfig
from ppo_feedback.int8 import has_int8_linears, quantize_base_linears
from ppo_feedback.modeling import ModelSpecError, add_lora, load_model
from ppo_feedback.policy import PolicyWithValueHead
from ppo_feedback.serving import ServingModel
from test_adapters import logits, make_policy, perturb, publish, store, store_dir  # noqa: F401  (fixtures)


def int8_policy(model_dir) -> PolicyWithValueHead:
    """Return the tiny policy as `ServingModel.load(..., weights="int8")` builds it."""
    loaded = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    torch.manual_seed(0)
    peft_model = add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8))
    assert quantize_base_linears(peft_model) > 0
    return PolicyWithValueHead(peft_model, loaded.tokenizer)


def test_only_the_frozen_base_is_quantised(tiny_model_dir):
    policy = int8_policy(tiny_model_dir)
    lora = {n: m for n, m in policy.peft_model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))}
    assert lora and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in lora.values())
    assert all(p.requires_grad for n, p in policy.peft_model.named_parameters() if "lora_" in n)
    assert has_int8_linears(policy.trunk) and not policy.samples_exactly
    assert make_policy(tiny_model_dir).samples_exactly  # the float32 policy still samples exactly


def test_int8_logits_stay_close_to_float32(tiny_model_dir):
    full, quantised = make_policy(tiny_model_dir), int8_policy(tiny_model_dir)
    p, q = logits(full).log_softmax(-1), logits(quantised).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert 0 < float(kl) < 0.05  # rounded, not broken


def test_a_published_version_swaps_into_an_int8_page(tiny_model_dir, store, store_dir):
    trainer = make_policy(tiny_model_dir)
    serving = ServingModel(int8_policy(tiny_model_dir), store, store_dir.root, base_model="tiny",
                           sampling=SamplingConfig(num_candidates=2, max_new_tokens=4))
    try:
        base = logits(serving.policy)
        perturb(trainer, seed=3)
        version = publish(store_dir, trainer, store, parent=0)
        assert serving.poll_once() == version
        served, expected = logits(serving.policy), logits(trainer)
        assert not torch.allclose(served, base, atol=1e-3)  # the adapter took effect through the int8 base
        assert (served.softmax(-1) - expected.softmax(-1)).abs().max() < 0.05
        page = serving.generate("Once upon a time", rater="ana", seed=1)
        assert [g.adapter_version for g in page] == [version, version]
    finally:
        serving.stop()


def test_int8_needs_a_cpu_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ModelSpecError, match="CPU"):
        quantize_base_linears(model)


def test_an_unknown_serving_weights_value_is_refused():
    with pytest.raises(ValueError, match="--serving-weights"):
        AppConfig(serving_weights="int4").validate()
