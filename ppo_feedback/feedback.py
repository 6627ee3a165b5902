"""What people said, as training data: per-rater normalised ratings, one row per rated generation, and the replay pool.

- `normalize_ratings`: scores 1..5 become per-rater z-scores, shrunk towards the global mean and
  spread for raters with few ratings (a strict rater's 3 is not a lenient rater's 3).
- `read_feedback`: every current rating and preference from the `FeedbackStore`, normalised, as
  `RatedFeedback`: one row per generation, which the reward model is fitted to (`rewards`).
- `RatedFeedback.replay_pool`: the rated generations PPO replays (`Replay`), scored by their rating
  relative to their siblings' (the other candidates of their page).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import RewardConfig
from .generation import Rollout, max_positions, rollout_of
from .objectives import page_pairs
from .policy import PolicyWithValueHead


# ------------------------------------------------------------------------------ per-rater normalisation

def normalize_ratings(ratings: Sequence[tuple[str, float]], prior_weight: float = 5.0) -> list[float]:
    """Return one normalised score per (rater, score), in input order: a shrunk per-rater z-score.

    The rule. Over all ratings given, the global mean μ_g and std σ_g (population, ddof 0). For a
    rater with n ratings of mean m and population variance v, and prior weight k (`prior_weight`,
    k pseudo-ratings at the global mean and spread):

        μ_r = (n·m + k·μ_g) / (n + k)        σ_r² = (n·v + k·σ_g²) / (n + k)
        z   = (score − μ_r) / σ_r

    So a rater with many ratings is judged against their own mean and spread (adding a constant to
    all their scores changes their z by at most |c|·k/(n+k)/σ_r, exactly 0 when k = 0), while a new
    rater with one rating gets almost the global z-score, not a wild one. Where σ_r is 0 (a rater
    whose ratings are all identical with k = 0, or everybody giving one score) the global σ_g is used,
    and where that is 0 too every z is 0: identical ratings carry no ordering. Order of the input
    does not matter (each output follows its input).
    """
    if prior_weight < 0:
        raise ValueError("prior_weight must be >= 0")
    if not ratings:
        return []
    scores = [float(s) for _, s in ratings]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("scores must be finite")
    global_mean = math.fsum(scores) / len(scores)
    global_var = math.fsum((s - global_mean) ** 2 for s in scores) / len(scores)
    by_rater: dict[str, list[float]] = defaultdict(list)
    for (rater, _), score in zip(ratings, scores):
        by_rater[rater].append(score)
    centre: dict[str, tuple[float, float]] = {}
    for rater, own in by_rater.items():
        n, k = len(own), prior_weight
        mean = math.fsum(own) / n
        var = math.fsum((s - mean) ** 2 for s in own) / n
        mu = (n * mean + k * global_mean) / (n + k)
        var_r = (n * var + k * global_var) / (n + k)
        sigma = math.sqrt(var_r) if var_r > 1e-12 else math.sqrt(global_var)
        centre[rater] = (mu, sigma)
    out = []
    for (rater, _), score in zip(ratings, scores):
        mu, sigma = centre[rater]
        out.append(0.0 if sigma <= 1e-12 else (score - mu) / sigma)
    return out


# ------------------------------------------------------------------------------ from the store

@dataclass
class RatedFeedback:
    """Every current rating and preference of a store, one row per distinct generation (sorted by id),
    with the page-level judgements in force: none-is-good pages, flagged candidates and ties."""

    generations: list  # db.records.Generation per row (its `page_id`: the page it was shown on)
    prompts: list[str]  # the row's prompt text
    scores: torch.Tensor  # (N,) float64 mean normalised score of the row's ratings; NaN when only in preferences
    pairs: list[tuple[int, int]]  # (chosen row, rejected row) per preference (none with a `blocked` chosen)
    n_ratings: int
    raters: set[str]
    undesirable: frozenset[int] = frozenset()  # rows on a page a rater judged none-is-good
    flagged: frozenset[int] = frozenset()  # rows a rater flagged (offensive, broken, off-prompt, other)
    ties: list[tuple[int, ...]] = field(default_factory=list)  # rows a rater judged equally best, per tie

    @property
    def blocked(self) -> frozenset[int]:
        """Rows never made likelier (never DPO chosen, RAFT kept, KTO desirable, replayed, nor a reward
        model's chosen): the undesirable and the flagged ones."""
        return self.undesirable | self.flagged

    def tied_pairs(self) -> set[tuple[int, int]]:
        """Return every ordered (row, row) pair of two rows judged equally best in one tie: no preference."""
        return {(i, j) for tie in self.ties for i in tie for j in tie if i != j}

    @property
    def page_ids(self) -> list[int]:
        """The page each row's generation was shown on (`db.records.Page`), per row."""
        return [g.page_id for g in self.generations]

    def rated_pages(self) -> dict[int, list[int]]:
        """Return {page id: its rated rows, ascending}, pages in order of their first row.

        A page is one request: the candidates one rater asked for and saw side by side, so rows of
        one page were judged against each other (pairs, above-mean candidates and baselines come
        from here); rows of different pages were not, even of the same prompt and version.
        """
        pages: dict[int, list[int]] = defaultdict(list)
        for row, g in enumerate(self.generations):
            if math.isfinite(float(self.scores[row])):
                pages[g.page_id].append(row)
        return dict(pages)

    def orderings(self, min_chosen: float | None = None) -> list[tuple[int, int]]:
        """Return the sorted (chosen row, rejected row) orderings the raters stated, page by page.

        Every two candidates of one page rated differently (`page_pairs`; with `min_chosen`, only
        those whose higher one has at least that normalised score), and every preference (a pick),
        which replaces a rating pair that contradicts it: the rater compared those two side by side.
        None between two rows of one tie, none whose chosen row is `blocked` (a none-is-good page's
        candidates, flagged ones). DPO trains on these; the reward model is judged by how many it gets right.
        """
        pairs = set(page_pairs(self.scores, self.page_ids, min_chosen=min_chosen))
        for chosen, rejected in self.pairs:
            pairs.discard((rejected, chosen))
            pairs.add((chosen, rejected))
        blocked = self.blocked
        return sorted(pairs - self.tied_pairs() - {p for p in pairs if p[0] in blocked})

    def relative_scores(self) -> torch.Tensor:
        """Return (N,) float64 scores minus the mean score of the row's siblings, NaN where unrated.

        Siblings are the other rated generations of the same page (`rated_pages`: the candidates
        shown together to the rater who asked for them): a leave-one-out baseline, as in RLOO
        (Ahmadian et al. 2024), so what a row says is how much better it was than what was shown
        beside it, not how easy the prompt was. A row without siblings keeps its score.
        """
        relative = self.scores.clone()
        for rows in self.rated_pages().values():
            n = len(rows)
            if n > 1:  # s - (total - s) / (n - 1), for every row at once
                relative[rows] = (n * self.scores[rows] - self.scores[rows].sum()) / (n - 1)
        return relative

    def replayable(self, temperature: float) -> list[int]:
        """Return the rated rows PPO can replay: stored behaviour logprobs for every token, at `temperature`."""
        return [row for row, g in enumerate(self.generations)
                if math.isfinite(float(self.scores[row])) and g.token_ids and len(g.logprobs) == len(g.token_ids)
                and math.isclose(float(g.sampling.get("temperature", math.nan)), temperature)]

    def replay_pool(self, temperature: float) -> Replay:
        """Return the rated generations PPO replays: `replayable` rows rated above their siblings, with relative scores.

        Each is scored by its rating relative to its siblings' (`relative_scores`), and only those
        rated above them are kept: PPO replays them to make them likelier. Pushing a sampled
        sequence down again and again moves its probability to text nobody rated (likelihood
        displacement, Razin et al. 2024); rejection-sampling fine-tuning (RAFT, Dong et al. 2023)
        keeps only the good samples for the same reason.
        """
        scores, blocked = self.relative_scores(), self.blocked
        rows = [r for r in self.replayable(temperature) if scores[r] > 0 and r not in blocked]
        generations = [self.generations[r] for r in rows]
        return Replay([self.prompts[r] for r in rows], [list(g.token_ids) for g in generations],
                      [list(g.logprobs) for g in generations], [float(scores[r]) for r in rows])


def read_feedback(store, prior_weight: float = RewardConfig.prior_weight) -> RatedFeedback:
    """Return the store's current feedback as RatedFeedback; raise ValueError when there is none.

    Reads `store.iter_feedback()` (current ratings and preferences only: a re-rating, a later
    submission of the page or an undo supersedes the old rows), normalises scores per rater over all of
    them (`normalize_ratings`) and averages the normalised scores of a generation rated by several
    raters. Reads the judgements in force (`store.judgements()`): every candidate of a none-is-good page
    is a row (rated or not) marked undesirable, flagged candidates are marked flagged, tied ones
    are recorded as a tie; a preference whose chosen candidate is either is left out.
    """
    ratings, preferences = [], []
    for batch in store.iter_feedback():
        ratings.extend(batch.ratings)
        preferences.extend(batch.preferences)
    judgements = store.judgements()
    if not ratings and not preferences and not any(j.none_good for j in judgements):
        raise ValueError("no ratings or preferences to fit a reward model to")
    generations, prompts = {}, {}  # generation id -> Generation, generation id -> prompt text
    for rated in ratings:
        generations[rated.generation.id], prompts[rated.generation.id] = rated.generation, rated.prompt_text
    for pair in preferences:
        for g in (pair.chosen, pair.rejected):
            generations[g.id], prompts[g.id] = g, pair.prompt_text
    for judgement in judgements:
        if judgement.none_good:
            for g in judgement.generations:
                generations[g.id], prompts[g.id] = g, judgement.prompt_text
    ids = sorted(generations)
    row_of = {gid: i for i, gid in enumerate(ids)}
    undesirable = frozenset(row_of[g.id] for j in judgements if j.none_good for g in j.generations)
    flagged = frozenset(row_of[g] for j in judgements for g in j.flagged if g in row_of)
    ties = [tuple(row_of[g] for g in j.tied if g in row_of) for j in judgements if j.tied]
    normalized = normalize_ratings([(r.rating.rater, r.rating.score) for r in ratings], prior_weight)
    totals: dict[int, list[float]] = defaultdict(list)
    for rated, z in zip(ratings, normalized):
        totals[row_of[rated.generation.id]].append(z)
    scores = torch.full((len(ids),), math.nan, dtype=torch.float64)
    for row, zs in totals.items():
        scores[row] = sum(zs) / len(zs)
    pairs = [(row_of[p.chosen.id], row_of[p.rejected.id]) for p in preferences]
    return RatedFeedback(generations=[generations[g] for g in ids], prompts=[prompts[g] for g in ids],
                         scores=scores, pairs=[p for p in pairs if p[0] not in undesirable | flagged],
                         n_ratings=len(ratings),
                         raters={r.rating.rater for r in ratings} | {p.preference.rater for p in preferences}
                         | {j.rater for j in judgements if j.none_good},
                         undesirable=undesirable, flagged=flagged, ties=[t for t in ties if len(t) > 1])


# ------------------------------------------------------------------------------ the replay pool

@dataclass
class Replay:
    """Rated generations to replay in a PPO iteration: what was sampled, by which probabilities, and its score.

    `logprobs` are the behaviour policy's (the version that served them, stored with each
    generation), at the trainer's temperature; `scores` are baseline-corrected ratings
    (`RatedFeedback.replay_pool` gives each its normalised rating minus its siblings' mean), used as
    the return.
    """

    prompts: list[str]
    responses: list[list[int]]
    logprobs: list[list[float]]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, rows: Sequence[int]) -> Replay:
        """Return the samples at `rows`, in that order."""
        return Replay([self.prompts[r] for r in rows], [self.responses[r] for r in rows],
                      [self.logprobs[r] for r in rows], [self.scores[r] for r in rows])

    def rollout(self, policy: PolicyWithValueHead, temperature: float) -> Rollout:
        """Return the samples as a Rollout on the policy's device, behaviour logprobs included."""
        device = next(policy.parameters()).device
        return rollout_of(policy.tokenizer, self.prompts, self.responses, temperature=temperature, device=device,
                          positions=max_positions(policy.peft_model), logprobs=self.logprobs)

    def score_tensor(self) -> torch.Tensor:
        """Return the scores as a (B,) float tensor."""
        return torch.tensor(self.scores, dtype=torch.float32)
