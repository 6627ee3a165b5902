"""The anchor's exact PPO work with ppo-feedback's one-network trainer; prints one JSON line.

Work per iteration, as in ../shared/bench/trl_ppo_anchor.py: the GPT-2-shaped model (built locally),
8 prompts, 32 sampled tokens each with no EOS stop, 4 PPO epochs over 1 minibatch, LoRA r=16
alpha=32 on c_attn, a reward from a learned (here randomly initialised) linear head on the
reference forward's hidden states. Time and peak resident memory are measured as the anchor
measures them: wall time of all iterations / iterations, ru_maxrss of the whole process.
With `--dtype bfloat16` the frozen base weights are bfloat16 (LoRA, value head and log-probabilities
stay float32): not the anchor's float32 work, so it prints its dtype; compare it with the anchor's
float32 line knowing that.
Usage: python bench/ppo_iteration.py [ITERATIONS] [MODEL_DIR] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ppo_feedback.config import LoraSettings, ModelConfig, RolloutSampling  # noqa: E402
from ppo_feedback.features import Responses  # noqa: E402
from ppo_feedback.local_models import build_gpt2  # noqa: E402
from ppo_feedback.modeling import add_lora, load_model  # noqa: E402
from ppo_feedback.policy import PolicyWithValueHead  # noqa: E402
from ppo_feedback.trainer import PPOConfig, PPOTrainer  # noqa: E402

PROMPTS = ["Write a short review of a pizza place.", "Tell me about the weather today.",
           "Describe a walk in the park.", "Explain machine learning to a child."]
BATCH, RESPONSE_LENGTH, PPO_EPOCHS = 8, 32, 4


class LinearRewardHead(torch.nn.Module):
    """A reward model head on the reference forward's features (the anchor's reward is a model too)."""

    def __init__(self, feature_size: int):
        super().__init__()
        self.head = torch.nn.Linear(feature_size, 1)

    @torch.no_grad()
    def score(self, responses: Responses) -> torch.Tensor:
        """Return (B,) scores from the responses' (B, F) reward features."""
        return self.head(responses.features.to(self.head.weight.dtype)).squeeze(-1)


def main(iterations: int, model_dir: str | None, dtype: str = "float32") -> None:
    model_dir = model_dir or os.path.join(os.path.dirname(__file__), "out", "gpt2-shaped")
    if not Path(model_dir, "config.json").is_file():
        build_gpt2(model_dir, "gpt2-shaped")
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(model=model_dir, device="cpu", dtype=dtype))
    policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings(lora_r=16, lora_alpha=32,
                                                                     lora_target_modules="c_attn")),
                                 loaded.tokenizer)
    fixed_length = RolloutSampling(max_new_tokens=RESPONSE_LENGTH, stop_at_eos=False, temperature=1.0)
    trainer = PPOTrainer(policy, PPOConfig(batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=PPO_EPOCHS,
                                           sampling=fixed_length))
    reward = LinearRewardHead(trainer.features.size)
    prompts = (PROMPTS * BATCH)[:BATCH]
    start = time.perf_counter()
    for _ in range(iterations):
        stats = trainer.step(prompts, reward)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": "ppo-feedback PPOTrainer (one network)", "iterations": iterations, "batch": BATCH,
                      "response_length": RESPONSE_LENGTH, "ppo_epochs": PPO_EPOCHS, "dtype": dtype,
                      "s_per_iteration": round(seconds / iterations, 3), "peak_rss_mib": round(peak),
                      "threads": torch.get_num_threads(), "last_kl": round(stats["objective/kl"], 4)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("iterations", nargs="?", type=int, default=3)
    parser.add_argument("model_dir", nargs="?", default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the frozen base weights (the anchor's is float32)")
    args = parser.parse_args()
    main(args.iterations, args.model_dir, args.dtype)
