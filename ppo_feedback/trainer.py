"""One PPO iteration on a LoRA policy whose base network also plays reference and value model.

The iteration, in the order of Ziegler et al. (2019) and Huang et al. ("The N implementation details
of RLHF with PPO"): sample responses with behaviour logprobs and values (one generate), score them,
reference logprobs (one adapter-off forward), KL-penalised rewards, GAE, whitened advantages, then
`ppo_epochs` passes over shuffled minibatches, each minibatch one forward for logprobs and values.
With a reduced-precision base (bfloat16, 4/8-bit) one extra no-grad forward replaces the sampler's
logprobs and values, whose kernels round differently.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file

from . import ppo
from .config import PPOConfig
from .generation import Rollout, sample
from .policy import PolicyWithValueHead

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
Sample = tuple[str, str]  # (prompt, response text)
RewardFn = Callable[[Sequence[Sample]], Sequence[float]]


class HiddenStateReward(Protocol):
    """A reward that scores from the reference forward's hidden states, avoiding a separate model."""

    def score_hidden(self, features: torch.Tensor) -> torch.Tensor:
        """Return (B,) scores from (B, F) response features (`PolicyWithValueHead.reward_features`)."""


class PPOTrainer:
    """Runs PPO iterations on a PolicyWithValueHead; keeps the optimizer and KL controller state.

    With an `accelerate.Accelerator` of several processes (`accelerate launch`), each process
    samples and scores its own `batch_size` responses; gradients are averaged across processes
    before every optimizer step and the KL and statistics are averaged too, so every process keeps
    identical weights. Advantages are whitened per process.
    """

    def __init__(self, policy: PolicyWithValueHead, config: PPOConfig, accelerator=None):
        config.validate()
        self.policy = policy
        self.config = config
        self.accelerator = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
        if self.accelerator is not None:
            from accelerate.utils import broadcast

            for p in policy.trainable_parameters():  # every process starts from process 0's weights
                p.data.copy_(broadcast(p.data.clone(), from_process=0))
        self.optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=config.learning_rate, eps=1e-5)
        self.kl_ctl = (ppo.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
                       if config.adaptive_kl else ppo.FixedKLController(config.init_kl_coef))
        self.iteration = 0
        self.generator = torch.Generator().manual_seed(config.seed)

    # --------------------------------------------------------------------------- rollout and scoring

    def rollout(self, prompts: Sequence[str]) -> Rollout:
        """Return one sampled response per prompt, with behaviour logprobs, and values when `samples_exactly`.

        Otherwise `step` takes logprobs and values from a forward, so the sampler skips the value head.
        """
        c = self.config
        return sample(self.policy.peft_model, self.policy.tokenizer, list(prompts), max_new_tokens=c.response_length,
                      temperature=c.temperature, top_p=c.top_p, seed=self.rollout_seed(),
                      stop_at_eos=c.stop_at_eos,
                      value_head=self.policy.value_head if self.policy.samples_exactly else None)

    def rollout_seed(self) -> int:
        """Return this iteration's sampling seed, distinct for every process of a data-parallel run."""
        rank, world = (self.accelerator.process_index, self.accelerator.num_processes) if self.accelerator else (0, 1)
        return self.config.seed + self.iteration * world + rank

    def all_mean(self, value: torch.Tensor | float) -> float:
        """Return the mean of `value` over all processes (the value itself in a single process)."""
        if self.accelerator is None:
            return float(value)
        return float(self.accelerator.reduce(torch.as_tensor(float(value)).reshape(1), reduction="mean"))

    def _average_gradients(self) -> None:
        for p in self.policy.trainable_parameters():
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def decode(self, rollout: Rollout) -> list[str]:
        """Return the response texts of a rollout (valid tokens only, special tokens dropped)."""
        lengths = rollout.response_mask.sum(1).long().tolist()
        return [self.policy.tokenizer.decode(row[:n], skip_special_tokens=True)
                for row, n in zip(rollout.responses.tolist(), lengths)]

    def score(self, prompts: Sequence[str], rollout: Rollout, ref_hidden: torch.Tensor,
              reward_fn) -> torch.Tensor:
        """Return (B,) scores: from hidden states when the reward supports it, else from texts."""
        if hasattr(reward_fn, "score_hidden"):
            scores = reward_fn.score_hidden(self.policy.reward_features(ref_hidden, rollout.responses,
                                                                        rollout.response_mask))
        else:
            samples = list(zip(prompts, self.decode(rollout)))
            scores = torch.tensor([float(s) for s in reward_fn(samples)])
        scores = scores.detach().float().to(rollout.logprobs.device)
        if self.config.missing_eos_penalty is not None and self.config.stop_at_eos:
            eos = self.policy.tokenizer.eos_token_id
            missing_eos = ~(rollout.responses == eos).any(1)
            scores = scores - self.config.missing_eos_penalty * missing_eos.float()
        return scores

    # --------------------------------------------------------------------------- the iteration

    def step(self, prompts: Sequence[str], reward_fn: RewardFn | HiddenStateReward) -> dict[str, float]:
        """Run one PPO iteration on `prompts`; return its stats under TRL's metric names."""
        c = self.config
        if len(prompts) != c.batch_size:
            raise ValueError(f"step needs batch_size={c.batch_size} prompts, got {len(prompts)}")
        # 1. rollout: responses, behaviour logprobs (= old logprobs, exact) and old values
        rollout = self.rollout(prompts)
        qr, attn, P, mask = rollout.query_response, rollout.attention_mask, rollout.context_length, rollout.response_mask
        old_logprobs, old_values = rollout.logprobs, rollout.values
        if not self.policy.samples_exactly:  # take them from a forward, so the ratio is 1 before any update
            with torch.no_grad():
                fresh = self.policy(qr, attn, P, c.temperature)
            old_logprobs, old_values = fresh.logprobs * mask, fresh.values * mask
        # 2. reference forward (adapter off) gives ref logprobs and the reward model's features
        ref = self.policy.reference(qr, attn, P, c.temperature)
        scores = self.score(prompts, rollout, ref.hidden, reward_fn)  # (B,)
        # 3. rewards and advantages
        with torch.no_grad():
            kl = ppo.kl_per_token(old_logprobs, ref.logprobs, c.kl_estimator) * mask  # (B, R)
            rewards = ppo.penalized_rewards(scores, old_logprobs, ref.logprobs, mask, self.kl_ctl.value,
                                            c.kl_estimator)  # (B, R)
            non_score_reward = rewards.sum(1) - scores  # (B,)
            if c.whiten_rewards:
                rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = ppo.gae(rewards, old_values, mask, c.gamma, c.lam)
            advantages = ppo.masked_whiten(advantages, mask)
        # 4. PPO epochs over shuffled minibatches
        epoch_stats: dict[str, list[float]] = {k: [] for k in
                                               ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl", "entropy")}
        for _ in range(c.ppo_epochs):
            order = torch.randperm(c.batch_size, generator=self.generator)
            for start in range(0, c.batch_size, c.mini_batch_size):
                mb = order[start:start + c.mini_batch_size]
                out = self.policy(qr[mb], attn[mb], P, c.temperature)
                pg_loss, pg_clipfrac, approx_kl = ppo.policy_loss(out.logprobs, old_logprobs[mb], advantages[mb],
                                                                  mask[mb], c.cliprange)
                vf_loss, vf_clipfrac = ppo.value_loss(out.values, old_values[mb], returns[mb], mask[mb],
                                                      c.cliprange_value)
                loss = pg_loss + c.vf_coef * vf_loss
                # decided together, so no process waits forever on another's all-reduce
                if self.all_mean(0.0 if torch.isfinite(loss) else 1.0) > 0:
                    raise FloatingPointError(f"non-finite PPO loss {loss.item()} at iteration {self.iteration}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.accelerator is not None:
                    self._average_gradients()
                torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), c.max_grad_norm)
                self.optimizer.step()
                for name, value in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("pg_clipfrac", pg_clipfrac),
                                    ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl),
                                    ("entropy", ppo.masked_mean(out.entropy, mask[mb]))):
                    epoch_stats[name].append(float(value.detach()))
        # 5. KL controller, and stats named as TRL names them (sums over tokens, means over the batch)
        mean_kl = self.all_mean(kl.sum(1).mean())
        kl_coef = self.kl_ctl.value
        world = self.accelerator.num_processes if self.accelerator else 1
        self.kl_ctl.update(mean_kl, c.batch_size * world)
        self.iteration += 1
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        stats = {
            "objective/kl": mean_kl,
            "objective/entropy": float((-old_logprobs * mask).sum(1).mean()),
            "objective/non_score_reward": float(non_score_reward.mean()),
            "objective/scores": float(scores.mean()),
            "objective/rlhf_reward": float((scores + non_score_reward).mean()),
            "policy/approxkl": mean(epoch_stats["approx_kl"]),
            "policy/clipfrac": mean(epoch_stats["pg_clipfrac"]),
            "policy/entropy": mean(epoch_stats["entropy"]),
            "loss/policy": mean(epoch_stats["pg_loss"]),
            "loss/value": mean(epoch_stats["vf_loss"]),
            "val/clipfrac": mean(epoch_stats["vf_clipfrac"]),
            "val/mean_length": float(mask.sum(1).mean()),
            "kl_coef": kl_coef,
            "lr": self.optimizer.param_groups[0]["lr"],
            "iteration": self.iteration,
        }
        if self.accelerator is not None:  # one all-reduce for every statistic
            names = list(stats)
            means = self.accelerator.reduce(torch.tensor([float(stats[n]) for n in names]), reduction="mean")
            stats = dict(zip(names, means.tolist()))
        return stats

    # --------------------------------------------------------------------------- save and resume

    def save_state(self, directory: str | Path, include_adapter: bool = True) -> None:
        """Write the trainable state: LoRA (PEFT format) and value head unless excluded, optimizer and controller."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if include_adapter:
            self.policy.save_adapter(directory)
        tensors = {}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        save_file(tensors, str(directory / OPTIMIZER_FILE))
        (directory / TRAINER_STATE_FILE).write_text(json.dumps(
            {"iteration": self.iteration, "kl_coef": self.kl_ctl.value, "config": asdict(self.config)}, indent=2))

    def load_state(self, directory: str | Path, include_adapter: bool = True) -> None:
        """Restore what save_state wrote, so training resumes where it stopped."""
        directory = Path(directory)
        if include_adapter:
            self.policy.load_adapter(directory)
        state = self.optimizer.state_dict()
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            index, key = name.split(".", 1)
            per_param.setdefault(int(index), {})[key] = tensor
        state["state"] = per_param
        self.optimizer.load_state_dict(state)
        meta = json.loads((directory / TRAINER_STATE_FILE).read_text())
        self.iteration = int(meta["iteration"])
        if math.isfinite(meta["kl_coef"]):
            self.kl_ctl.value = float(meta["kl_coef"])
