"""What a restarted worker pays before it holds the training lease: each start-up piece, timed.

Runs in a fresh process (imports included, as after a crash) the worker's start-up on a model and
prints one JSON line: seconds for import torch, the worker's modules, opening the store, loading the
model, adding LoRA and the value head, building the Worker, taking the lease, and their total.
Usage: python bench/worker_startup.py [--model tiny|smollm2-135m|DIR]   (tiny is built locally into bench/out)
"""
from __future__ import annotations

import time

START = time.perf_counter()
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    """Time the start-up pieces in order and print them as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    last = START

    def mark(what: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[what] = round(now - last, 2)
        last = now

    import torch  # noqa: F401

    mark("import_torch")
    from ppo_feedback.worker import PPOConfig, Worker, WorkerConfig

    mark("import_worker")
    from db import FeedbackStore
    from ppo_feedback.adapters import AdapterStore
    from ppo_feedback.config import LoraSettings, ModelConfig
    from ppo_feedback.local_models import build_gpt2
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead

    model = str(build_gpt2(ROOT / "bench" / "out" / "gpt2-tiny", "tiny")) if args.model == "tiny" else args.model
    last = time.perf_counter()  # building the tiny model is the bench's, not the worker's
    work = Path(tempfile.mkdtemp(prefix="worker-startup-"))
    store = FeedbackStore(work / "feedback.db")
    mark("open_store")
    loaded = load_model(ModelConfig(model=model, device="cpu"))
    mark("load_model")
    policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings()), loaded.tokenizer)
    mark("add_lora")
    worker = Worker(store, AdapterStore(work / "adapters"), policy, PPOConfig(), WorkerConfig(worker_id="bench"),
                    loaded.spec)
    mark("worker")
    assert worker.hold_lease()
    mark("lease")
    worker.drop_lease()
    print(json.dumps({"bench": "worker_startup", "model": args.model, "seconds": seconds,
                      "total_s": round(sum(seconds.values()), 2)}))


if __name__ == "__main__":
    main()
