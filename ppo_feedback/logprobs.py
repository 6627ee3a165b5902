"""Log-probabilities of the drawn tokens and the entropy, from logits in one lean pass.

`logprobs_and_entropy(logits, tokens)` returns `log softmax(logits)` at `tokens` and the entropy of
`softmax(logits)`, what every forward of the policy needs, without the `(N, V)` tensors autograd
would otherwise make of `log_softmax`, `gather` and the entropy (log-softmax output, probabilities,
their product, the one-hot gradient, the log-softmax gradient: each tens of MB, each a pass over
memory and, on a CPU, fresh pages). On a CPU the rows go through in chunks that stay in cache;
the probabilities are kept for the backward, whose gradient `onehot(token) − softmax` they give in
one pass. The arithmetic is `log_softmax`'s (`z − max − log Σ exp(z − max)`), the entropy's from
the same shifted logits.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 21
"""How many bytes of logits a CPU chunk holds: small enough that its passes run in the core's cache."""


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log-probabilities of `tokens`, entropy), each shaped like `tokens` (...), from `logits` (..., V).

    The log-probabilities carry the gradient with respect to `logits`; the entropy is detached.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    logprobs, entropy = _LogprobsAndEntropy.apply(flat_logits, tokens.reshape(-1))
    return logprobs.view(tokens.shape), entropy.view(tokens.shape)


def chunk_rows(logits: torch.Tensor) -> int:
    """Return how many rows of the (N, V) `logits` go through at once: all on an accelerator, else CHUNK_BYTES' worth."""
    if logits.device.type != "cpu":
        return max(1, logits.shape[0])
    return max(1, CHUNK_BYTES // (logits.shape[1] * logits.element_size()))


class _LogprobsAndEntropy(torch.autograd.Function):
    """Forward: (N,) log-probabilities at `tokens` and (N,) entropies of (N, V) `logits`; keeps softmax for backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = logits.shape[0]
        probs = torch.empty_like(logits)
        logprobs, entropy = logits.new_empty(rows), logits.new_empty(rows)
        step = chunk_rows(logits)
        for start in range(0, rows, step):
            part = slice(start, start + step)
            z, p = logits[part], probs[part]
            shifted = z - z.amax(dim=-1, keepdim=True)  # a chunk-sized temporary, in cache
            torch.exp(shifted, out=p)
            total = p.sum(dim=-1, keepdim=True)
            p.div_(total)
            log_total = total.log().squeeze(-1)  # log Σ exp(z − max z)
            logprobs[part] = shifted.gather(-1, tokens[part, None]).squeeze(-1) - log_total
            entropy[part] = log_total - torch.linalg.vecdot(p, shifted)  # −Σ p·(z − max z − log_total)
        ctx.save_for_backward(probs, tokens)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, tokens = ctx.saved_tensors
        # d log p(token) / d logits = onehot(token) − softmax; the kept probabilities become the gradient in place
        # (a second backward through the same graph is refused by autograd: the saved tensor changed)
        grad = probs.mul_(-grad_logprobs[:, None])
        grad.scatter_add_(-1, tokens[:, None], grad_logprobs[:, None])
        return grad, None
