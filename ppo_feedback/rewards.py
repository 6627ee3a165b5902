"""The reward model: a linear head fitted to people's ratings and preferences, calibrated on base-model samples.

Two stages, as in lm-human-preferences: first a reward model r(x, y) is fitted to what people said
(`feedback.read_feedback`: per-rater normalised ratings and preferences), then PPO maximises it.

- `RewardModel`: a linear head (with L2) over the frozen base model's reward features
  (`features.RewardFeatures`: the mean of the reference forward's last hidden states after each
  response token, and the mean and max of the response tokens' input embeddings), the same tensor
  PPO's rollouts are scored from, so PPO scores them without a second network. Fitted by
  regression on normalised scores plus the Bradley-Terry loss −log σ(r_chosen − r_rejected) on
  preferences (Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022), then calibrated
  so its output has mean 0 and std 1 on samples of the reference policy (Stiennon et al. 2020;
  Ziegler et al. 2019). The L2 strength is chosen by cross-validation over prompts (`L2_GRID`)
  unless set.

  Why linear and not an MLP: a few hundred ratings against a 3 x 768-wide feature (GPT-2 small) already
  give more weights than examples; ridge-style L2 on standardised features keeps the fit convex (one
  Newton solve, milliseconds, no seeds) and stable from round to round, where an MLP would overfit and
  move with its initialisation. The papers' reward models put a linear head on the last token; with a
  few hundred ratings that single state overfits, where the mean over the response generalised. The
  contextual mean dilutes a single word, so the policy learnt to raise it without the word a keyword
  taste asked for; the token-embedding mean and max (a bag of the tokens) let the head see words.
- `fit_reward_model`: featurises the rated generations (each once: `RewardFeatures` caches them),
  fits, calibrates and judges the fit (`judge_on_pages`).
- `judge_on_pages`: how often the reward model orders the candidates of pages it was not fitted to
  as their raters did, with a bootstrap interval over pages (`PageAgreement`); PPO optimises the
  reward model only when that interval lies above chance (the worker falls back otherwise).
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.stats import bootstrap
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RewardConfig
from .features import Responses, RewardFeatures
from .feedback import RatedFeedback

WEIGHTS_FILE = "reward_model.safetensors"
META_FILE = "reward_model.json"
FORMAT_VERSION = 2
"""2: features are [contextual mean, embedding mean, embedding max] (3H); 1 was the contextual mean (H)."""
MIN_HELD_OUT = 5
"""Fewest held-out scores (or pairs) for a held-out correlation (or accuracy) to be reported."""
MIN_GROUPS_FOR_HOLDOUT = 10
"""Fewest groups (prompts) before any data is held out; below this every example trains."""
L2_GRID = (0.1, 1.0, 10.0, 100.0)
"""The L2 strengths cross-validation chooses from when `RewardConfig.reward_l2` is not set."""
DEFAULT_L2 = 10.0
"""The L2 strength used when it is not set and there are too few prompts to cross-validate: the best
of the grid on simulated-rater runs with keyword and sentiment tastes."""
CV_FOLDS = 5
"""Folds (of prompts) of the cross-validation that chooses the L2 strength."""
MIN_JUDGED_PAGES = 10
"""Fewest pages holding a rated ordering before the reward model is judged; below this it is not trusted."""
CHANCE = 0.5
"""The page agreement of a coin toss; the reward model is trusted when its interval lies above it."""
TIE = 1e-9
"""Predictions closer than this (the head's outputs are O(1)) are a tie, which counts ½."""
BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the held-out pages for the agreement's 95% interval."""
_GOLDEN = 0.6180339887498949


@dataclass
class PageAgreement:
    """How often a reward model orders a page's candidates as its rater did, on pages it was not fitted to.

    `pages`/`pairs`: the pages holding a rated ordering and their orderings (`RatedFeedback.orderings`);
    `agreement`: the share of orderings the out-of-fold predictions got right (a tie counts ½), with
    `low`/`high` its 95% percentile bootstrap interval over pages; all three None when fewer than
    `MIN_JUDGED_PAGES` pages hold an ordering (too few to tell).
    """

    pages: int
    pairs: int
    agreement: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None

    @property
    def trusted(self) -> bool:
        """Whether the interval lies above chance: the reward model orders unseen pages better than a coin."""
        return self.low is not None and self.low > CHANCE

    def summary(self) -> str:
        """Return a one-line verdict for the status panel and the log."""
        if self.agreement is None:
            return (f"reward model not judged: {self.pages} page{'s' if self.pages != 1 else ''} with a rated "
                    f"ordering, {MIN_JUDGED_PAGES} needed")
        verdict = "trusted" if self.trusted else "no better than chance"
        return (f"reward model ordered {self.agreement:.2f} [{self.low:.2f}, {self.high:.2f}] of {self.pairs} "
                f"orderings on {self.pages} held-out pages as the raters did: {verdict}")


# ------------------------------------------------------------------------------ the reward model

@dataclass
class FitReport:
    """What one fit saw and how well it did; held-out numbers are None ("n/a") when data was too little."""

    n_examples: int  # feature rows (distinct generations)
    n_scores: int  # rows with a normalised score target
    n_preferences: int  # preference pairs (chosen, rejected)
    train_loss: float  # final objective on all data: MSE + w·Bradley-Terry + L2
    held_out_score_correlation: Optional[float] = None  # Pearson r of predicted vs normalised held-out scores
    held_out_preference_accuracy: Optional[float] = None  # share of held-out pairs ranked right (ties: ½)
    n_held_out_scores: int = 0
    n_held_out_preferences: int = 0
    n_ratings: int = 0  # ratings behind the scores (several raters may rate one generation)
    n_raters: int = 0
    n_reference: int = 0  # samples the output was calibrated on (0: not calibrated)
    seconds: float = 0.0
    l2: Optional[float] = None  # the L2 strength of the fit
    l2_choice: str = ""  # how it was chosen: "set", "cross-validated" or "default" (too few prompts to choose)
    agreement: Optional[PageAgreement] = None  # the page-ordering judgement (`judge_on_pages`); None: not judged

    @property
    def trusted(self) -> bool:
        """Whether the fit was judged and orders held-out pages better than chance."""
        return self.agreement is not None and self.agreement.trusted

    def summary(self) -> str:
        """Return a one-line human summary, with "n/a" for metrics that could not be measured."""
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        return (f"{self.n_examples} examples ({self.n_scores} scored, {self.n_preferences} pairs); "
                f"held-out corr {fmt(self.held_out_score_correlation)} on {self.n_held_out_scores}, "
                f"pref acc {fmt(self.held_out_preference_accuracy)} on {self.n_held_out_preferences}; "
                f"l2 {'n/a' if self.l2 is None else f'{self.l2:g}'}{f' ({self.l2_choice})' if self.l2_choice else ''}; "
                f"train loss {self.train_loss:.4f}; {self.seconds:.2f} s"
                + (f"; {self.agreement.summary()}" if self.agreement is not None else ""))


class RewardModel(nn.Module):
    """Linear reward head on standardised base-model features, clamped to its data, with an output calibration affine.

    score(x) = (clamp(w · (x − feature_mean) / feature_std + b, raw_min, raw_max) − reference_mean) / reference_std

    [raw_min, raw_max] is the range of the head's outputs on the generations it was fitted to. A
    linear head extrapolates without limit and PPO finds where: under a keyword taste the policy
    repeated the word ("you only get to see, you only get to see how you get"), each repetition
    raising the embedding mean, far beyond any score of the base model's. Nobody rated anything that
    far out, so no reward is given for going there.
    """

    def __init__(self, feature_size: int):
        super().__init__()
        self.feature_size = int(feature_size)
        self.register_buffer("feature_mean", torch.zeros(feature_size))
        self.register_buffer("feature_std", torch.ones(feature_size))
        self.register_buffer("weight", torch.zeros(feature_size))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("raw_min", torch.zeros(()))
        self.register_buffer("raw_max", torch.zeros(()))
        self.register_buffer("reference_mean", torch.zeros(()))
        self.register_buffer("reference_std", torch.ones(()))
        self.n_reference = 0
        self.report: FitReport | None = None

    # -------------------------------------------------------------------------- scoring

    def raw_score(self, features: torch.Tensor) -> torch.Tensor:
        """Return (B,) uncalibrated head outputs w·standardised(x) + b, on the features' device."""
        x = features.to(self.weight.device, torch.float32)
        return _head(x, self.feature_mean, self.feature_std, self.weight, self.bias).to(features.device)

    def clamped_score(self, features: torch.Tensor) -> torch.Tensor:
        """Return (B,) uncalibrated head outputs clamped to [raw_min, raw_max], on the model's device."""
        return torch.clamp(self.raw_score(features).to(self.weight.device), self.raw_min, self.raw_max)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return (B,) calibrated rewards for (B, F) response features, the head's output clamped to its fitted range."""
        raw = self.clamped_score(features)
        return ((raw - self.reference_mean) / self.reference_std).to(features.device)

    @torch.no_grad()
    def score_hidden(self, features: torch.Tensor) -> torch.Tensor:
        """Return (B,) rewards, mean 0 / std 1 on reference samples once calibrated, for (B, F) features; no grad."""
        return self.forward(features)

    def score(self, responses: Responses) -> torch.Tensor:
        """Return (B,) rewards of sampled responses from their reward features (`score_hidden`): a `Reward`."""
        return self.score_hidden(responses.features)

    @torch.no_grad()
    def calibrate(self, reference_features: torch.Tensor) -> tuple[float, float]:
        """Set the output affine so rewards have mean 0, std 1 on reference samples; return the raw (mean, std).

        Pass features of responses sampled from the base model (adapter disabled), as Stiennon et
        al. normalise on reference-policy samples. A raw output with no spread keeps scale 1.
        """
        if reference_features.ndim != 2 or reference_features.shape[0] < 2:
            raise ValueError("calibrate needs (N >= 2, F) reference features")
        raw = self.clamped_score(reference_features).double()  # what `forward` calibrates
        mean, std = float(raw.mean()), float(raw.std())
        self.reference_mean.fill_(mean)
        self.reference_std.fill_(std if std > 1e-8 else 1.0)
        self.n_reference = int(reference_features.shape[0])
        if self.report is not None:
            self.report.n_reference = self.n_reference
        return mean, std

    # -------------------------------------------------------------------------- fitting

    def fit(self, features: torch.Tensor, normalized_scores: Sequence[float] | torch.Tensor | None = None,
            pref_pairs: Sequence[tuple[int, int]] = (), *, groups: Sequence[int] | None = None,
            config: RewardConfig | None = None) -> FitReport:
        """Fit the head in place and return a FitReport with held-out accuracy/correlation.

        features: (N, F). normalized_scores: (N,) targets, NaN (or None for all) where a row has no
        score. pref_pairs: (chosen row, rejected row). groups: one int per row (the prompt id);
        rows of a group are held out together, so preference pairs (same prompt) never straddle the
        split. Held-out groups are fixed by a hash of the group id (frac(g·0.618...) < holdout), so
        they stay held out as feedback grows. After measuring on the split, the head is refit on
        all data; the calibration is reset to identity (call `calibrate` afterwards).
        Objective: mean (r − z)² + preference_weight · mean −log σ(r_c − r_r) + l2 · ‖(w, b)‖².

        The L2 strength is `config.reward_l2` when set. Otherwise it is chosen from `L2_GRID` by
        `CV_FOLDS`-fold cross-validation over the groups of the training rows (the held-out split
        never takes part, so its figures stay honest): the strength whose out-of-fold predictions
        have the lowest unpenalised objective wins (ties: the stronger). With fewer than
        `MIN_GROUPS_FOR_HOLDOUT` training groups it is `DEFAULT_L2`. The report says which.
        """
        config = config or RewardConfig()
        config.validate()
        started = time.perf_counter()
        x = torch.as_tensor(features).detach().to(torch.float64).cpu()  # (N, F)
        if x.ndim != 2 or not torch.isfinite(x).all():
            raise ValueError("features must be a finite (N, F) tensor")
        n, h = x.shape
        if h != self.feature_size:
            raise ValueError(f"features have width {h}, the model expects {self.feature_size}")
        z = (torch.full((n,), math.nan, dtype=torch.float64) if normalized_scores is None
             else torch.as_tensor(normalized_scores, dtype=torch.float64).reshape(-1))
        if z.shape[0] != n or torch.isinf(z).any():
            raise ValueError("normalized_scores must hold one finite value (or NaN) per feature row")
        pairs = torch.as_tensor(list(pref_pairs), dtype=torch.long).reshape(-1, 2)
        if pairs.numel() and (pairs.min() < 0 or pairs.max() >= n):
            raise ValueError("a preference pair indexes outside the feature rows")
        scored = ~torch.isnan(z)
        if not scored.any() and not len(pairs):
            raise ValueError("nothing to fit: no scores and no preference pairs")
        group_ids = torch.arange(n) if groups is None else torch.as_tensor(list(groups), dtype=torch.long)
        if group_ids.shape[0] != n:
            raise ValueError("groups must have one entry per feature row")

        report = FitReport(n_examples=n, n_scores=int(scored.sum()), n_preferences=len(pairs),
                           train_loss=math.nan, n_ratings=int(scored.sum()))
        held = _held_out_rows(group_ids, config.reward_holdout)  # (N,) bool
        train_pairs = ~held[pairs[:, 0]] & ~held[pairs[:, 1]]  # (P,) pairs with both rows in training
        if config.reward_l2 is not None:
            report.l2, report.l2_choice = float(config.reward_l2), "set"
        else:
            chosen = _cross_validated_l2(x, z, pairs, ~held, group_ids, config)
            report.l2, report.l2_choice = (DEFAULT_L2, "default") if chosen is None else (chosen, "cross-validated")
        l2 = report.l2
        if held.any() and ((scored & ~held).any() or train_pairs.any()):
            mean, std, w, b, _ = _solve(x, z, pairs, ~held, train_pairs, config, l2)
            _measure_held_out(report, _head(x, mean, std, w, b), z, pairs, held)
        everything = torch.ones(n, dtype=torch.bool)
        mean, std, w, b, loss = _solve(x, z, pairs, everything, torch.ones(len(pairs), dtype=torch.bool), config, l2)
        with torch.no_grad():
            device = self.weight.device
            self.feature_mean.copy_(mean.float().to(device))
            self.feature_std.copy_(std.float().to(device))
            self.weight.copy_(w.float().to(device))
            self.bias.copy_(b.float().to(device))
            fitted = _head(x, mean, std, w, b)  # (N,) the head's outputs on every row it was fitted to
            self.raw_min.fill_(float(fitted.min()))
            self.raw_max.fill_(float(fitted.max()))
            self.reference_mean.zero_()
            self.reference_std.fill_(1.0)
        self.n_reference = 0
        report.train_loss = loss
        report.seconds = time.perf_counter() - started
        self.report = report
        return report

    # -------------------------------------------------------------------------- files

    def save(self, directory: str | Path) -> None:
        """Write `reward_model.safetensors` (the tensors) and `reward_model.json` (size, calibration, report)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        meta = {"format": FORMAT_VERSION, "feature_size": self.feature_size, "n_reference": self.n_reference,
                "report": asdict(self.report) if self.report is not None else None}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "RewardModel":
        """Return the reward model saved in `directory`; ValueError when its files are missing or do not fit."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except Exception as exc:  # missing file, bad JSON, truncated safetensors
            raise ValueError(f"{directory}: cannot read the reward model ({exc})") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory}: reward model format {meta.get('format')!r} is not {FORMAT_VERSION} "
                             "(older reward models used other features: fit a new one)")
        model = cls(int(meta["feature_size"]))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if {k: v.shape for k, v in tensors.items()} != expected:
            raise ValueError(f"{directory}: reward model tensors do not match feature size {model.feature_size}")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"{directory}: reward model holds NaN or infinite values")
        model.load_state_dict(tensors)
        model.n_reference = int(meta.get("n_reference", 0))
        if meta.get("report"):
            report = dict(meta["report"])
            if report.get("agreement") is not None:
                report["agreement"] = PageAgreement(**report["agreement"])
            model.report = FitReport(**report)
        return model.to(device)


