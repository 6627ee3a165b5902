"""Direct objectives that learn from ratings without a reward model, as pure functions (no models, no I/O).

Every objective works on sequence log-probabilities summed over response tokens,
``logπ(y|x) = Σ_t m_t·logπ(y_t|x, y_<t)`` (`sequence_logprobs`), of the policy π_θ and of the
reference π_ref (the adapter-off network); the implied reward is ``r_θ(x, y) = logπ_θ(y|x) − logπ_ref(y|x)``.
Per-token tensors are ``(B, R)`` over response tokens with a ``mask`` that is 1 (or True) on valid
tokens; padding is ignored even when it holds NaN or inf. Sequence tensors are ``(N,)``. The
reference's log-probabilities, the KTO reference point and every advantage are constants: they are
detached here, so no gradient reaches them.

- `dpo_loss`: pairs (chosen, rejected) of one prompt; `page_pairs` makes them from a page's ratings and pick;
  `chosen_nll`, RPO's negative log-likelihood of the chosen responses added to it; `ipo_loss` on the same pairs.
- `kto_loss`: single outputs labelled desirable or undesirable, with `kto_kl_estimate` (the reference
  point z0), `kto_mismatched` (which response to pair with which prompt for it) and `kto_weights` (λ_D, λ_U).
- `raft_loss`: the length-normalised likelihood of kept samples; `above_page_mean` chooses them.
- `reinforce_loss` with `rloo_advantages`: REINFORCE with leave-one-out baselines per group.

Scores of candidates may be NaN, meaning "not rated": an unrated candidate is left out of its page's
mean and baseline, is never kept, gets advantage 0 and makes no rating pair (a pick can still name it).

References:

- Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference Optimization: Your
  Language Model is Secretly a Reward Model", arXiv:2305.18290 (DPO).
- Pang, Yuan, He, Cho, Sukhbaatar, Weston 2024, "Iterative Reasoning Preference Optimization",
  arXiv:2404.19733 (RPO: DPO plus the chosen responses' negative log-likelihood, weighted by alpha).
- Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences", arXiv:2310.12036 (IPO, Eq. 17).
- Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO",
  https://ericmitchell.ai/cdpo.pdf (conservative DPO: label smoothing for flipped labels).
- Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, "KTO: Model Alignment as Prospect Theoretic
  Optimization", arXiv:2402.01306 (KTO, its reference point z0 and the weights' range, Eq. 8).
- Dong, Xiong, Goyal, Zhang, Chow, Pan, Diao, Zhang, Shum, Zhang 2023, "RAFT: Reward rAnked
  FineTuning for Generative Foundation Model Alignment", arXiv:2304.06767 (RAFT).
- Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling", arXiv:2308.08998.
- Ahmadian, Cremer, Gallé, Fadaee, Kreutzer, Pietquin, Üstün, Hooker 2024, "Back to Basics:
  Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
  arXiv:2402.14740 (RLOO).
- Kool, van Hoof, Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!", ICLR 2019
  workshop DeepRLStructPred (the leave-one-out baseline).

Statistics are named as TRL's DPOTrainer and KTOTrainer log them (``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``kl``).
"""

from __future__ import annotations

import math
import operator
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "KTO_WEIGHT_RATIO",
    "sequence_logprobs",
    "dpo_loss",
    "kto_loss",
    "kto_kl_estimate",
    "kto_mismatched",
    "kto_weights",
    "raft_loss",
    "above_page_mean",
    "rloo_advantages",
    "reinforce_loss",
    "page_pairs",
]

KTO_WEIGHT_RATIO = (1.0, 4.0 / 3.0)
"""The range KTO's paper (Eq. 8) recommends for ``λ_D·n_D / (λ_U·n_U)``; `kto_weights` keeps it."""


# ----------------------------------------------------------------------------- checks


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _sequences(**tensors: torch.Tensor) -> int:
    """Check that every tensor is (N,) with the same N >= 1; return N."""
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one shape (N,), got {shapes}")
    if first[0] == 0:
        raise ValueError(f"nothing to learn from: empty tensors {shapes}")
    return first[0]


