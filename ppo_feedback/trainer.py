"""One PPO iteration on a LoRA policy whose base network also plays reference and value model.

The iteration, in the order of Ziegler et al. (2019) and Huang et al. ("The N implementation details
of RLHF with PPO"), as three steps:

- `collect`: sample responses with behaviour logprobs and values (one generate), score them, take
  reference logprobs (one adapter-off forward), KL-penalised rewards, GAE, whitened advantages;
- `update`: `ppo_epochs` passes over shuffled minibatches, each one forward for PPO's `loss` (the
  clipped policy loss plus the value loss) and one optimizer step;
- `stats`: what the iteration did, under TRL's names.

With a reduced-precision base (bfloat16, 4/8-bit) one extra no-grad forward replaces the sampler's
logprobs and values, whose kernels round differently. With a `Team` of several processes each
samples its own batch; gradients, the KL and the statistics are averaged over the team.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
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
from .team import Team

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
    advantages: torch.Tensor  # whitened GAE for fresh samples; the unwhitened return for replayed ones
    returns: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate to the reference
    scores: torch.Tensor  # (B,)
    non_score_reward: torch.Tensor  # (B,) the KL penalty summed over tokens
    weights: torch.Tensor | None  # truncated importance weights of off-policy samples, else None

    def __len__(self) -> int:
        return self.query_response.shape[0]

    def take(self, rows: torch.Tensor) -> Experience:
        """Return the experience of `rows` only (a minibatch)."""
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{name: part[rows] if isinstance(part, torch.Tensor) else part
                             for name, part in parts.items()})


class PPOTrainer:
    """Runs PPO iterations on a PolicyWithValueHead; keeps the optimizer and KL controller state.

    With a `Team` of several processes (`accelerate launch`), each process samples and scores its
    own `batch_size` responses; gradients are averaged across processes before every optimizer step
    and the KL and statistics are averaged too, so every process keeps identical weights. Advantages
    are whitened per process.
    """

    def __init__(self, policy: PolicyWithValueHead, config: PPOConfig, team: Team | None = None):
        config.validate()
        self.policy = policy
        self.config = config
        self.team = team or Team()
        self.team.copy_from_main(policy.trainable_parameters())  # every process starts from the same weights
        self.optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=config.learning_rate, eps=1e-5)
        self.kl_ctl = (ppo.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
                       if config.adaptive_kl else ppo.FixedKLController(config.init_kl_coef))
        self.iteration = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.features = RewardFeatures(policy)

    def step(self, prompts: Sequence[str], reward: Reward, replay: Replay | None = None) -> dict[str, float]:
        """Run one PPO iteration on `prompts` (and `replay`'s rated samples); return its stats under TRL's names.

        Replayed samples join the PPO epochs with their own scores and KL-penalised returns as
        advantages, each token's clipped term weighted by `ppo.truncated_importance_weights` (they
        were drawn by an older version). The KL controller and the value head see the fresh rollout only.
        """
        batches = self.collect(prompts, reward, replay)
        history = self.update(batches)
        kl_coef = self.kl_ctl.value
        mean_kl = self.team.mean(batches[0].kl.sum(1).mean())
        self.kl_ctl.update(mean_kl, self.config.batch_size * self.team.size)
        self.iteration += 1
        return self.stats(batches, history, mean_kl=mean_kl, kl_coef=kl_coef)

    # --------------------------------------------------------------------------- collect

    def collect(self, prompts: Sequence[str], reward: Reward, replay: Replay | None = None) -> list[Experience]:
        """Return the iteration's experience: the fresh rollout's, then the replayed samples' when there are any.

        One sampled response per prompt, with its behaviour logprobs (the old logprobs when
        `samples_exactly`) and values; one reference forward (adapter off) gives the reference
        logprobs and the reward's features.
        """
        c = self.config
        if len(prompts) != c.batch_size:
            raise ValueError(f"step needs batch_size={c.batch_size} prompts, got {len(prompts)}")
        rollout = self.rollout(prompts)
        ref = self.policy.reference(rollout.query_response, rollout.attention_mask, rollout.context_length,
                                    c.sampling.temperature)
        scores = self.score(prompts, rollout, ref.hidden, reward)  # (B,)
        batches = [self.experience(rollout, ref.logprobs, scores, exact=self.policy.samples_exactly)]
        if replay is not None and len(replay):
            batches.append(self.replayed(replay))
        return batches

    def rollout(self, prompts: Sequence[str]) -> Rollout:
        """Return one sampled response per prompt, with behaviour logprobs, and values when `samples_exactly`.

        Otherwise `collect` takes logprobs and values from a forward, so the sampler skips the value head.
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
        """Return this iteration's sampling seed, distinct for every process of a data-parallel team."""
        return self.config.seed + self.iteration * self.team.size + self.team.rank

    def score(self, prompts: Sequence[str], rollout: Rollout, ref_hidden: torch.Tensor,
              reward: Reward) -> torch.Tensor:
        """Return (B,) `reward` scores of the rollout (`ref_hidden`: its reference forward's), less EOS penalties."""
        scores = reward.score(Responses(list(prompts), rollout, ref_hidden, self.features))
        scores = scores.detach().float().to(rollout.logprobs.device)
        if self.config.missing_eos_penalty is not None and self.config.sampling.stop_at_eos:
            eos = self.policy.tokenizer.eos_token_id
            missing_eos = ~(rollout.responses == eos).any(1)
            scores = scores - self.config.missing_eos_penalty * missing_eos.float()
        return scores

    def replayed(self, replay: Replay) -> Experience:
        """Return the experience of rated samples drawn by older versions: off-policy, their ratings as scores."""
        c = self.config
        rollout = replay.rollout(self.policy, c.sampling.temperature)
        ref = self.policy.reference(rollout.query_response, rollout.attention_mask, rollout.context_length,
                                    c.sampling.temperature)
        return self.experience(rollout, ref.logprobs, replay.score_tensor(), exact=False, off_policy=True)

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
        return Experience(query_response=qr, attention_mask=attn, context_length=P, mask=mask,
                          old_logprobs=old_logprobs, old_values=old_values, advantages=advantages, returns=returns,
                          kl=kl, scores=scores, non_score_reward=non_score_reward, weights=weights)

    # --------------------------------------------------------------------------- update

    def update(self, batches: list[Experience]) -> dict[str, list[float]]:
        """Run `ppo_epochs` passes of `loss` over shuffled minibatches, a step each; return their statistics by name."""
        history: dict[str, list[float]] = defaultdict(list)
        for _ in range(self.config.ppo_epochs):
            for minibatch in self.minibatches(batches):
                loss, stats = self.loss(minibatch)
                self.optimize(loss)
                for name, value in stats.items():
                    history[name].append(float(value.detach()))
        return history

    def minibatches(self, batches: list[Experience]) -> list[Experience]:
        """Return one epoch's minibatches: each batch shuffled and cut, the pieces of several batches interleaved."""
        size = self.config.mini_batch_size
        pieces = []
        for batch in batches:
            order = torch.randperm(len(batch), generator=self.generator)
            pieces += [(batch, order[start:start + size]) for start in range(0, len(batch), size)]
        if len(batches) > 1:
            pieces = [pieces[k] for k in torch.randperm(len(pieces), generator=self.generator).tolist()]
        return [batch.take(rows) for batch, rows in pieces]

    def loss(self, minibatch: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return PPO's loss on a minibatch, one forward of the policy, and its statistics by name.

        The clipped policy loss (importance-weighted for replayed samples) plus `vf_coef` times the
        clipped value loss; the value head learns fresh samples only, replayed ones need no baseline.
        """
        c, mb = self.config, minibatch
        out = self.policy(mb.query_response, mb.attention_mask, mb.context_length, c.sampling.temperature)
        pg_loss, pg_clipfrac, approx_kl = ppo.policy_loss(out.logprobs, mb.old_logprobs, mb.advantages, mb.mask,
                                                          c.cliprange, mb.weights)
        stats = {"pg_loss": pg_loss, "pg_clipfrac": pg_clipfrac, "approx_kl": approx_kl,
                 "entropy": ppo.masked_mean(out.entropy, mb.mask)}
        if mb.weights is not None:
            return pg_loss, stats
        vf_loss, vf_clipfrac = ppo.value_loss(out.values, mb.old_values, mb.returns, mb.mask, c.cliprange_value)
        return pg_loss + c.vf_coef * vf_loss, {**stats, "vf_loss": vf_loss, "vf_clipfrac": vf_clipfrac}

    def optimize(self, loss: torch.Tensor) -> None:
        """Take one optimizer step on `loss`, its gradients averaged over the team and clipped to `max_grad_norm`.

        Raises FloatingPointError, before any step, when the loss is not finite in some process.
        """
        if self.team.any(not torch.isfinite(loss)):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at iteration {self.iteration}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.team.mean_gradients(self.policy.trainable_parameters())
        torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()

    # --------------------------------------------------------------------------- stats

    def stats(self, batches: list[Experience], history: dict[str, list[float]], *, mean_kl: float,
              kl_coef: float) -> dict[str, float]:
        """Return the iteration's statistics under TRL's names, averaged over the team.

        `objective/*` and `val/mean_length` describe the fresh rollout (sums over tokens, means over
        the batch); `policy/*`, `loss/*` and `val/clipfrac` are means over the minibatches' `history`;
        `replay/*` describe the replayed samples, when there were any.
        """
        fresh = batches[0]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        stats = {
            "objective/kl": mean_kl,
            "objective/entropy": float((-fresh.old_logprobs * fresh.mask).sum(1).mean()),
            "objective/non_score_reward": float(fresh.non_score_reward.mean()),
            "objective/scores": float(fresh.scores.mean()),
            "objective/rlhf_reward": float((fresh.scores + fresh.non_score_reward).mean()),
            "policy/approxkl": mean(history["approx_kl"]),
            "policy/clipfrac": mean(history["pg_clipfrac"]),
            "policy/entropy": mean(history["entropy"]),
            "loss/policy": mean(history["pg_loss"]),
            "loss/value": mean(history["vf_loss"]),
            "val/clipfrac": mean(history["vf_clipfrac"]),
            "val/mean_length": float(fresh.mask.sum(1).mean()),
            "kl_coef": kl_coef,
            "lr": self.optimizer.param_groups[0]["lr"],
            "iteration": self.iteration,
        }
        for replayed in batches[1:]:
            stats["replay/samples"] = float(len(replayed))
            stats["replay/scores"] = float(replayed.scores.mean())
            stats["replay/importance_weight"] = float(ppo.masked_mean(replayed.weights, replayed.mask))
        return self.team.mean_stats(stats)

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