def _measure_held_out(report: FitReport, predicted: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor,
                      held: torch.Tensor) -> None:
    """Fill the report's held-out correlation and preference accuracy, where there are enough held-out items."""
    held_scores = held & ~torch.isnan(z)  # (N,)
    held_pairs = held[pairs[:, 0]] & held[pairs[:, 1]]  # (P,)
    if int(held_scores.sum()) >= MIN_HELD_OUT:
        report.n_held_out_scores = int(held_scores.sum())
        report.held_out_score_correlation = _pearson(predicted[held_scores], z[held_scores])
    if int(held_pairs.sum()) >= MIN_HELD_OUT:
        margin = predicted[pairs[held_pairs, 0]] - predicted[pairs[held_pairs, 1]]  # r_chosen − r_rejected
        report.n_held_out_preferences = int(held_pairs.sum())
        report.held_out_preference_accuracy = float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def _group_hash(group: int) -> float:
    """Return a group's place in [0, 1): spread evenly (golden ratio), not following prompt ids."""
    return (group * _GOLDEN) % 1.0


def _held_out_rows(groups: torch.Tensor, fraction: float) -> torch.Tensor:
    """Return (N,) bool: rows whose group hashes below `fraction`; none when there are too few groups."""
    distinct = torch.unique(groups)
    if fraction <= 0 or len(distinct) < MIN_GROUPS_FOR_HOLDOUT:
        return torch.zeros(len(groups), dtype=torch.bool)
    held_groups = {int(g) for g in distinct if _group_hash(int(g)) < fraction}
    return torch.tensor([int(g) in held_groups for g in groups], dtype=torch.bool)