def _index(value) -> int:
    """Return ``value`` as an int index (an int or an integer 0-dim tensor); ValueError otherwise."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"an index must be an integer, got {value!r}") from None


def _mean_detached(x: torch.Tensor) -> torch.Tensor:
    return x.detach().mean()


# ----------------------------------------------------------------------------- sequences


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Return ``(B,)`` sequence log-probabilities ``Σ_t m_t·logπ_t``, or with ``average`` that over ``Σ_t m_t``.

    ``logprobs`` and ``mask`` are ``(B, R)`` (per-token log-probabilities of the response tokens;
    mask float or bool). The average is the length-normalised log-likelihood RAFT maximises.
    Raises ValueError on a shape mismatch, an empty batch or a row without any response token.
    """
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs and mask must be (B, R) of one shape, got {tuple(logprobs.shape)} "
                         f"and {tuple(mask.shape)}")
    m = mask.bool()  # (B, R)
    lengths = m.sum(1)  # (B,)
    if logprobs.shape[0] == 0 or not bool((lengths > 0).all()):
        raise ValueError(f"every row needs at least one response token; lengths {lengths.tolist()}")
    total = torch.where(m, logprobs, 0.0).sum(1)  # (B,)
    return total / lengths if average else total


# ----------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss over N pairs; returns ``(loss, stats)``.

    Inputs are ``(N,)`` sequence log-probabilities; pair i is (chosen y_w, rejected y_l) of one prompt.
    ``h = β·((logπ_θ(y_w) − logπ_ref(y_w)) − (logπ_θ(y_l) − logπ_ref(y_l)))``,
    ``loss = mean(−(1−ε)·log σ(h) − ε·log σ(−h))``: DPO for ``ε = label_smoothing = 0``, conservative
    DPO (the pair's label assumed flipped with probability ε in [0, 0.5)) otherwise.
    ``stats`` (0-dim, detached): ``rewards/chosen`` and ``rewards/rejected``, the means of the implied
    rewards ``β·(logπ_θ − logπ_ref)``; ``rewards/accuracies``, the share of pairs whose chosen reward
    is larger; ``rewards/margins``, the mean difference.
    """
    _sequences(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
               ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = _positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps.detach())  # (N,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps.detach())  # (N,)
    h = chosen_rewards - rejected_rewards  # (N,)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)  # (N,)
    stats = {
        "rewards/chosen": _mean_detached(chosen_rewards),
        "rewards/rejected": _mean_detached(rejected_rewards),
        "rewards/accuracies": _mean_detached((chosen_rewards > rejected_rewards).to(h.dtype)),
        "rewards/margins": _mean_detached(h),
    }
    return losses.mean(), stats


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO's squared loss over N pairs (Azar et al. 2023, Eq. 17, per token as TRL's); returns ``(loss, stats)``.

    ``h = (logπ_θ(y_w) − logπ_ref(y_w)) / |y_w| − (logπ_θ(y_l) − logπ_ref(y_l)) / |y_l|``, the per-token
    log-ratio margin; ``loss = mean((h − 1/(2τ))²)``. Where DPO's loss keeps falling as the margin grows
    (so a few pairs trained for many passes drive the policy ever further from the reference), IPO's
    is smallest at the margin ``1/(2τ)`` and pulls a pair back past it. ``stats``: DPO's four, with
    ``τ`` in β's place over whole-sequence log-ratios, and ``ipo/margin``, the mean ``h``.
    """
    _sequences(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
               ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
               chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    tau = _positive("tau", tau)
    if not bool((chosen_lengths > 0).all() and (rejected_lengths > 0).all()):
        raise ValueError("every response needs at least one token")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()  # (N,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()  # (N,)
    h = chosen_ratio / chosen_lengths - rejected_ratio / rejected_lengths  # (N,)
    losses = (h - 1 / (2 * tau)) ** 2  # (N,)
    stats = {
        "rewards/chosen": _mean_detached(tau * chosen_ratio),
        "rewards/rejected": _mean_detached(tau * rejected_ratio),
        "rewards/accuracies": _mean_detached((chosen_ratio > rejected_ratio).to(h.dtype)),
        "rewards/margins": _mean_detached(tau * (chosen_ratio - rejected_ratio)),
        "ipo/margin": _mean_detached(h),
    }
    return losses.mean(), stats


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's added term: the chosen responses' negative log-likelihood per token, 0-dim.

    ``nll = −Σ_i logπ_θ(y_w,i) / Σ_i |y_w,i|`` over the ``(N,)`` sequence log-probabilities of the chosen
    responses and their ``(N,)`` token counts (a mean over all the batch's chosen tokens, as TRL's "sft"
    loss). RPO minimises ``dpo_loss + α·nll``: DPO alone can lower the chosen responses' likelihood too
    (only the margin matters), moving probability onto text neither response resembles; the NLL holds
    the chosen ones up. Raises ValueError on a shape mismatch or a count that is not positive.
    """
    _sequences(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths)
    if not bool((chosen_lengths > 0).all()):
        raise ValueError(f"every chosen response needs at least one token; lengths {chosen_lengths.tolist()}")
    return -policy_chosen_logps.sum() / chosen_lengths.sum()


# ----------------------------------------------------------------------------- KTO


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: float | torch.Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO's loss over N single outputs; returns ``(loss, stats)``.

    ``policy_logps``, ``ref_logps``: ``(N,)`` sequence log-probabilities; ``desirable``: ``(N,)`` bool,
    True for a desirable output (D), False for an undesirable one (U). ``z0``: the reference point,
    a KL estimate (`kto_kl_estimate`), taken as ``max(0, z0)`` and detached.
    With ``r = logπ_θ − logπ_ref``: ``v = λ_D·σ(β·(r − z0))`` on D, ``λ_U·σ(β·(z0 − r))`` on U,
    ``loss = mean(λ_y − v)``. ``stats`` (0-dim, detached): ``kl`` (z0); ``rewards/chosen`` and
    ``rewards/rejected``, mean ``β·r`` over D and over U, each only when there is one; ``rewards/margins``
    (their difference) when there are both.
    """
    desirable = torch.as_tensor(desirable, device=policy_logps.device)
    _sequences(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool mask, got dtype {desirable.dtype}")
    beta = _positive("beta", beta)
    lambda_d, lambda_u = _positive("lambda_d", lambda_d), _positive("lambda_u", lambda_u)
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    if z0.numel() != 1 or not bool(torch.isfinite(z0)):
        raise ValueError(f"z0 must be one finite number, got {z0}")
    z0 = z0.reshape(()).clamp(min=0)
    r = policy_logps - ref_logps.detach()  # (N,)
    losses = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (r - z0))),
                         lambda_u * (1 - torch.sigmoid(beta * (z0 - r))))  # (N,) λ_y − v
    rewards = (beta * r).detach()  # (N,)
    stats = {"kl": z0}
    if desirable.any():
        stats["rewards/chosen"] = rewards[desirable].mean()
    if not desirable.all():
        stats["rewards/rejected"] = rewards[~desirable].mean()
    if "rewards/chosen" in stats and "rewards/rejected" in stats:
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return losses.mean(), stats


