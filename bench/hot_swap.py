"""Hot-swap latency on the GPT-2-shaped model with LoRA r=16 on c_attn, while a client generates.

Publishes two adapter versions, then swaps between them `--swaps` times while a client thread
generates in a loop, and prints one JSON line:
  lock_ms   how long generation was paused per swap (the weight copy), p50 and p95: the goal is p50 < 50 ms
  swap_ms   the whole `swap_to` call: checksums, store look-up, waiting for the request in flight, copy
  requests / failed_requests   what the client saw during the swaps (failures must be 0)
The model is built locally into bench/out/gpt2-shaped the first time (about a minute).
Usage: python bench/hot_swap.py [--swaps 50] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from db import Cursor, FeedbackStore, VersionRecord  # noqa: E402
from ppo_feedback.adapters import AdapterState, AdapterStore, VersionLifecycle  # noqa: E402
from ppo_feedback.config import LoraSettings, ModelConfig, SamplingConfig  # noqa: E402
from ppo_feedback.local_models import build_gpt2  # noqa: E402
from ppo_feedback.modeling import add_lora, load_model  # noqa: E402
from ppo_feedback.policy import PolicyWithValueHead  # noqa: E402
from ppo_feedback.serving import ServingModel  # noqa: E402

OUT = ROOT / "bench" / "out"
MODEL_DIR = OUT / "gpt2-shaped"
GOAL_P50_MS = 50.0


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) of values, linear between ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@torch.no_grad()
def perturb(policy: PolicyWithValueHead, seed: int) -> None:
    """Give LoRA B and the value head random weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name or name.startswith("value_head."):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (MODEL_DIR / "config.json").is_file():
        build_gpt2(MODEL_DIR, "gpt2-shaped")

    work = Path(tempfile.mkdtemp(prefix="hot_swap-", dir=OUT))
    store = FeedbackStore(work / "feedback.db")
    loaded = load_model(ModelConfig(model=str(MODEL_DIR), device="cpu"))
    lora = LoraSettings(lora_r=16, lora_alpha=32, lora_target_modules="c_attn")
    policy = PolicyWithValueHead(add_lora(loaded.model, lora), loaded.tokenizer)

    initial = AdapterState.initial(policy)
    adapters = AdapterStore(work / "adapters")
    for seed, parent in ((1, 0), (2, 1)):  # two versions to swap between, published as the worker would
        perturb(policy, seed)
        VersionLifecycle(store, adapters).publish(policy, VersionRecord(parent, loaded.spec, Cursor(), 0, 0))
    initial.restore()
    serving = ServingModel(policy, store, adapters.root, base_model=loaded.spec,
                           sampling=SamplingConfig(num_candidates=1, max_new_tokens=8))
    for version in (1, 2, 1, 2):  # warm up
        serving.swap_to(version)

    counts = {"requests": 0, "failed_requests": 0}
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                serving.generate("The weather today is", rater="bench")
            except Exception as exc:  # noqa: BLE001 - counted, and the first one shown
                if not counts["failed_requests"]:
                    print(f"request failed: {exc!r}", file=sys.stderr)
                counts["failed_requests"] += 1
            counts["requests"] += 1

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    swap_ms, lock_ms, failed_swaps = [], [], 0
    serving.add_listener(lambda event: lock_ms.append(event.locked_s * 1000) if event.ok else None)
    for i in range(args.swaps):
        time.sleep(0.05)  # let the client run between swaps
        start = time.perf_counter()
        failed_swaps += not serving.swap_to(1 + i % 2)
        swap_ms.append((time.perf_counter() - start) * 1000)
    done.set()
    thread.join(60)

    result = {
        "bench": "hot_swap", "model": "gpt2-shaped", "lora": "r16 c_attn", "torch_threads": torch.get_num_threads(),
        "swaps": args.swaps, "failed_swaps": failed_swaps,
        "lock_ms": {"p50": round(statistics.median(lock_ms), 2), "p95": round(percentile(lock_ms, 95), 2)},
        "swap_ms": {"p50": round(statistics.median(swap_ms), 2), "p95": round(percentile(swap_ms, 95), 2)},
        **counts, "goal_p50_ms": GOAL_P50_MS, "goal_met": statistics.median(lock_ms) < GOAL_P50_MS,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
