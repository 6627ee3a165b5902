"""Sampling: batched candidates with the KV cache, and their exact behaviour log-probabilities.

Which distribution the recorded log-probabilities belong to: `log softmax(logits / temperature)`,
the whole tempered distribution, at the sampled token. Top-p truncation only narrows which tokens
may be drawn; its renormalised probabilities are not recorded, because PPO's ratio compares the
same quantity recomputed by a forward pass at the same temperature (Huang et al., detail #3; TRL
issue #2358). So a recorded log-probability always equals a fresh forward's, top-p or not.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import MethodType
from typing import Any, Optional, TypeVar

import torch
from torch import nn
from transformers import DynamicCache

from .onednn import is_routed, out_in_weight, routable
from .policy import cache_keyword, position_ids_for, split_causal_lm

T = TypeVar("T")


class PromptError(ValueError):
    """A prompt that cannot be generated from: empty, or too long for the model."""


@dataclass
class Rollout:
    """A batch of sampled responses, as PPO needs them. Shapes: B rows, P prompt and R response tokens."""

    query_response: torch.Tensor  # (B, P + R) prompt (left-padded) then response token ids
    attention_mask: torch.Tensor  # (B, P + R) 1 on real prompt tokens and on every response slot
    context_length: int  # P
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS
    logprobs: torch.Tensor  # (B, R) behaviour log-probs under softmax(logits / temperature); 0 on padding
    values: Optional[torch.Tensor]  # (B, R) value-head outputs at sampling time when a head was given
    temperature: float

    @property
    def responses(self) -> torch.Tensor:
        """Return the response token ids, (B, R)."""
        return self.query_response[:, self.context_length:]


@dataclass
class Candidate:
    """One sampled response: text, token ids and per-token behaviour log-probabilities."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool  # True when the response ended with EOS rather than the length limit


def format_prompt(tokenizer, prompt: str) -> str:
    """Return the model input for a user prompt: the chat template when the tokenizer has one, else the text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return prompt


def max_positions(model) -> int | None:
    """Return how many positions `model` can attend to, when its config says."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def encode_prompts(tokenizer, prompts: list[str], max_new_tokens: int, device,
                   positions: int | None = None) -> dict[str, torch.Tensor]:
    """Return left-padded `input_ids` and `attention_mask` for prompts; raise PromptError when one can't fit."""
    texts = []
    for prompt in prompts:
        if not prompt or not prompt.strip():
            raise PromptError("the prompt is empty")
        texts.append(format_prompt(tokenizer, prompt))
    templated = bool(getattr(tokenizer, "chat_template", None))
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    limit = min(getattr(tokenizer, "model_max_length", None) or 10**9, positions or 10**9)
    if batch["input_ids"].shape[1] + max_new_tokens > limit:
        raise PromptError(f"the prompt is too long: {batch['input_ids'].shape[1]} tokens plus "
                          f"{max_new_tokens} new ones exceed the model's {limit}")
    return {k: v.to(device) for k, v in batch.items()}


def first_eos_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Return (B, R) float mask, 1 on tokens up to and including each row's first EOS (all 1 without EOS)."""
    if eos_token_id is None:
        return torch.ones_like(responses, dtype=torch.float32)
    is_eos = (responses == eos_token_id).int()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).float()


def rollout_of(tokenizer, prompts: list[str], responses: list[list[int]], *, temperature: float, device,
               positions: int | None = None, logprobs: list[list[float]] | None = None) -> Rollout:
    """Return a Rollout of responses sampled earlier (token id lists), laid out as `sample` lays out its own.

    Prompts are encoded with `encode_prompts` (left-padded), responses right-padded; the response
    mask covers each response up to its first EOS and never its padding (an empty response has an
    empty mask). `logprobs` (one list per response, one value per token) fill the behaviour
    log-probabilities, else they are 0. Values are None.
    """
    if len(prompts) != len(responses) or (logprobs is not None and len(logprobs) != len(responses)):
        raise ValueError("prompts, responses and logprobs must have the same length")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lengths = torch.tensor([len(r) for r in responses])
    R = max(1, int(lengths.max()) if len(responses) else 1)
    batch = encode_prompts(tokenizer, prompts, R, device, positions)
    ids = torch.full((len(responses), R), pad, dtype=torch.long)
    behaviour = torch.zeros(len(responses), R)
    for row, response in enumerate(responses):
        ids[row, :len(response)] = torch.as_tensor(list(response), dtype=torch.long)
        if logprobs is not None:
            if len(logprobs[row]) != len(response):
                raise ValueError(f"response {row} has {len(response)} tokens but {len(logprobs[row])} logprobs")
            behaviour[row, :len(response)] = torch.as_tensor(list(logprobs[row]), dtype=torch.float32)
    in_length = (torch.arange(R)[None] < lengths[:, None]).float()  # (B, R)
    mask = (first_eos_mask(ids, tokenizer.eos_token_id) * in_length).to(device)
    ids = ids.to(device)
    return Rollout(query_response=torch.cat([batch["input_ids"], ids], dim=1),
                   attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(ids)], dim=1),
                   context_length=batch["input_ids"].shape[1], response_mask=mask,
                   logprobs=behaviour.to(device) * mask, values=None, temperature=temperature)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Return probs (B, V) restricted to each row's smallest set with mass >= top_p (not renormalised)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (B, V) mass of strictly likelier tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return (B,) token ids, one per row drawn from unnormalised probs (B, V), by inverse CDF.

    One uniform number per row; torch.multinomial instead draws an exponential per vocabulary entry,
    which costs more than GPT-2 small's whole decoding step on a CPU.
    """
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    # the first index whose cdf exceeds u; zero-probability tokens (top-p) can never be it
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


SKINNY_ROWS = range(2, 9)
"""How many rows (batch x new tokens) a linear layer computes as weight @ input^T in a decode step (see
`skinny_linears`); one row is a matrix-vector product, which F.linear (and oneDNN) already streams."""
ROUTED_SKINNY_ROWS = range(2, 5)
"""The same for a layer `onednn.route_linears` routed: oneDNN's own product is the faster from 5 rows."""


