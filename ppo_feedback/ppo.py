"""PPO maths for RLHF, as pure tensor functions (no models, no I/O).

Every per-token tensor has shape ``(B, T)`` over *response* tokens only, and
``mask`` is 1 on valid response tokens (up to and including the first EOS) and 0
on padding. ``mask`` may be float or bool. Padding never leaks: every function
selects with ``torch.where`` (so even NaN/inf garbage on padding is ignored) and
per-token outputs are exactly 0 on padded positions.

References:

- Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization
  Algorithms", arXiv:1707.06347 (clipped surrogate objective).
- Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation", arXiv:1506.02438 (GAE).
- Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving 2019, "Fine-Tuning
  Language Models from Human Preferences", arXiv:1909.08593 (per-token KL penalty in
  the reward, adaptive KL controller).
- Huang, Liu, von Werra 2024, "The N Implementation Details of RLHF with PPO", ICLR 2024
  Blogposts Track (masked whitening, value clipping, score at the last valid token, k1/k3 KL).
- Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
  (the k1 and k3 estimators).
- Espeholt et al. 2018, "IMPALA: Scalable Distributed Deep-RL with Importance Weighted
  Actor-Learner Architectures", arXiv:1802.01561 (V-trace's truncated importance weights).
- Hilton, Cobbe, Schulman 2021, "Batch size-invariance for policy optimization",
  arXiv:2110.00641 (decoupled PPO: proximal and behaviour policies apart).

Names follow the papers and CleanRL's ``ppo.py``: ``pg_loss1``, ``pg_loss2``,
``v_loss_clipped``, ``approx_kl``, ``clipfrac``.
"""

from __future__ import annotations

import math

import torch

KL_ESTIMATORS = ("k1", "k3")
"""Per-token KL estimators `kl_per_token` knows (Schulman 2020's k1 and k3)."""

__all__ = [
    "KL_ESTIMATORS",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_per_token",
    "penalized_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "AdaptiveKLController",
    "FixedKLController",
]


def _bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor, after checking it has the shape of ``like``."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tensor shape {tuple(like.shape)}")
    return mask.bool()