def kto_kl_estimate(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """Return KTO's reference point ``z0 = max(0, mean(logπ_θ(y'|x) − logπ_ref(y'|x)))``, 0-dim, detached.

    Inputs are ``(N,)`` sequence log-probabilities of mismatched pairs: prompt x with a response y'
    written for another prompt (`kto_mismatched`), as KTO's paper and TRL estimate KL(π_θ || π_ref).
    """
    _sequences(policy_mismatched_logps=policy_mismatched_logps, ref_mismatched_logps=ref_mismatched_logps)
    return (policy_mismatched_logps - ref_mismatched_logps).detach().mean().clamp(min=0)


def kto_mismatched(prompt_ids: Sequence[Hashable]) -> list[int]:
    """Return, for each row i, the row j whose response to pair with row i's prompt for `kto_kl_estimate`.

    Every row's response is used once and never with its own prompt: rows are ordered by prompt and
    each takes the response ``m`` places further round that order, ``m`` the largest number of rows
    one prompt has. Raises ValueError when one prompt has more than half the rows (no such pairing).
    """
    pages = _pages(prompt_ids)
    order = [row for rows in pages for row in rows]  # (N,) rows ordered by prompt
    n, m = len(order), max((len(rows) for rows in pages), default=0)
    if n == 0:
        raise ValueError("no rows to pair")
    if 2 * m > n:
        raise ValueError(f"one prompt has {m} of {n} rows; mismatched pairs need every prompt to have at most half")
    partner = [0] * n
    for position, row in enumerate(order):
        partner[row] = order[(position + m) % n]
    return partner


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """Return ``(λ_D, λ_U)`` for KTO, such that ``λ_D·n_D / (λ_U·n_U)`` lies in [1, 4/3] (`KTO_WEIGHT_RATIO`).

    The rule: the smallest change from (1, 1) that lands in range, never weighing a label below 1.
    Balanced enough already (the ratio with equal weights in [1, 4/3]): (1, 1). Fewer desirable
    outputs: ``λ_D = n_U/n_D`` (ratio 1), ``λ_U = 1``. More than 4/3 as many desirable:
    ``λ_U = 3·n_D/(4·n_U)`` (ratio 4/3), ``λ_D = 1``. With no outputs of one kind there is nothing to
    balance: (1, 1). Raises ValueError on a negative count.
    """
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"counts must be >= 0, got {n_desirable} desirable and {n_undesirable} undesirable")
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    low, high = KTO_WEIGHT_RATIO
    ratio = n_desirable / n_undesirable
    if ratio < low:
        return low / ratio, 1.0
    if ratio > high:
        return 1.0, ratio / high
    return 1.0, 1.0