def _skinny(layer: nn.Module, outside: Callable[[torch.Tensor], torch.Tensor], streamed_rows: range,
            x: torch.Tensor) -> torch.Tensor:
    """A linear layer's forward inside `skinny_linears`: `_streamed` for `streamed_rows`, else `outside` (its own)."""
    rows = x.numel() // x.shape[-1]
    if rows not in streamed_rows:
        return outside(x)
    return _streamed(out_in_weight(layer), layer.bias, x, rows)


def _streamed(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, rows: int) -> torch.Tensor:
    """Return x @ weight^T + bias for (out, in) row-major `weight`, computed as (weight @ x^T)^T."""
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()  # (rows, out)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])


@contextmanager
def skinny_linears(linears: list[nn.Module]) -> Iterator[None]:
    """Compute the given linear layers as weight @ input^T while inside (a decode step); yields nothing.

    On the CPU, MKL multiplies a few rows by a weight's transpose (what `F.linear` asks for) at a
    fraction of the speed it streams the weight against the rows as columns (`SKINNY_ROWS`), and
    oneDNN (layers `onednn.route_linears` routed) reads the weights more slowly at 2 to 4 rows too
    (`ROUTED_SKINNY_ROWS`); the product is the same up to float rounding. `nn.Linear` layers and
    GPT-2's `Conv1D` layers whose weight is stored column-major (`modeling.column_major_conv1d`);
    other row counts take the layer's own forward, routed or not. Never held across a `yield` of
    `decode`, so other code (and other threads resuming the generator) see the layers unchanged.
    """
    own = [layer.__dict__.get("forward") for layer in linears]  # a routed layer's, else None
    for layer, forward in zip(linears, own):
        outside = forward or MethodType(type(layer).forward, layer)
        layer.forward = partial(_skinny, layer, outside, ROUTED_SKINNY_ROWS if is_routed(layer) else SKINNY_ROWS)
    try:
        yield
    finally:
        for layer, forward in zip(linears, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _skinny_candidates(model: nn.Module) -> list[nn.Module]:
    """Return the layers of `model` that `skinny_linears` speeds up: float32 CPU `nn.Linear` and `Conv1D`
    layers (`onednn.routable`) whose (out, in) weight is row-major, as a Conv1D's is when stored column-major."""
    return [m for m in model.modules() if routable(m) and out_in_weight(m).is_contiguous()]


class _Prefill:
    """A batch's prompts, encoded once per distinct prompt: the candidates of a page share one prefill."""

    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int, device, positions: int | None):
        self.batch = encode_prompts(tokenizer, prompts, max_new_tokens, device, positions)
        distinct = list(dict.fromkeys(prompts))
        self.rows = torch.tensor([distinct.index(p) for p in prompts], device=device)  # (B,) row of each prompt
        first = [prompts.index(p) for p in distinct]
        self.input_ids = self.batch["input_ids"][first]  # (U, P) the distinct prompts, padded as the batch is
        self.attention_mask = self.batch["attention_mask"][first]


