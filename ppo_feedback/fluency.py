"""The fluency gate a trained version passes before it is published (`--max-perplexity-ratio`).

How perplexing the base model finds a policy's text, against its own text for the same prompts: the
base's expected surprisal of the policy's next token, Σ_x π(x)·(−log p_base(x)), averaged over every
position of fresh policy samples, against its expected surprisal of its own next token (its entropy at
sampling temperature 1) averaged over every position of its own samples of the same prompts; `FluencyGate.ratio`
returns exp of the difference per token. Unlike the per-context `direct.excess_surprisal`, which compares
the two models at the policy's contexts only, this counts where the text goes too: a policy that writes
openings after which the base itself is unsure (lists of names, words in another script) keeps its
next-token choices close to the base's there, yet its text reads far less likely to the base than the
base's own. That is what the benchmark's held-out perplexity ratio measures, on other prompts.

Each sample's surprisal swings with its prompt and where it went, so the comparison is paired by prompt:
the base's own rate per token for a prompt (`reference_samples` samples, drawn once and kept: the base
never changes) is subtracted from each policy sample of it. Expected surprisals, not sampled ones, so the
draw of each token adds no noise.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .direct import expected_surprisal
from .trainer import PPOTrainer

ROWS_PER_FORWARD = 8
"""Responses whose logits one forward of `FluencyGate.surprisal` computes: (8, 48, 49152) float32 logits of
SmolLM2 are 75 MB, 32 at once 300 MB a tensor."""


class FluencyGate:
    """Measures a `PPOTrainer`'s policy's text against the base model's own, per pool prompt (see the module)."""

    def __init__(self, trainer: PPOTrainer, reference_samples: int = 2):
        if reference_samples < 1:
            raise ValueError("reference_samples must be >= 1")
        self.trainer, self.reference_samples = trainer, reference_samples
        self._base_rate: dict[str, float] = {}  # prompt -> the base's mean entropy per token over its own samples

    def ratio(self, prompts: Sequence[str]) -> float:
        """Return exp of the per-token mean, over one fresh policy sample of each of `prompts` (repeats
        allowed), of the base's expected surprisal of the policy's next token less the base's own rate for
        that sample's prompt (`base_rate`): 1 for the base itself, up to the noise of which contexts its
        samples reach; averaged over the team."""
        rates = self.base_rates(prompts)
        rollout = self.trainer.rollout(prompts)
        surprisal, tokens = self.surprisal(rollout)  # (B,) sums and token counts
        excess = (surprisal - torch.tensor([rates[p] for p in prompts], device=tokens.device) * tokens).sum()
        team = self.trainer.team
        return math.exp(team.mean(excess) / max(team.mean(tokens.sum()), 1e-9))

    def base_rates(self, prompts: Sequence[str]) -> dict[str, float]:
        """Return {prompt: the base model's expected surprisal of its own next token per token, over its own
        samples of it}, sampling `reference_samples` responses of each prompt not seen before (adapter off, as
        PPO samples, from the configured seed)."""
        new = sorted(set(prompts) - self._base_rate.keys())
        if new:
            rows = [p for p in new for _ in range(self.reference_samples)]
            entropy, tokens = self.surprisal(self.trainer.reference_rollout(rows), of_base=True)
            for i, prompt in enumerate(new):
                part = slice(i * self.reference_samples, (i + 1) * self.reference_samples)
                self._base_rate[prompt] = float(entropy[part].sum()) / max(float(tokens[part].sum()), 1.0)
        return self._base_rate

    @torch.no_grad()
    def surprisal(self, rollout, *, of_base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (B,) sums over each response's tokens of the base's expected surprisal of the next token
        the policy would draw there (at the sampling temperature; `of_base`: the base's own draw, its entropy
        at temperature 1), and the (B,) token counts; `ROWS_PER_FORWARD` responses at a time (their whole-vocabulary
        logits are large)."""
        policy, T = self.trainer.policy, self.trainer.config.sampling.temperature
        P, sums = rollout.context_length, []
        for rows in torch.arange(rollout.query_response.shape[0]).split(ROWS_PER_FORWARD):
            qr, attn, mask = rollout.query_response[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
            base_logits = policy.response_logits(qr, attn, P, reference=True)
            logits = base_logits if of_base else policy.response_logits(qr, attn, P)
            sums.append((expected_surprisal(logits / T, base_logits) * mask).sum(1))
        return torch.cat(sums), rollout.response_mask.sum(1)
