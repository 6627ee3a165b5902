"""Shared fixtures: a tiny GPT-2 and its byte-level BPE tokenizer, built locally once per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's numbers are float32's on any CPU: `--dtype auto` would pick bfloat16 on one with native
# bfloat16 (its own test gives resolve_dtype a cpuinfo file), in this process and in the app and worker
# processes tests start (their options read PPO_FEEDBACK_*).
os.environ.setdefault("PPO_FEEDBACK_DTYPE", "float32")


@pytest.fixture(scope="session", autouse=True)
def float32_on_any_cpu(tmp_path_factory):
    """`--dtype auto` resolves as on a CPU without native bfloat16 for the whole session."""
    from ppo_feedback import modeling

    cpuinfo = tmp_path_factory.mktemp("cpu") / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    saved, modeling.CPUINFO = modeling.CPUINFO, cpuinfo
    yield
    modeling.CPUINFO = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a tiny randomly initialised GPT-2 (2 layers, 64 wide) with its tokenizer."""
    from ppo_feedback.local_models import build_gpt2

    return build_gpt2(tmp_path_factory.mktemp("models") / "gpt2-tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir, tmp_path_factory):
    """The tiny model loaded through the project's own loader (a LoadedModel)."""
    from ppo_feedback.config import ModelConfig
    from ppo_feedback.modeling import load_model

    return load_model(ModelConfig(model=str(tiny_model_dir), device="cpu",
                                  cache_dir=str(tmp_path_factory.mktemp("cache"))))