# ----------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set: ``Σm·x / Σm``.

    Returns a 0-dim tensor. It is NaN when the mask is empty (nothing to average).
    """
    m = _bool_mask(mask, x)
    return torch.where(m, x, 0.0).sum() / m.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over masked positions; returns a 0-dim tensor.

    ``σ² = Σm·(x−μ)² / Σm``, times ``n/(n−1)`` with ``n = Σm`` when ``unbiased``.
    Raises ValueError when ``unbiased`` and fewer than 2 positions are valid.
    """
    m = _bool_mask(mask, x)
    mean = masked_mean(x, m)
    centered = torch.where(m, x - mean, 0.0)
    var = masked_mean(centered**2, m)
    if unbiased:
        n = int(m.sum())
        if n < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 valid positions, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` over masked positions: ``(x−μ)/√(σ²+1e−8)`` with unbiased ``σ²``.

    With ``shift_mean=False`` the mean ``μ`` is added back (only the scale changes).
    Returns a tensor shaped like ``x``, 0 on padded positions.
    """
    m = _bool_mask(mask, x)
    mean, var = masked_mean(x, m), masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)


# ----------------------------------------------------------------------------- rewards


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from sampled-token log-probabilities.

    ``k1``: ``logπ − logπ_ref``. ``k3``: with ``r = logπ_ref − logπ``, ``(e^r − 1) − r``
    (never negative). Returns a tensor shaped like ``logprobs``; no masking is applied.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        r = ref_logprobs - logprobs
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards ``r_t = −β·kl_t`` plus each row's score at its last valid token.

    ``scores`` is ``(B,)``; the others ``(B, T)``. Returns ``(B, T)`` rewards, 0 on padding.
    The last valid token is the highest masked index, so any mask layout works.
    A row whose mask is all zero gets no score (and is all zeros).
    """
    m = _bool_mask(mask, logprobs)  # (B, T)
    B, T = m.shape
    if scores.shape != (B,):
        raise ValueError(f"scores shape {tuple(scores.shape)} != ({B},)")
    kl = kl_per_token(logprobs, ref_logprobs, estimator)  # (B, T)
    rewards = torch.where(m, -kl_coef * kl, 0.0)  # (B, T)

    positions = torch.arange(T, device=m.device)  # (T,)
    last = (m.long() * positions).argmax(dim=1)  # (B,) highest valid index; 0 when none
    has_valid = m.any(dim=1)  # (B,)
    score_at_end = torch.zeros_like(rewards)  # (B, T)
    score_at_end[torch.arange(B, device=m.device), last] = torch.where(
        has_valid, scores.to(rewards.dtype), 0.0
    )
    return rewards + score_at_end


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over valid tokens (not whitened).

    ``δ_t = r_t + γ·V_{t+1} − V_t``, ``A_t = δ_t + γλ·A_{t+1}``, bootstrapping 0 after
    the last valid token: the value and advantage of a padded position count as 0, so
    a padded gap ends the episode. Returns ``(advantages, returns)``, both ``(B, T)``
    with ``returns = advantages + values`` on valid tokens and 0 on padding.
    Pass detached values: this is a target, not something to differentiate.
    """
    m = _bool_mask(mask, rewards)  # (B, T)
    _bool_mask(mask, values)
    rewards = torch.where(m, rewards, 0.0)  # (B, T)
    values = torch.where(m, values, 0.0)  # (B, T)
    T = rewards.shape[1]

    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t + 1 < T else 0.0  # (B,) V_{t+1}, 0 past the end
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # (B,)
        lastgaelam = torch.where(m[:, t], delta + gamma * lam * lastgaelam, 0.0)  # (B,)
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = torch.where(m, advantages + values, 0.0)  # (B, T)
    return advantages, returns


# ----------------------------------------------------------------------------- losses


def truncated_importance_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                                 mask: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """Per-token ``w = min(cap, exp(logπ_prox − logπ_behaviour))`` on masked positions, 0 elsewhere; (B, T), no grad.

    Truncation at ``cap`` (1, as V-trace's c̄ in Espeholt et al. 2018) bounds the variance that
    a stale behaviour policy would otherwise add.
    """
    m = _bool_mask(mask, proximal_logprobs)
    logratio = torch.where(m, proximal_logprobs - behaviour_logprobs, 0.0).detach()
    return torch.where(m, torch.exp(logratio).clamp(max=cap), 0.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss, token-level masked mean.

    ``ρ = exp(logπ_θ − logπ_old)``, ``pg_loss1 = −A·ρ``, ``pg_loss2 = −A·clip(ρ, 1−ε, 1+ε)``,
    ``loss = mean_m w·max(pg_loss1, pg_loss2)``, with ``w = 1`` unless per-token ``weights`` are
    given: for samples drawn by an older behaviour policy, ``π_old`` is the proximal policy (the
    current one before the update) and ``w = min(1, π_old/π_behaviour)``, the truncated importance
    weight of decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization").
    Returns ``(loss, clipfrac, approx_kl)``, all 0-dim; ``clipfrac`` (share of tokens where
    the clipped term is larger) and ``approx_kl = ½·mean_m (logπ_θ − logπ_old)²`` are detached.
    """
    m = _bool_mask(mask, logprobs)  # (B, T)
    logratio = torch.where(m, logprobs - old_logprobs, 0.0)  # (B, T), garbage-free before exp
    advantages = torch.where(m, advantages, 0.0)  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)

    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    surrogate = torch.max(pg_loss1, pg_loss2)  # (B, T)
    loss = masked_mean(surrogate if weights is None else weights.detach() * surrogate, m)

    clipfrac = masked_mean((pg_loss2 > pg_loss1).to(logratio.dtype), m).detach()
    approx_kl = (0.5 * masked_mean(logratio**2, m)).detach()
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``½·mean_m max((V−R)², (clip(V, V_old−ε_v, V_old+ε_v) − R)²)``.

    Returns ``(loss, clipfrac)``, both 0-dim; ``clipfrac`` (share of tokens where the
    clipped loss is larger) is detached.
    """
    m = _bool_mask(mask, values)  # (B, T)
    values = torch.where(m, values, 0.0)  # (B, T)
    old_values = torch.where(m, old_values, 0.0)  # (B, T)
    returns = torch.where(m, returns, 0.0)  # (B, T)

    v_loss_unclipped = (values - returns) ** 2  # (B, T)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    v_loss_clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), m)

    clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), m).detach()
    return loss, clipfrac


# ----------------------------------------------------------------------------- KL controllers


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

    ``β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)``: β grows when the
    measured KL is above target and shrinks when below, by at most 20% per horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _check_finite("init_kl_coef", init_kl_coef)
        self.target = _check_finite("target", target)
        self.horizon = _check_finite("horizon", horizon)
        if self.value < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Move ``value`` towards keeping ``current_kl`` (mean KL per sequence) at ``target``."""
        current_kl = _check_finite("current_kl", current_kl)
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult


class FixedKLController:
    """Constant KL coefficient, with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = _check_finite("kl_coef", kl_coef)
        if self.value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""
