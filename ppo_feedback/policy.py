"""One base network in every role: policy (base + LoRA), reference (adapter disabled), value head.

One forward of the trunk gives the last hidden states; the LM head is applied to the response slice
only, so the `(B, R, V)` logits exist once per forward and the prompt's logits never do. Rows that
share a prompt (a page's candidates, a DPO pair) have it computed once: the trunk runs over the
distinct prompts, then over every row's response with its prompt's KV cache (`_hidden_shared`).
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from .logprobs import logprobs_and_entropy
from .versions import ADAPTER_WEIGHTS, VALUE_HEAD_WEIGHTS, AdapterLoadError


@dataclass
class ForwardOutput:
    """Per-response-token results of one forward. Shapes (B, R) unless noted."""

    logprobs: torch.Tensor  # log softmax(logits / temperature) at the response tokens
    entropy: torch.Tensor  # entropy of softmax(logits / temperature), detached
    hidden: torch.Tensor  # (B, R + 1, H) last hidden states from the one predicting response token 0
    #                       to the one after the last response slot
    values: torch.Tensor | None = None  # value head on `hidden` (policy forwards only)


def split_causal_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return (trunk, lm_head) of a causal LM or of a peft model wrapping one (LoRA layers stay in the trunk)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return the (B, R) log-probabilities of `tokens` (B, R) under the softmax of `logits` (B, R, V)."""
    return logprobs_and_entropy(logits, tokens)[0]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return position ids that skip left padding, the same rule `generate` uses: cumsum(mask) - 1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_keyword(trunk: nn.Module) -> str:
    """Return the name the trunk's forward uses for the KV cache (`cache` in transformers 5.2x)."""
    params = inspect.signature(trunk.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def distinct_prompts(query_response: torch.Tensor, attention_mask: torch.Tensor,
                     context_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (input_ids (U, P), attention_mask (U, P), rows (B,)): the batch's distinct prompt columns,
    padded as the batch is, and the index of each row's prompt among them."""
    P = context_length
    prompts = torch.cat([query_response[:, :P], attention_mask[:, :P].to(query_response.dtype)], dim=1)
    distinct, rows = torch.unique(prompts, dim=0, return_inverse=True)
    return distinct[:, :P], distinct[:, P:].to(attention_mask.dtype), rows


class PolicyWithValueHead(nn.Module):
    """A peft LoRA model plus a zero-initialised linear value head on its last hidden state."""

    def __init__(self, peft_model: nn.Module, tokenizer=None):
        super().__init__()
        self.peft_model = peft_model
        self.tokenizer = tokenizer
        self.trunk, self.lm_head = split_causal_lm(peft_model)
        hidden_size = peft_model.get_base_model().config.get_text_config().hidden_size
        device = next(peft_model.parameters()).device
        self.value_head = nn.Linear(hidden_size, 1, device=device)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at start: no noisy value targets on step one
        nn.init.zeros_(self.value_head.bias)
        self.eval()

    @property
    def samples_exactly(self) -> bool:
        """Return True when sampled log-probabilities equal a forward pass's: a float32, unquantised base.

        In bfloat16 (or 4/8-bit, or int8 for serving) the sampler's one-token kernels round differently
        from a full forward's.
        """
        from .int8 import has_int8_linears

        return all(p.dtype == torch.float32 for p in self.trunk.parameters()) and not has_int8_linears(self.trunk)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Return the parameters PPO updates: the LoRA weights and the value head."""
        return [p for p in self.parameters() if p.requires_grad]

    def _hidden(self, query_response: torch.Tensor, attention_mask: torch.Tensor,
                context_length: int) -> torch.Tensor:
        """Return (B, R + 1, H) last hidden states, from the one predicting response token 0 to the last.

        Each distinct prompt is computed once (`_hidden_shared`) when some rows share one; when every
        row has its own (or there is no response), one forward over the whole batch (`_hidden_full`).
        """
        if 0 < context_length < query_response.shape[1]:
            prompt_ids, prompt_mask, rows = distinct_prompts(query_response, attention_mask, context_length)
            if len(prompt_ids) < len(query_response):
                return self._hidden_shared(query_response, attention_mask, prompt_ids, prompt_mask, rows)
        return self._hidden_full(query_response, attention_mask, context_length)

    def _hidden_full(self, query_response: torch.Tensor, attention_mask: torch.Tensor,
                     context_length: int) -> torch.Tensor:
        """Return `_hidden`'s (B, R + 1, H) from one forward of the trunk over the whole (B, P + R) batch."""
        hidden = self.trunk(input_ids=query_response, attention_mask=attention_mask,
                            position_ids=position_ids_for(attention_mask), use_cache=False).last_hidden_state
        return hidden[:, context_length - 1:]

    def _hidden_shared(self, query_response: torch.Tensor, attention_mask: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Return `_hidden`'s (B, R + 1, H) with each of the U distinct prompts (`distinct_prompts`) computed once.

        The trunk runs over the (U, P) prompts with the KV cache, the cache is copied to the rows
        (`rows`: each row's prompt), then the trunk runs over the (B, R) responses after it, at the
        positions the full forward gives them. The copy is an indexing, so every row's gradient
        flows back into its shared prompt's keys and values (LoRA's v_proj trains on prompt tokens).
        """
        P = prompt_ids.shape[1]
        cache, cache_kw = DynamicCache(), cache_keyword(self.trunk)
        last = self.trunk(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_for(prompt_mask),
                          use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1:]  # (U, 1, H)
        cache.batch_select_indices(rows)  # (U, ...) -> (B, ...) keys and values, out of place
        responses = self.trunk(input_ids=query_response[:, P:], attention_mask=attention_mask,
                               position_ids=position_ids_for(attention_mask)[:, P:], use_cache=True,
                               **{cache_kw: cache}).last_hidden_state  # (B, R, H)
        return torch.cat([last[rows], responses], dim=1)

    def _logits(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """Return the (B, R, V) float32 response logits over `temperature` from `_hidden`'s (B, R + 1, H)."""
        batch, slots, width = hidden.shape
        # a 2-D contiguous input: on a strided 3-D slice the LM head runs as a bmm that first copies
        # its (V, H) weight once per row
        logits = self.lm_head(hidden[:, :-1].reshape(-1, width)).view(batch, slots - 1, -1).float()
        return logits if temperature == 1.0 else logits / temperature

    @torch.no_grad()
    def response_logits(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int, *,
                        reference: bool = False) -> torch.Tensor:
        """Return the (B, R, V) logits at temperature 1 predicting each response token, the policy's or (with
        `reference`) the reference's (adapter disabled), no grad."""
        with self.peft_model.disable_adapter() if reference else nullcontext():
            return self._logits(self._hidden(query_response, attention_mask, context_length), 1.0)

    def _forward(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                 temperature: float) -> ForwardOutput:
        hidden = self._hidden(query_response, attention_mask, context_length)  # (B, R + 1, H)
        logprobs, entropy = logprobs_and_entropy(self._logits(hidden, temperature), query_response[:, context_length:])
        return ForwardOutput(logprobs=logprobs, entropy=entropy, hidden=hidden)

    def forward(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                temperature: float = 1.0) -> ForwardOutput:
        """Return the policy's response logprobs, entropy and values from one forward (grad enabled)."""
        out = self._forward(query_response, attention_mask, context_length, temperature)
        out.values = self.value_head(out.hidden[:, :-1].to(self.value_head.weight.dtype)).squeeze(-1)  # (B, R)
        return out

    @torch.no_grad()
    def reference(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                  temperature: float = 1.0) -> ForwardOutput:
        """Return the reference policy's (adapter disabled) response logprobs and hidden states, no grad."""
        with self.peft_model.disable_adapter():
            return self._forward(query_response, attention_mask, context_length, temperature)

    @torch.no_grad()
    def reference_hidden(self, query_response: torch.Tensor, attention_mask: torch.Tensor,
                         context_length: int) -> torch.Tensor:
        """Return the reference forward's (B, R + 1, H) last hidden states: `reference(...).hidden`, no LM head."""
        with self.peft_model.disable_adapter():
            return self._hidden(query_response, attention_mask, context_length)

    # ------------------------------------------------------------------------------ adapter files

    def save_adapter(self, directory: str | Path) -> None:
        """Write the LoRA adapter in PEFT format plus `value_head.safetensors` into `directory`."""
        directory = Path(directory)
        self.peft_model.save_pretrained(str(directory), safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(directory / VALUE_HEAD_WEIGHTS))

    def load_adapter(self, directory: str | Path) -> None:
        """Copy a saved adapter's LoRA and value-head weights into this model in place (no reload).

        Raises AdapterLoadError, leaving the current weights untouched, when a file is missing,
        corrupt, or its tensors do not match this model's adapter.
        """
        from peft import get_peft_model_state_dict

        directory = Path(directory)
        try:
            lora = load_file(str(directory / ADAPTER_WEIGHTS))
            head = load_file(str(directory / VALUE_HEAD_WEIGHTS))
        except Exception as exc:  # safetensors raises several types for truncated or garbage files
            raise AdapterLoadError(f"{directory}: cannot read adapter weights ({exc})") from exc
        current = get_peft_model_state_dict(self.peft_model)
        if set(lora) != set(current) or any(lora[k].shape != current[k].shape for k in current):
            raise AdapterLoadError(f"{directory}: adapter tensors do not match this model's LoRA layout")
        if {k: v.shape for k, v in head.items()} != {k: v.shape for k, v in self.value_head.state_dict().items()}:
            raise AdapterLoadError(f"{directory}: value head does not match this model")
        if not all(torch.isfinite(t).all() for t in list(lora.values()) + list(head.values())):
            raise AdapterLoadError(f"{directory}: adapter holds NaN or infinite weights")
        with torch.no_grad():  # state-dict tensors share the parameters' storage: copied in place, and no
            for key, tensor in current.items():  # load_state_dict walk over the (possibly int8) base layers
                tensor.copy_(lora[key])
            self.value_head.load_state_dict(head)