@torch.no_grad()
def decode(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
           value_head: torch.nn.Module | None = None) -> Generator[torch.Tensor, None, Rollout]:
    """Sample one response per prompt, yielding each step's (B,) new token ids; return the Rollout.

    One batch for all prompts, with the KV cache; identical prompts (a page's candidates) share one
    prefill, its cache copied to their rows. Each step runs the trunk once and applies the LM head
    (and the value head) to the newest position only, so no (B, R, V) tensor is ever held.
    With `stop_at_eos=False` every response has exactly `max_new_tokens` tokens; otherwise rows
    that said EOS are fed (and yield) padding until all have, and their later slots are masked out.
    Behaviour log-probabilities are log softmax(logits / temperature) at the drawn tokens.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    trunk, lm_head = split_causal_lm(model)
    device = next(trunk.parameters()).device
    prefill = _Prefill(tokenizer, prompts, max_new_tokens, device, max_positions(model))
    eos = tokenizer.eos_token_id if stop_at_eos else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache, cache_kw = DynamicCache(), cache_keyword(trunk)
    hidden = trunk(input_ids=prefill.input_ids, attention_mask=prefill.attention_mask,
                   position_ids=position_ids_for(prefill.attention_mask), use_cache=True,
                   **{cache_kw: cache}).last_hidden_state[:, -1][prefill.rows]  # (B, H)
    cache.batch_select_indices(prefill.rows)
    context = prefill.batch["attention_mask"]
    B, P = context.shape
    attention_mask = torch.cat([context, context.new_ones(B, max_new_tokens)], dim=1)  # (B, P + R), sliced per step
    next_position = position_ids_for(context)[:, -1:] + 1  # (B, 1)
    linears = _skinny_candidates(model)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logprobs, values = [], [], []
    for step in range(max_new_tokens):
        with skinny_linears(linears):
            logits = lm_head(hidden).float()
        logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)  # (B, V)
        probs = logp.exp()
        token = draw(_nucleus(probs, top_p) if top_p < 1.0 else probs, generator)  # (B,)
        token = token.masked_fill(done, tokenizer.pad_token_id)
        tokens.append(token)
        logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        if value_head is not None:
            values.append(value_head(hidden.to(value_head.weight.dtype)).squeeze(-1))
        if eos is not None:
            done |= token == eos
        yield token
        if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
            break
        with skinny_linears(linears):
            hidden = trunk(input_ids=token[:, None], attention_mask=attention_mask[:, :P + step + 1],
                           position_ids=next_position, use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]
        next_position = next_position + 1
    responses = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = first_eos_mask(responses, eos)
    return Rollout(query_response=torch.cat([prefill.batch["input_ids"], responses], dim=1),
                   attention_mask=attention_mask[:, :P + responses.shape[1]], context_length=P,
                   response_mask=response_mask, logprobs=torch.stack(logprobs, dim=1) * response_mask,
                   values=torch.stack(values, dim=1) * response_mask if values else None, temperature=temperature)


def finish(steps: Generator[Any, None, T]) -> T:
    """Run a generator to its end, ignoring what it yields; return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
           value_head: torch.nn.Module | None = None) -> Rollout:
    """Return a Rollout of one sampled response per prompt, with behaviour logprobs (and values, given a head).

    `decode` run to its end: the same batch, cache, draws and log-probabilities, nothing streamed.
    """
    return finish(decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed, stop_at_eos=stop_at_eos, value_head=value_head))


def text_of(tokenizer, token_ids: list[int]) -> str:
    """Return the text a candidate shows for its token ids: special tokens dropped, outer whitespace stripped."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def stream_candidates(model, tokenizer, prompt: str, n: int, max_new_tokens: int, temperature: float = 1.0,
                      top_p: float = 1.0, seed: int | None = None) -> Generator[list[str], None, list[Candidate]]:
    """Sample n candidates for one prompt in one batch, yielding all n texts so far after every decode
    step; return the candidates, each with text, token ids and behaviour logprobs.

    A text so far ends at its candidate's EOS and drops a trailing U+FFFD (a character whose bytes
    are not all sampled yet).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    steps = decode(model, tokenizer, [prompt] * n, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed)
    eos = tokenizer.eos_token_id
    so_far: list[list[int]] = [[] for _ in range(n)]
    while True:
        try:
            token = next(steps)
        except StopIteration as stop:
            rollout = stop.value
            break
        for ids, new in zip(so_far, token.tolist()):
            if not ids or ids[-1] != eos:
                ids.append(new)
        yield [text_of(tokenizer, ids).rstrip("\ufffd") for ids in so_far]
    candidates = []
    for row in range(n):
        length = int(rollout.response_mask[row].sum())
        ids = rollout.responses[row, :length].tolist()
        candidates.append(Candidate(text=text_of(tokenizer, ids), token_ids=ids,
                                    logprobs=rollout.logprobs[row, :length].tolist(),
                                    finished=length > 0 and ids[-1] == eos))
    return candidates


def generate(model, tokenizer, prompt: str, n: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None) -> list[Candidate]:
    """Return n sampled candidates for one prompt, each with text, token ids and behaviour logprobs
    (`stream_candidates` run to its end)."""
    return finish(stream_candidates(model, tokenizer, prompt, n, max_new_tokens, temperature, top_p, seed))
