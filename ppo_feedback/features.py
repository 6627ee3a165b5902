"""Reward features: what the reward model sees of a response, made one way wherever responses come from.

The features of a prompt and response are `response_features` of the frozen base model (adapter
off): the mean of its last hidden states after each response token, and the mean and max of the
response tokens' input embeddings. Responses come from three places, and `RewardFeatures` makes
their features from each the same way, so the same prompt and response always give the same tensor:

- PPO's rollouts, from the reference forward the trainer runs anyway for its KL (`Responses`);
- stored generations, the reward model's training rows (`RewardFeatures.of_generations`, cached);
- samples of the base model, the reward model's calibration set (`RewardFeatures.of_rollout`).

A `Reward` scores `Responses`, a sampled batch as a reward sees it: from its features (the reward
model, `rewards.RewardModel`) or from its texts (`TextReward`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol, Sequence

import torch

from .generation import Rollout, first_eos_mask, max_positions, rollout_of
from .policy import PolicyWithValueHead

Sample = tuple[str, str]  # (prompt, response text)


def response_features(hidden: torch.Tensor, token_embeddings: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """Return (B, 3H) reward features: [mean hidden state, mean token embedding, max token embedding] over the response.

    `hidden` is (B, R + 1, H), index t being the last hidden state after response token t - 1 (index
    0: after the prompt); `token_embeddings` is (B, R, H), the input embeddings of the response tokens.
    Only valid response tokens (`response_mask`) count; an empty response has zero features.

    The contextual mean carries style and topic; the embedding mean and max are a bag of the tokens
    themselves, which a linear head needs to see one word (in a mean of 24 contextual states it is
    diluted).
    """
    mask = response_mask.to(hidden.dtype).unsqueeze(-1)  # (B, R, 1)
    count = mask.sum(1).clamp(min=1.0)  # (B, 1)
    contextual = (hidden[:, 1:] * mask).sum(1) / count  # (B, H)
    embeddings = token_embeddings.to(hidden.dtype)
    mean_embedding = (embeddings * mask).sum(1) / count  # (B, H)
    valid = response_mask.bool().unsqueeze(-1)  # (B, R, 1)
    max_embedding = embeddings.masked_fill(~valid, float("-inf")).amax(1)  # (B, H)
    max_embedding = torch.where(valid.any(1), max_embedding, torch.zeros_like(max_embedding))
    return torch.cat([contextual, mean_embedding, max_embedding], dim=-1)


class RewardFeatures:
    """The reward features of one base model: `response_features` of its adapter-off forward, for any response.

    `cache` maps a stored generation's id to its (F,) features; it stays valid as long as the base
    model does, so a worker that keeps this object featurises each generation once.
    """

    def __init__(self, policy: PolicyWithValueHead):
        self.policy = policy
        self.cache: dict[int, torch.Tensor] = {}

    @property
    def size(self) -> int:
        """Return F, the width of the features: three blocks of the trunk's hidden size."""
        return 3 * self.policy.value_head.in_features

    @torch.no_grad()
    def of_hidden(self, hidden: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Return (B, F) float32 features of a reference forward's (B, R + 1, H) `hidden` and (B, R) response ids."""
        embeddings = self.policy.peft_model.get_input_embeddings()(responses.to(hidden.device))  # (B, R, H)
        return response_features(hidden.float(), embeddings.float(), response_mask.to(hidden.device))

    def of_rollout(self, rollout: Rollout) -> torch.Tensor:
        """Return (B, F) features of a rollout's responses, from one adapter-off forward without the LM head."""
        hidden = self.policy.reference_hidden(rollout.query_response, rollout.attention_mask, rollout.context_length)
        return self.of_hidden(hidden, rollout.responses, rollout.response_mask)

    def of_responses(self, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]],
                     batch_size: int = 16) -> torch.Tensor:
        """Return (N, F) float32 CPU features for each prompt and response (token ids).

        The same tensor the trainer's rewards see for the same prompt and response: prompts are
        encoded with `encode_prompts` (chat template when there is one), left-padded; responses are
        cut after their first EOS (the trainer's response mask) and right-padded. Batches are formed
        by response length, so padding does not depend on the caller's order.
        """
        if len(prompts) != len(response_token_ids):
            raise ValueError("prompts and response_token_ids must have the same length")
        tokenizer = self.policy.tokenizer
        device = next(self.policy.parameters()).device
        positions = max_positions(self.policy.peft_model)
        responses = []
        for ids in response_token_ids:
            ids = torch.as_tensor(list(ids), dtype=torch.long)
            if ids.numel():
                ids = ids[first_eos_mask(ids[None], tokenizer.eos_token_id)[0].bool()]
            responses.append(ids.tolist())
        order = sorted(range(len(prompts)), key=lambda i: len(responses[i]))
        features = torch.empty(len(prompts), self.size)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = rollout_of(tokenizer, [prompts[i] for i in rows], [responses[i] for i in rows],
                               temperature=1.0, device=device, positions=positions)
            features[rows] = self.of_rollout(batch).cpu()  # (b, F)
        return features

    def of_generations(self, generations: Sequence, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Return (N, F) features of stored generations (`db.records.Generation`) and their prompt texts.

        Each is featurised from its stored token ids (its text, tokenised, when none were stored),
        and only when `cache` does not hold it yet.
        """
        missing = [row for row, g in enumerate(generations) if g.id not in self.cache]
        if missing:
            tokenizer = self.policy.tokenizer
            responses = [list(generations[row].token_ids)
                         or tokenizer(generations[row].text, add_special_tokens=False)["input_ids"] for row in missing]
            fresh = self.of_responses([prompts[row] for row in missing], responses, batch_size)
            self.cache.update(zip((generations[row].id for row in missing), fresh))
        return torch.stack([self.cache[g.id] for g in generations])


@dataclass
class Responses:
    """A batch of sampled responses as a reward sees it: (prompt, text) samples and reward features, made when asked."""

    prompts: list[str]
    rollout: Rollout
    reference_hidden: torch.Tensor  # (B, R + 1, H) the reference forward's last hidden states
    reward_features: RewardFeatures

    @cached_property
    def samples(self) -> list[Sample]:
        """Return (prompt, response text) per row: valid tokens only, special tokens dropped."""
        tokenizer = self.reward_features.policy.tokenizer
        lengths = self.rollout.response_mask.sum(1).long().tolist()
        texts = [tokenizer.decode(row[:n], skip_special_tokens=True)
                 for row, n in zip(self.rollout.responses.tolist(), lengths)]
        return list(zip(self.prompts, texts))

    @cached_property
    def features(self) -> torch.Tensor:
        """Return (B, F) reward features of the responses (`RewardFeatures.of_hidden`)."""
        return self.reward_features.of_hidden(self.reference_hidden, self.rollout.responses,
                                              self.rollout.response_mask)


class Reward(Protocol):
    """What PPO maximises: one score per sampled response."""

    def score(self, responses: Responses) -> torch.Tensor:
        """Return (B,) scores of the responses."""


@dataclass
class TextReward:
    """A reward computed from texts: `fn` maps (prompt, response text) samples to one score each."""

    fn: Callable[[Sequence[Sample]], Sequence[float]]

    def score(self, responses: Responses) -> torch.Tensor:
        """Return (B,) float scores of `fn` on the responses' samples."""
        return torch.tensor([float(s) for s in self.fn(responses.samples)])