# ----------------------------------------------------------------------------- RAFT


def raft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RAFT's loss: the mean negative length-normalised log-likelihood of the kept samples, 0-dim.

    ``loss = −mean_i (Σ_t m_it·logπ_θ(y_it) / Σ_t m_it)`` over the ``(B, R)`` per-token log-probabilities
    of the kept samples only (`above_page_mean` chooses them). No reference term: bound the drift
    elsewhere (few epochs, a KL term, early stop on KL).
    """
    return -sequence_logprobs(logprobs, mask, average=True).mean()


def _pages(ids: Sequence[Hashable] | torch.Tensor) -> list[list[int]]:
    """Return the row indices of each distinct id (any hashable), pages in order of first appearance."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    rows: dict[Hashable, list[int]] = {}
    for i, page in enumerate(ids):
        rows.setdefault(page, []).append(i)
    return list(rows.values())


def _candidates(scores: Sequence[float] | torch.Tensor,
                page_ids: Sequence[Hashable] | torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Return ``(scores, pages)``: ``(N,)`` float64 scores (NaN: unrated) and the rows of each page, checked."""
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    pages = _pages(page_ids)
    n_ids = sum(len(rows) for rows in pages)
    if s.dim() != 1 or n_ids != len(s):
        raise ValueError(f"scores and page ids must be one per candidate, got {tuple(s.shape)} and {n_ids}")
    if n_ids == 0:
        raise ValueError("no candidates")
    if bool(torch.isinf(s).any()):
        raise ValueError("scores must be finite (NaN for unrated)")
    return s, pages


def _page_differences(s: torch.Tensor, pages: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(Σ_j (s_i − s_j), k_i)`` over the rated candidates j of i's page, both ``(N,)``.

    ``Σ_j (s_i − s_j) = k_i·(s_i − page mean)``, exactly 0 where the page's scores are equal;
    ``k_i`` counts the rated candidates of i's page, i included (0 when i is unrated).
    """
    differences, k = torch.zeros_like(s), torch.zeros(len(s), dtype=torch.int64)
    unrated = torch.isnan(s).tolist()
    for rows in pages:
        rated = [i for i in rows if not unrated[i]]
        x = s[rated]  # (k,)
        differences[rated] = (x[:, None] - x[None, :]).sum(1)
        k[rated] = len(rated)
    return differences, k


def above_page_mean(scores: Sequence[float] | torch.Tensor, page_ids: Sequence[Hashable] | torch.Tensor,
                    min_score: float | None = None) -> torch.Tensor:
    """Return an ``(N,)`` bool mask of the candidates rated strictly above their page's mean: RAFT's kept samples.

    ``scores``: one per candidate (NaN: unrated); ``page_ids``: the page each was shown on (any
    hashable). A candidate equal to its page's mean is not kept, so a page of equal scores keeps
    nothing, and neither does a page with one rated candidate. With ``min_score`` a kept candidate must
    also score at least that (good in absolute terms, not only better than its siblings).
    """
    differences, _ = _page_differences(*_candidates(scores, page_ids))
    keep = differences > 0
    if min_score is not None:
        keep &= torch.as_tensor(scores, dtype=torch.float64).cpu() >= min_score  # NaN compares False
    return keep


# ----------------------------------------------------------------------------- RLOO


def rloo_advantages(scores: Sequence[float] | torch.Tensor,
                    group_ids: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
    """Return ``(N,)`` float64 RLOO advantages ``A_i = s_i − (Σ_{j≠i} s_j)/(k − 1)`` within each group.

    ``scores``: one per sample (NaN: unrated); ``group_ids``: the group (page, or prompt) each belongs
    to, k its rated samples. ``A_i = k/(k−1)·(s_i − group mean)``, summing to 0 over a group. A sample
    alone in its group has no baseline and gets advantage 0 (no signal, as TRL's RLOOTrainer does),
    as does an unrated one. For RLOO proper, a score includes the KL penalty to the reference.
    """
    differences, k = _page_differences(*_candidates(scores, group_ids))
    return torch.where(k >= 2, differences / (k - 1).clamp(min=1), 0.0)


def reinforce_loss(seq_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE's loss ``−mean_i A_i·logπ_θ(y_i|x_i)``, 0-dim; the advantages are detached.

    ``seq_logprobs``: ``(N,)`` sequence log-probabilities (`sequence_logprobs`); ``advantages``: ``(N,)``,
    e.g. `rloo_advantages`. Its gradient is ``−A_i/N`` on each sequence's log-probability.
    """
    _sequences(seq_logprobs=seq_logprobs, advantages=advantages)
    advantages = advantages.detach().to(device=seq_logprobs.device, dtype=seq_logprobs.dtype)
    return -(advantages * seq_logprobs).mean()


# ----------------------------------------------------------------------------- pairs


def page_pairs(scores: Sequence[float] | torch.Tensor, page_ids: Sequence[Hashable] | torch.Tensor,
               picks: Sequence[int] | None = None, min_chosen: float | None = None) -> list[tuple[int, int]]:
    """Return the sorted (chosen, rejected) candidate index pairs a page's ratings and picks state.

    Every two candidates of one page rated differently give (higher, lower); equal or unrated (NaN)
    scores give no pair. With ``min_chosen`` a rating pair's higher candidate must also score at least
    that (good in absolute terms: two poor candidates rated 1 and 2 are mostly the rater's noise). ``picks``: indices of candidates a rater picked as their page's best, at most
    one per page; each gives (pick, other) for every other candidate of its page. Where a pick
    contradicts the ratings (another candidate of its page rated higher), the pick wins: it is the
    rater's direct comparison of the candidates side by side, where a rating on a coarse scale judges
    one candidate alone; the contradicting rating pair is dropped. Each pair appears once.
    """
    s, pages = _candidates(scores, page_ids)
    page_of = {i: rows for rows in pages for i in rows}
    s = s.tolist()
    good = [min_chosen is None or x >= min_chosen for x in s]  # NaN compares False
    pairs = {(i, j) for rows in pages for i in rows for j in rows if s[i] > s[j] and good[i]}  # NaN: no pair
    picked: set[int] = set()
    for pick in picks or ():
        pick = _index(pick)
        if not 0 <= pick < len(s):
            raise ValueError(f"pick {pick} is not a candidate index (0..{len(s) - 1})")
        page = page_of[pick][0]  # a page is named by its first row
        if page in picked:
            raise ValueError(f"two picks on the page of candidate {pick}; a page has at most one best")
        picked.add(page)
        for other in page_of[pick]:
            if other != pick:
                pairs.discard((other, pick))
                pairs.add((pick, other))
    return sorted(pairs)
