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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from . import ppo
from .config import PPOConfig
from .features import Responses, Reward, RewardFeatures
from .feedback import Replay
from .generation import Rollout, sample
from .policy import PolicyWithValueHead

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass
class Experience:
    """One batch ready for PPO epochs; shapes (B, R) unless noted."""

    query_response: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    context_length: int
    mask: torch.Tensor
    old_logprobs: torch.Tensor  # the proximal policy's: the policy's own before this iteration's updates
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate to the reference
    scores: torch.Tensor  # (B,)
    non_score_reward: torch.Tensor  # (B,) the KL penalty summed over tokens
    weights: torch.Tensor | None  # truncated importance weights of off-policy samples, else None

    def __len__(self) -> int:
        return self.query_response.shape[0]


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
        self.features = RewardFeatures(policy)

    # --------------------------------------------------------------------------- rollout and scoring

    def rollout(self, prompts: Sequence[str]) -> Rollout:
        """Return one sampled response per prompt, with behaviour logprobs, and values when `samples_exactly`.

        Otherwise `step` takes logprobs and values from a forward, so the sampler skips the value head.
        """
        return self._sample(prompts, self.rollout_seed(),
                            self.policy.value_head if self.policy.samples_exactly else None)

    def reference_rollout(self, prompts: Sequence[str]) -> Rollout:
        """Return one response per prompt sampled as PPO samples, by the reference policy (adapter off), no values.

        Drawn from the configured seed: the same samples every time, the reward model's calibration set.
        """
        with self.policy.peft_model.disable_adapter():
            return self._sample(prompts, self.config.seed, None)

    def _sample(self, prompts: Sequence[str], seed: int, value_head) -> Rollout:
        c = self.config.sampling
        return sample(self.policy.peft_model, self.policy.tokenizer, list(prompts), max_new_tokens=c.max_new_tokens,
                      temperature=c.temperature, top_p=c.top_p, seed=seed, stop_at_eos=c.stop_at_eos,
                      value_head=value_head)

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

    def score(self, prompts: Sequence[str], rollout: Rollout, ref_hidden: torch.Tensor,
              reward: Reward) -> torch.Tensor:
        """Return (B,) scores of `reward` on the rollout (its reference forward gave `ref_hidden`), less any EOS penalty."""
        scores = reward.score(Responses(list(prompts), rollout, ref_hidden, self.features))
        scores = scores.detach().float().to(rollout.logprobs.device)
        if self.config.missing_eos_penalty is not None and self.config.sampling.stop_at_eos:
            eos = self.policy.tokenizer.eos_token_id
            missing_eos = ~(rollout.responses == eos).any(1)
            scores = scores - self.config.missing_eos_penalty * missing_eos.float()
        return scores

    # --------------------------------------------------------------------------- the iteration

    @torch.no_grad()
    def experience(self, rollout: Rollout, ref_logprobs: torch.Tensor, scores: torch.Tensor, *, exact: bool,
                   off_policy: bool = False) -> Experience:
        """Return a rollout's PPO experience: old logprobs and values, KL-penalised rewards, GAE, whitened advantages.

        `exact`: the rollout's own logprobs and values are the policy's now; otherwise one forward
        takes them (the proximal policy). With `off_policy` the rollout's logprobs are the behaviour
        policy's, from which the truncated importance weights are formed, and the scores are relative
        ratings: the advantage is the return (score minus the KL penalty to come), unwhitened.
        """
        c = self.config
        qr, attn, P, mask = rollout.query_response, rollout.attention_mask, rollout.context_length, rollout.response_mask
        old_logprobs, old_values = rollout.logprobs, rollout.values
        if not exact:  # take them from a forward, so the ratio is 1 before any update
            fresh = self.policy(qr, attn, P, c.sampling.temperature)
            old_logprobs, old_values = fresh.logprobs * mask, fresh.values * mask
        kl = ppo.kl_per_token(old_logprobs, ref_logprobs, c.kl_estimator) * mask  # (B, R)
        rewards = ppo.penalized_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl_ctl.value,
                                        c.kl_estimator)  # (B, R)
        non_score_reward = rewards.sum(1) - scores  # (B,)
        if off_policy:
            # A rated sample's score is already relative to its siblings' (a leave-one-out baseline), so
            # its advantage is the return itself: no value baseline, no whitening, the sign kept.
            advantages, returns = ppo.gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
            weights = ppo.truncated_importance_weights(old_logprobs, rollout.logprobs, mask)
        else:
            if c.whiten_rewards:
                rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = ppo.gae(rewards, old_values, mask, c.gamma, c.lam)
            advantages, weights = ppo.masked_whiten(advantages, mask), None
        return Experience(qr, attn, P, mask, old_logprobs, old_values, advantages, returns, kl, scores,
                          non_score_reward, weights)

    def step(self, prompts: Sequence[str], reward: Reward, replay: Replay | None = None) -> dict[str, float]:
        """Run one PPO iteration on `prompts` (and `replay`'s rated samples); return its stats under TRL's names.

        Replayed samples join the PPO epochs with their own scores and KL-penalised returns as
        advantages, each token's clipped term weighted by `ppo.truncated_importance_weights` (they
        were drawn by an older version). The KL controller and the value head see the fresh rollout only.
        """
        c = self.config
        if len(prompts) != c.batch_size:
            raise ValueError(f"step needs batch_size={c.batch_size} prompts, got {len(prompts)}")
        # 1. rollout: responses, behaviour logprobs (= old logprobs, exact) and old values
        rollout = self.rollout(prompts)
        # 2. reference forward (adapter off) gives ref logprobs and the reward model's features
        ref = self.policy.reference(rollout.query_response, rollout.attention_mask, rollout.context_length,
                                    c.sampling.temperature)
        scores = self.score(prompts, rollout, ref.hidden, reward)  # (B,)
        # 3. rewards and advantages
        batches = [self.experience(rollout, ref.logprobs, scores, exact=self.policy.samples_exactly)]
        if replay is not None and len(replay):
            replayed = replay.rollout(self.policy, c.sampling.temperature)
            replay_ref = self.policy.reference(replayed.query_response, replayed.attention_mask,
                                               replayed.context_length, c.sampling.temperature)
            batches.append(self.experience(replayed, replay_ref.logprobs, replay.score_tensor(), exact=False,
                                           off_policy=True))
        # 4. PPO epochs over shuffled minibatches
        epoch_stats: dict[str, list[float]] = {k: [] for k in
                                               ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl", "entropy")}
        for _ in range(c.ppo_epochs):
            minibatches = []
            for index, batch in enumerate(batches):
                order = torch.randperm(len(batch), generator=self.generator)
                minibatches += [(index, order[s:s + c.mini_batch_size]) for s in range(0, len(batch), c.mini_batch_size)]
            interleaved = torch.randperm(len(minibatches), generator=self.generator).tolist() \
                if len(batches) > 1 else range(len(minibatches))
            for k in interleaved:
                index, mb = minibatches[k]
                batch = batches[index]
                out = self.policy(batch.query_response[mb], batch.attention_mask[mb], batch.context_length,
                                  c.sampling.temperature)
                weights = batch.weights[mb] if batch.weights is not None else None
                pg_loss, pg_clipfrac, approx_kl = ppo.policy_loss(out.logprobs, batch.old_logprobs[mb],
                                                                  batch.advantages[mb], batch.mask[mb], c.cliprange,
                                                                  weights)
                loss, stats_now = pg_loss, [("pg_loss", pg_loss), ("pg_clipfrac", pg_clipfrac),
                                            ("approx_kl", approx_kl),
                                            ("entropy", ppo.masked_mean(out.entropy, batch.mask[mb]))]
                if batch.weights is None:  # the value head learns fresh samples only; replayed ones need no baseline
                    vf_loss, vf_clipfrac = ppo.value_loss(out.values, batch.old_values[mb], batch.returns[mb],
                                                          batch.mask[mb], c.cliprange_value)
                    loss = loss + c.vf_coef * vf_loss
                    stats_now += [("vf_loss", vf_loss), ("vf_clipfrac", vf_clipfrac)]
                # decided together, so no process waits forever on another's all-reduce
                if self.all_mean(0.0 if torch.isfinite(loss) else 1.0) > 0:
                    raise FloatingPointError(f"non-finite PPO loss {loss.item()} at iteration {self.iteration}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.accelerator is not None:
                    self._average_gradients()
                torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), c.max_grad_norm)
                self.optimizer.step()
                for name, value in stats_now:
                    epoch_stats[name].append(float(value.detach()))
        fresh = batches[0]
        kl, old_logprobs, mask, non_score_reward = fresh.kl, fresh.old_logprobs, fresh.mask, fresh.non_score_reward
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
        if len(batches) > 1:
            replayed = batches[1]
            stats["replay/samples"] = float(len(replayed))
            stats["replay/scores"] = float(replayed.scores.mean())
            stats["replay/importance_weight"] = float(ppo.masked_mean(replayed.weights, replayed.mask))
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