def _cross_validated_l2(x: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor, rows: torch.Tensor,
                        groups: torch.Tensor, config: RewardConfig) -> float | None:
    """Return the `L2_GRID` strength with the lowest out-of-fold objective over `rows`, or None when too few groups.

    The distinct groups of `rows` are dealt into `CV_FOLDS` folds (ordered by the same hash as the
    held-out split, so the folds do not follow prompt ids); each fold is predicted by a head fitted
    on the other folds, and every strength is scored by mean (r − z)² over the out-of-fold scores
    plus preference_weight · mean −log σ(r_c − r_r) over pairs inside one fold. Deterministic.
    """
    distinct = torch.unique(groups[rows])
    if len(distinct) < MIN_GROUPS_FOR_HOLDOUT:
        return None
    ranked = sorted((int(g) for g in distinct), key=lambda g: (_group_hash(g), g))
    fold_of_group = {g: i % CV_FOLDS for i, g in enumerate(ranked)}
    fold = torch.tensor([fold_of_group[int(g)] if r else -1 for g, r in zip(groups, rows)])  # (N,); -1: not in rows
    chosen_fold, rejected_fold = fold[pairs[:, 0]], fold[pairs[:, 1]]  # (P,), (P,)
    scored = ~torch.isnan(z) & (fold >= 0)  # (N,)
    predictions = {l2: torch.full((len(x),), math.nan, dtype=x.dtype) for l2 in L2_GRID}
    for k in range(CV_FOLDS):
        train = (fold >= 0) & (fold != k)  # (N,)
        train_pairs = train[pairs[:, 0]] & train[pairs[:, 1]]  # (P,)
        if not (train & scored).any() and not train_pairs.any():
            continue
        for l2 in L2_GRID:
            mean, std, w, b, _ = _solve(x, z, pairs, train, train_pairs, config, l2)
            predictions[l2][fold == k] = _head(x[fold == k], mean, std, w, b)
    predicted = ~torch.isnan(predictions[L2_GRID[0]])  # (N,) rows with an out-of-fold prediction
    evaluable = scored & predicted  # (N,)
    eval_pairs = (chosen_fold == rejected_fold) & predicted[pairs[:, 0]] & predicted[pairs[:, 1]]  # (P,)
    if int(evaluable.sum()) + int(eval_pairs.sum()) < MIN_HELD_OUT:
        return None
    best, best_loss = None, math.inf
    for l2 in sorted(L2_GRID, reverse=True):  # the stronger wins a tie
        r = predictions[l2]
        loss = float(((r[evaluable] - z[evaluable]) ** 2).mean()) if evaluable.any() else 0.0
        if eval_pairs.any():
            margin = r[pairs[eval_pairs, 0]] - r[pairs[eval_pairs, 1]]
            loss += config.preference_weight * float(nn.functional.softplus(-margin).mean())
        if loss < best_loss - 1e-12:
            best, best_loss = l2, loss
    return best


