"""One base network in every role: policy (base + LoRA), reference (adapter disabled), value head.

One forward of the trunk gives the last hidden states; the LM head is applied to the response slice
only, so the `(B, R, V)` logits exist once per forward and the prompt's logits never do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ForwardOutput:
    """Per-response-token results of one forward. Shapes (B, R) unless noted."""

    logprobs: torch.Tensor  # log softmax(logits / temperature) at the response tokens
    entropy: torch.Tensor  # entropy of softmax(logits / temperature), detached
    hidden: torch.Tensor  # (B, R, H) last hidden state that predicts each response token
    values: torch.Tensor | None = None  # value head on `hidden` (policy forwards only)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return position ids that skip left padding, the same rule `generate` uses: cumsum(mask) - 1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """A peft LoRA model plus a zero-initialised linear value head on its last hidden state."""

    def __init__(self, peft_model: nn.Module, tokenizer=None):
        super().__init__()
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        causal_lm = peft_model.get_base_model()
        self.trunk = getattr(causal_lm, causal_lm.base_model_prefix)
        self.lm_head = causal_lm.get_output_embeddings()
        hidden_size = causal_lm.config.get_text_config().hidden_size
        device = next(peft_model.parameters()).device
        self.value_head = nn.Linear(hidden_size, 1, device=device)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at start: no noisy value targets on step one
        nn.init.zeros_(self.value_head.bias)
        self.eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Return the parameters PPO updates: the LoRA weights and the value head."""
        return [p for p in self.parameters() if p.requires_grad]

    def _forward(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                 temperature: float) -> ForwardOutput:
        hidden = self.trunk(input_ids=query_response, attention_mask=attention_mask,
                            position_ids=position_ids_for(attention_mask), use_cache=False).last_hidden_state
        hidden = hidden[:, context_length - 1:-1]  # (B, R, H): state before each response token
        logits = self.lm_head(hidden).float() / temperature  # (B, R, V), the only vocab-sized tensor
        log_z = torch.logsumexp(logits, dim=-1)  # (B, R)
        responses = query_response[:, context_length:]
        logprobs = logits.gather(-1, responses.unsqueeze(-1)).squeeze(-1) - log_z
        with torch.no_grad():
            entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return ForwardOutput(logprobs=logprobs, entropy=entropy, hidden=hidden)

    def forward(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                temperature: float = 1.0) -> ForwardOutput:
        """Return the policy's response logprobs, entropy and values from one forward (grad enabled)."""
        out = self._forward(query_response, attention_mask, context_length, temperature)
        out.values = self.value_head(out.hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return out

    @torch.no_grad()
    def reference(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                  temperature: float = 1.0) -> ForwardOutput:
        """Return the reference policy's (adapter disabled) response logprobs and hidden states, no grad."""
        with self.peft_model.disable_adapter():
            return self._forward(query_response, attention_mask, context_length, temperature)