def _head(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return (N,) outputs of the linear head (w, b) on (N, F) features standardised by (mean, std)."""
    return ((x - mean) / std) @ w + b


def _solve(x: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor, rows: torch.Tensor, use_pairs: torch.Tensor,
           config: RewardConfig, l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Return (feature mean, std, w, b, final loss) minimising the convex objective by damped Newton steps.

    Objective over θ = (w, b): mean (θ·x̃ − z)² + preference_weight · mean softplus(−θ·(x̃_c − x̃_r))
    + l2 · ‖θ‖², with x̃ = (standardised x over `rows`, 1). The penalty covers the bias too: targets are centred
    per rater, and `calibrate` sets the output's offset anyway. Every term but the penalty sees θ only
    through the data rows, so the optimum lies in their span (representer theorem): solving in an
    orthonormal basis of that span (k ≤ min(rows + pairs, H + 1) coordinates) gives the same θ with a
    k × k Newton system, which stays milliseconds for GPT-2 small's 768 dimensions and a few hundred
    ratings. Newton converges in a handful of deterministic steps (no seeds, no learning rate).
    """
    mean = x[rows].mean(0)  # (F,)
    std = x[rows].std(0, unbiased=False).clamp_min(1e-6) if int(rows.sum()) > 1 else torch.ones_like(mean)
    xs = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # (N, H + 1), last: bias
    scored = rows & ~torch.isnan(z)
    a, target = xs[scored], z[scored]  # (S, H + 1), (S,)
    d = xs[pairs[use_pairs, 0]] - xs[pairs[use_pairs, 1]] if len(pairs) else xs[:0]  # (P, H + 1); bias cancels
    data = torch.cat([a, d])  # (S + P, H + 1)
    if len(data) < data.shape[1]:  # fewer examples than dimensions: work in the span of the data rows
        basis = torch.linalg.qr(data.T).Q  # (H + 1, k = S + P), orthonormal columns spanning the rows
        a, d = a @ basis, d @ basis  # (S, k), (P, k)
    else:
        basis = None
    k = a.shape[1]
    fixed_hessian = (2 * l2 + 1e-10) * torch.eye(k, dtype=x.dtype)  # ridge (+ jitter for l2 = 0)
    if len(a):
        fixed_hessian += 2 * a.T @ a / len(a)  # the squared error's Hessian does not depend on beta

    def loss_grad_hessian(beta: torch.Tensor, need_hessian: bool = True):
        loss = l2 * float(beta @ beta)
        grad = 2 * l2 * beta
        hessian = fixed_hessian.clone() if need_hessian else None
        if len(a):
            residual = a @ beta - target
            loss += float((residual ** 2).mean())
            grad = grad + 2 * a.T @ residual / len(a)
        if len(d):
            margin = d @ beta  # r_chosen − r_rejected
            loss += config.preference_weight * float(nn.functional.softplus(-margin).mean())  # −log σ(margin)
            grad = grad - config.preference_weight * d.T @ torch.sigmoid(-margin) / len(d)
            if need_hessian:
                curvature = torch.sigmoid(margin) * torch.sigmoid(-margin)
                hessian += config.preference_weight * (d.T * curvature) @ d / len(d)
        return loss, grad, hessian

    beta = torch.zeros(k, dtype=x.dtype)
    loss, grad, hessian = loss_grad_hessian(beta)
    for _ in range(config.reward_max_iter):
        step = torch.linalg.solve(hessian, grad)
        decrement = float(grad @ step)  # squared Newton decrement: twice the expected decrease
        if decrement < 1e-16:
            break
        t = 1.0
        while t > 1e-8:  # backtracking (Armijo) line search
            new_loss = loss_grad_hessian(beta - t * step, need_hessian=False)[0]
            if new_loss <= loss - 0.25 * t * decrement:
                break
            t *= 0.5
        beta = beta - t * step
        loss, grad, hessian = loss_grad_hessian(beta)
    theta = beta if basis is None else basis @ beta  # (H + 1,)
    return mean, std, theta[:-1], theta[-1], loss


def judge_on_pages(x: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor, orderings: Sequence[tuple[int, int]],
                   page_ids: Sequence[int], config: RewardConfig, l2: float) -> PageAgreement:
    """Return how often heads fitted without a page order that page's candidates as its rater did.

    x (N, F) features, z (N,) normalised scores (NaN: none), pairs (P, 2) preferences: what `_solve`
    fits; orderings: the (chosen row, rejected row) pairs the raters stated on their pages;
    page_ids: each row's page. The pages holding an ordering are dealt into `CV_FOLDS` folds (by the
    golden-ratio hash of the page id, so deterministic); each fold's rows are predicted by a head
    fitted with strength `l2` on every other row (pages without an ordering always train). An
    ordering scores 1 when its chosen row is predicted higher, ½ on a tie (`TIE`); the agreement is the
    share over all orderings, its interval the 95% percentile bootstrap over pages.
    """
    by_page: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for chosen, rejected in orderings:
        by_page[int(page_ids[chosen])].append((chosen, rejected))
    judged = PageAgreement(pages=len(by_page), pairs=len(orderings))
    if len(by_page) < MIN_JUDGED_PAGES:
        return judged
    ranked = sorted(by_page, key=lambda page: (_group_hash(page), page))
    fold_of_page = {page: i % CV_FOLDS for i, page in enumerate(ranked)}
    fold = torch.tensor([fold_of_page.get(int(page), -1) for page in page_ids])  # (N,); -1: always trains
    predicted = torch.full((len(x),), math.nan, dtype=x.dtype)  # (N,) out-of-fold predictions
    for k in range(CV_FOLDS):
        train = fold != k  # (N,)
        mean, std, w, b, _ = _solve(x, z, pairs, train, train[pairs[:, 0]] & train[pairs[:, 1]], config, l2)
        predicted[fold == k] = _head(x[fold == k], mean, std, w, b)
    right, total = [], []
    for page in ranked:
        margins = torch.stack([predicted[c] - predicted[r] for c, r in by_page[page]])  # r_chosen − r_rejected
        tie = margins.abs() <= TIE  # identical candidates may differ by rounding
        right.append(float(((margins > 0) & ~tie).double().sum() + 0.5 * tie.double().sum()))
        total.append(float(len(margins)))
    right_np, total_np = np.array(right), np.array(total)
    judged.agreement = float(right_np.sum() / total_np.sum())
    interval = bootstrap((right_np, total_np), lambda a, n, axis=-1: a.sum(axis) / n.sum(axis), paired=True,
                         vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                         rng=np.random.default_rng(0)).confidence_interval
    judged.low, judged.high = float(interval.low), float(interval.high)
    return judged


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Return Pearson's r of two 1-D tensors, or None when either has no spread."""
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return None if denom < 1e-12 else float((a * b).sum()) / denom


# ------------------------------------------------------------------------------ from feedback

def fit_reward_model(feedback: RatedFeedback, features: RewardFeatures, *,
                     reference_features: torch.Tensor | None = None,
                     config: RewardConfig | None = None) -> tuple[RewardModel, FitReport]:
    """Return a reward model fitted to every rating and preference of `feedback`, and its FitReport.

    Each distinct generation is featurised once (`RewardFeatures.of_generations`, which caches by
    generation id, so a worker that keeps `features` featurises only new generations each round);
    rows are grouped by prompt for the held-out split. Featurising is the cost, the fit itself is
    quick. The fit is judged on held-out pages (`report.agreement`, `judge_on_pages`, with the fit's
    L2 strength). The output is calibrated on `reference_features` (features of base-model samples) when
    given, otherwise on the generations sampled from the base model (adapter version 0), or on all
    of them when fewer than 2.
    """
    config = config or RewardConfig()
    config.validate()
    started = time.perf_counter()
    generations = feedback.generations
    x = features.of_generations(generations, feedback.prompts, config.feature_batch_size)  # (N, F)
    model = RewardModel(x.shape[1])
    report = model.fit(x, feedback.scores, feedback.pairs, groups=[g.prompt_id for g in generations], config=config)
    report.n_ratings = feedback.n_ratings
    report.n_raters = len(feedback.raters)
    report.agreement = judge_on_pages(x.detach().to(torch.float64).cpu(), feedback.scores.to(torch.float64),
                                      torch.as_tensor(feedback.pairs, dtype=torch.long).reshape(-1, 2),
                                      feedback.orderings(), feedback.page_ids, config, report.l2)
    if reference_features is None:
        base_rows = [row for row, g in enumerate(generations) if g.adapter_version == 0]
        reference_features = x[base_rows] if len(base_rows) >= 2 else x
    if reference_features.shape[0] >= 2:
        model.calibrate(reference_features)
    report.seconds = time.perf_counter() - started
    return model, report
