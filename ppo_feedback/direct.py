"""Direct objectives on the rated pages, beside PPO: DPO, IPO, RAFT and KTO rounds (`--objective`).

A direct round learns from the stored feedback itself, without a reward model or fresh samples to
score: `examples` makes the objective's examples from the rated pages (`RatedFeedback`), and
`DirectTrainer.step` lays them out (`rollout_of`), takes their reference log-probabilities (adapter off,
no grad; once per sequence while the worker runs), runs `--direct-epochs` passes of shuffled minibatches of
at most `--direct-batch-size` examples, a page's together (they share candidates and a prompt), at most
`--direct-max-steps` of them, with the objective's loss (`objectives`), one optimizer step each through the
`PPOTrainer` it shares the policy, optimizer, team and gradient clipping with, and then samples
`batch_size` fresh responses from pool prompts for their KL to the reference (`objective/kl`) and how much
less likely the base finds the policy's next tokens than its own there (`objective/perplexity_ratio`;
`Drift`); with `--direct-target-kl` or `--direct-max-perplexity-ratio` it measures them during the round too
(after `KL_CHECK_STEPS` optimizer steps, then when `next_kl_check` says) and stops early once one is above
its bound.

What each learns from (one page: the candidates one rater asked for and saw side by side):

- dpo: pairs (chosen, rejected) of one page's candidates rated differently whose chosen one is good
  (`page_pairs`), and the preferences (picks), which win over a contradicting rating pair; with
  `--rpo-alpha` > 0 the chosen ones' likelihood is held up too (RPO, `chosen_nll`);
- ipo: the same pairs with IPO's squared loss, whose margin stops at 1/(2·`--beta`) per token;
- raft: the good candidates rated strictly above their page's mean (`above_page_mean`), made likelier;
- kto: every rated candidate alone, desirable when it is good and above its rater's own mean
  (normalised score > 0), undesirable below that mean, otherwise left out; every candidate of a
  none-is-good page and every flagged one is undesirable, rated or not; weights from
  `kto_weights`, the reference point z0 from mismatched pairs (`kto_mismatched`) under the current
  policy, per minibatch.

Good: a per-rater normalised score (`feedback.normalize_ratings`: the rater's own standard
deviations from their own mean) of at least `--good-score`. What a direct objective makes likelier
must be good in absolute terms, not only rated above the others of its page: on a page of poor
candidates a rater's 2 against a 1 is mostly noise. A candidate of a none-is-good page or a flagged
one (`RatedFeedback.blocked`) is never made likelier: never DPO's chosen, RAFT's kept nor KTO's
desirable; two candidates of one tie give DPO no pair.

With a `Team` every process builds the same examples and takes the same minibatches (one shared
shuffle), so the averaged gradients equal one process's; each samples its own KL batch.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Sequence

import torch

from .config import ObjectiveConfig
from .feedback import RatedFeedback
from .generation import Rollout, max_positions, rollout_of
from .objectives import (above_page_mean, chosen_nll, dpo_loss, ipo_loss, kto_kl_estimate, kto_loss,
                         kto_mismatched, kto_weights, raft_loss, sequence_logprobs)
from .policy import token_logprobs
from .trainer import PPOTrainer


@dataclass
class Examples:
    """A direct objective's examples: the (prompt, response tokens) sequences to lay out, and items over them.

    An item is a tuple of sequence indices: (chosen, rejected) for dpo, (kept,) for raft,
    (own, mismatched) for kto, whose `desirable` says each item's label; `pages` the page each item was
    judged on (its first sequence's), so that a minibatch takes a page's items together (`DirectTrainer.schedule`).
    """

    objective: str
    sequences: list[tuple[str, list[int]]]
    items: list[tuple[int, ...]]
    desirable: list[bool] | None = None
    pages: list[int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def sequence_key(self, j: int) -> tuple[str, tuple[int, ...]]:
        """Return what identifies sequence `j` from round to round: its prompt and response tokens."""
        prompt, tokens = self.sequences[j]
        return prompt, tuple(tokens)

    def key(self, i: int) -> tuple:
        """Return what identifies item `i` from round to round: its sequences' keys (KTO's: its own, not the
        mismatched partner, which changes as pages are added)."""
        item = self.items[i][:1] if self.objective == "kto" else self.items[i]
        return tuple(self.sequence_key(j) for j in item)

    @cached_property
    def fingerprint(self) -> frozenset:
        """What the examples teach, as a set: each item's key with its label (KTO's desirable), so that equal
        fingerprints mean a round on these examples would learn nothing new (computed once: a waiting worker
        compares it at every poll)."""
        labels = self.desirable if self.desirable is not None else [None] * len(self)
        return frozenset((self.key(i), labels[i]) for i in range(len(self)))


MIN_REFIT_PASSES = 2
"""With `--direct-from-base` and `--direct-max-steps`, the passes over every example a round from the base must
have room for in the step budget (fewer if `--direct-epochs` asks fewer): a refit needs about two passes to move
the model at all, so once the pages outgrow that a round continues from the version it loaded instead."""

KL_CHECK_STEPS = 4
"""With `--direct-target-kl` (or `--direct-max-perplexity-ratio`), the optimizer steps before a round's first
measurement (one is taken after the last step too), however the passes fall: a measurement samples and scores a
batch, the cost of a few steps, so not after every short pass; later ones come when `next_kl_check` says."""

MAX_CHECK_GAP = 2 * KL_CHECK_STEPS
"""Most optimizer steps between two KL measurements of a round, however far below the target its KL is."""


@dataclass
class Drift:
    """How far fresh samples of the policy have moved from the base model: `kl`, their mean KL to the reference
    in nats per response; `length`, their mean length in tokens; `perplexity_ratio`, the base model's expected
    perplexity of the policy's next token over its own, at the samples' contexts: exp of the mean per token of
    `excess_surprisal` (exactly 1 for the base itself; above 1, the policy puts its mass on tokens the base
    finds less likely than its own picks there). The KL alone does not tell: a policy sharpening onto the
    base's likely tokens moves far in KL while its text stays fluent (ratio below 1)."""
    kl: float
    length: float
    perplexity_ratio: float


def expected_surprisal(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Return the (...) base model's expected surprisal of the policy's next token, ``Σ_x π(x)·(−log p_base(x))``
    at each context, from the (..., V) logits of the policy (π) and of the base: the mean of −log p_base over
    the token π would draw there, exactly (the base's entropy where π is the base)."""
    return -(torch.softmax(logits.float(), dim=-1) * torch.log_softmax(base_logits.float(), dim=-1)).sum(-1)


def excess_surprisal(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Return the (...) base model's expected surprisal of the policy's next token less its expected surprisal
    of its own: ``Σ_x π(x)·(−log p_base(x)) − H(p_base)`` at each context, from the (..., V) logits of the
    policy (π) and of the base. Exact, not sampled: 0 where π is the base, ``KL(π‖p_base) + H(π) − H(p_base)``
    elsewhere (negative where π sharpens onto the base's likely tokens)."""
    base = torch.log_softmax(base_logits.float(), dim=-1)  # once: both terms weigh the same −log p_base
    return -((torch.softmax(logits.float(), dim=-1) - base.exp()) * base).sum(-1)


def next_kl_check(step: int, kl: float, last_step: int, last_kl: float, target: float | None) -> int:
    """Return the optimizer step after which a round measures its KL next, given `kl` measured after `step` and
    the measurement before it (`last_step`, `last_kl`; 0 and 0.0 for the first).

    Where the KL, growing at the larger of two rates per step, would reach `target`: its rate since the last
    measurement (a KL that speeds up) and since the round began, from 0 (a measurement that dipped by noise; a
    round from the base starts at KL 0 exactly, a continuing one above it, whose rate is then overestimated and
    its check comes sooner); at least 1 and at most `MAX_CHECK_GAP` steps on: sparse checks while the KL is
    far below the target, every step as it nears it, so a round neither pays for checks it does not need nor
    runs far past the target between two. Without a `target` (only `--direct-max-perplexity-ratio` bounds the
    round): every `KL_CHECK_STEPS` steps.
    """
    if target is None:
        return step + KL_CHECK_STEPS
    growth = max((kl - last_kl) / (step - last_step), kl / step)
    if not growth > 0:
        return step + MAX_CHECK_GAP
    return step + max(1, min(MAX_CHECK_GAP, math.floor((target - kl) / growth)))


WAITING_FOR = {
    "dpo": "a good candidate rated above another of its page, or a pick",
    "ipo": "a good candidate rated above another of its page, or a pick",
    "raft": "a good candidate rated above its page's mean",
    "kto": "good candidates and ones rated below their rater's mean, on prompts none of which has over half of them",
}
"""What a direct round waits for when the feedback gives its objective nothing to learn from (good:
rated at least `--good-score` of its rater's standard deviations above their mean)."""


def examples(objective: str, feedback: RatedFeedback, good: float = -math.inf) -> Examples | None:
    """Return the objective's examples from all rated pages of `feedback`, or None when there are none.

    `good`: the normalised score from which a rated candidate counts as good (`--good-score`): what
    an objective learns to make likelier must be good, not only better than its page's others.
    Generations without stored response tokens cannot be laid out and are left out.
    """
    usable = [bool(g.token_ids) for g in feedback.generations]
    build = {"dpo": _dpo_examples, "ipo": _dpo_examples, "raft": _raft_examples, "kto": _kto_examples}[objective]
    found = build(feedback, usable, good)
    return replace(found, objective=objective) if found is not None and len(found) else None


def _sequences_of(feedback: RatedFeedback, rows: Sequence[int]) -> list[tuple[str, list[int]]]:
    return [(feedback.prompts[r], list(feedback.generations[r].token_ids)) for r in rows]


def _dpo_examples(feedback: RatedFeedback, usable: list[bool], good: float) -> Examples:
    """DPO's pairs: the raters' orderings of one page's candidates (`RatedFeedback.orderings`), a rating
    pair only when its chosen candidate is good; picks always."""
    pairs = [(c, r) for c, r in feedback.orderings(min_chosen=good) if usable[c] and usable[r]]
    rows = sorted({row for pair in pairs for row in pair})
    position, page = {row: i for i, row in enumerate(rows)}, feedback.page_ids
    return Examples("dpo", _sequences_of(feedback, rows), [(position[c], position[r]) for c, r in pairs],
                    pages=[page[c] for c, _ in pairs])


def _raft_examples(feedback: RatedFeedback, usable: list[bool], good: float) -> Examples:
    """RAFT's kept samples: the good candidates rated strictly above their page's mean (`above_page_mean`),
    none of them `blocked`."""
    keep = above_page_mean(feedback.scores, feedback.page_ids, min_score=good).tolist()
    blocked = feedback.blocked
    rows = [row for row, kept in enumerate(keep) if kept and usable[row] and row not in blocked]
    return Examples("raft", _sequences_of(feedback, rows), [(i,) for i in range(len(rows))],
                    pages=[feedback.page_ids[r] for r in rows])


def _kto_examples(feedback: RatedFeedback, usable: list[bool], good: float) -> Examples | None:
    """KTO's labelled outputs and their mismatched partners: desirable the good ones above their rater's mean
    (normalised score > 0 and >= `good`) that are not `blocked`, undesirable those below it (< 0) and every
    blocked one (a none-is-good page's candidates, flagged ones; rated or not); the rest are left out.

    None when no pairing exists (one prompt holds more than half the outputs: `kto_mismatched`).
    """
    scores, blocked = feedback.scores.tolist(), feedback.blocked
    desirable = [math.isfinite(s) and s > 0 and s >= good and row not in blocked for row, s in enumerate(scores)]
    undesirable = [row in blocked or (math.isfinite(s) and s < 0) for row, s in enumerate(scores)]
    rows = [row for row in range(len(scores)) if usable[row] and (desirable[row] or undesirable[row])]
    if not rows:
        return None
    try:
        partner = kto_mismatched([feedback.prompts[r] for r in rows])
    except ValueError:
        return None
    own = _sequences_of(feedback, rows)
    mismatched = [(own[i][0], own[j][1]) for i, j in enumerate(partner)]  # prompt i, response of row j
    n = len(rows)
    return Examples("kto", own + mismatched, [(i, n + i) for i in range(n)], [desirable[r] for r in rows],
                    pages=[feedback.page_ids[r] for r in rows])


class DirectTrainer:
    """Runs a direct objective's passes over `Examples` with a `PPOTrainer`'s policy, optimizer and team."""

    def __init__(self, ppo: PPOTrainer, config: ObjectiveConfig):
        config.validate()
        if not config.direct:
            raise ValueError("DirectTrainer trains dpo, ipo, raft or kto; ppo rounds use PPOTrainer")
        self.ppo, self.config, self.policy = ppo, config, ppo.policy
        self._reference: dict[tuple[str, tuple[int, ...]], float] = {}  # the base never changes: kept across rounds
        self.seen: dict[tuple, int] = {}  # times the adapter was trained on an item (`Examples.key`), by its rounds

    def step(self, found: Examples, prompts: Sequence[str]) -> dict[str, float]:
        """Train on `found` for `--direct-epochs` passes (at most `--direct-max-steps` optimizer steps, in the
        order `schedule` gives), then measure the KL of fresh samples of `prompts`; return the round's stats.
        With `--direct-target-kl` or `--direct-max-perplexity-ratio` the `Drift` is also measured after
        `KL_CHECK_STEPS` optimizer steps and then when `next_kl_check` says, and the round stops once its KL or
        its perplexity ratio is above its bound.

        Raises FloatingPointError, before that minibatch's step, on a non-finite loss.
        """
        c = self.ppo.config
        layout = self.layout(found)
        reference = self.reference_logprobs(found, layout)  # (S,)
        generator = torch.Generator().manual_seed(c.seed + self.ppo.iteration)  # one shuffle for the whole team
        target, bounded = self.config.direct_target_kl, self.bounded
        batches = self.schedule(found, generator)
        losses: list[float] = []
        check, last = KL_CHECK_STEPS, (0, 0.0)  # the next KL measurement's step; the last (step, KL)
        for k, (level, batch) in enumerate(batches, 1):
            if k == 1 or batches[k - 2][0] != level:  # a pass begins: its statistics start afresh
                last_pass: dict[str, list[float]] = defaultdict(list)
            loss, stats = self.loss(found, layout, reference, batch)
            self.ppo.optimize(loss)
            losses.append(float(loss.detach()))
            for name, value in stats.items():
                last_pass[name].append(float(value))
            if k == len(batches) or (bounded and k == check):
                drift = self.drift(prompts)  # fresh samples: at the end, or often enough to stop early
                if self.beyond_bounds(drift):
                    break
                check, last = next_kl_check(k, drift.kl, *last, target), (k, drift.kl)
        for _, batch in batches[:len(losses)]:  # the minibatches trained on, not those after a KL stop
            for key in map(found.key, batch):
                self.seen[key] = self.seen.get(key, 0) + 1
        self.ppo.iteration += 1
        return self.stats(found, losses, last_pass, drift, passes=level - batches[0][0] + 1)

    @property
    def bounded(self) -> bool:
        """Whether a round measures its `Drift` while it trains, to stop at a bound."""
        return self.config.direct_target_kl is not None or self.config.direct_max_perplexity_ratio is not None

    def beyond_bounds(self, drift: Drift) -> bool:
        """Return whether `drift` is past `--direct-target-kl` or `--direct-max-perplexity-ratio`."""
        target, ratio = self.config.direct_target_kl, self.config.direct_max_perplexity_ratio
        return (target is not None and drift.kl > target) or (ratio is not None and drift.perplexity_ratio > ratio)

    def schedule(self, found: Examples, generator: torch.Generator) -> list[tuple[int, list[int]]]:
        """Return the round's minibatches of item indices, each with its pass level, least trained first.

        An item already trained on `seen` times by this adapter (earlier rounds, when continuing) first
        takes part at level `seen`; level by level, the items taking part are shuffled and cut into the
        fewest minibatches of at most `--direct-batch-size` (near-equal sizes), until `planned_steps`. From
        a fresh adapter (every item unseen) these are `--direct-epochs` shuffled passes over all items;
        continuing one, a round trains the newest pages first and no item twice before every other has been
        trained on as often.
        With `found.pages` the shuffle keeps each page's items together (pages in random order, each
        page's items in random order): they share sequences and their prompt, which a forward computes once.
        """
        size, steps = self.config.direct_batch_size, self.planned_steps(len(found))
        first = [self.seen.get(found.key(i), 0) for i in range(len(found))]
        batches: list[tuple[int, list[int]]] = []
        level = min(first)
        while len(batches) < steps:
            order = [i for i in torch.randperm(len(found), generator=generator).tolist() if first[i] <= level]
            if found.pages is not None:
                pages = sorted(set(found.pages))
                rank = dict(zip(pages, torch.randperm(len(pages), generator=generator).tolist()))
                order.sort(key=lambda i: rank[found.pages[i]])  # stable: a page's items keep their shuffle
            cuts = math.ceil(len(order) / size)  # minibatches of near-equal sizes, none a small remainder
            bounds = [round(j * len(order) / cuts) for j in range(cuts + 1)]
            batches += [(level, order[a:b]) for a, b in zip(bounds, bounds[1:])]
            level += 1
        return batches[:steps]

    def forget(self) -> None:
        """Forget how often each item was trained on: the adapter was replaced (a version loaded, or the base)."""
        self.seen.clear()

    def refits(self, n: int) -> bool:
        """Return whether a round on `n` examples trains a fresh adapter from the base (`--direct-from-base`):
        always without `--direct-max-steps`; with it, while min(`--direct-epochs`, `MIN_REFIT_PASSES`) passes
        over the `n` examples fit the budget (a refit the budget cuts to under that learns next to nothing)."""
        if not self.config.direct_from_base:
            return False
        passes = min(self.config.direct_epochs, MIN_REFIT_PASSES) * math.ceil(n / self.config.direct_batch_size)
        return self.config.direct_max_steps is None or passes <= self.config.direct_max_steps

    def planned_steps(self, n: int) -> int:
        """Return the optimizer steps a round on `n` examples takes unless stopped on KL: `--direct-epochs`
        passes of ceil(n / `--direct-batch-size`) minibatches, at most `--direct-max-steps`."""
        steps = self.config.direct_epochs * math.ceil(n / self.config.direct_batch_size)
        return steps if self.config.direct_max_steps is None else min(steps, self.config.direct_max_steps)

    def reference_logprobs(self, found: Examples, layout: Rollout) -> torch.Tensor:
        """Return the (S,) reference log-probabilities of every sequence of `found`, computing only those no
        earlier round of this trainer has (the reference, the base model at the sampling temperature, never
        changes while the worker runs)."""
        keys = [found.sequence_key(j) for j in range(len(found.sequences))]
        missing = [i for i, key in enumerate(keys) if key not in self._reference]
        if missing:
            for i, value in zip(missing, self.sequence_logprobs(layout, missing, reference=True).tolist()):
                self._reference[keys[i]] = value
        return torch.tensor([self._reference[key] for key in keys], device=layout.query_response.device)

    def layout(self, found: Examples) -> Rollout:
        """Return every sequence of `found` laid out as the sampler lays out its own, on the policy's device."""
        prompts, responses = zip(*found.sequences)
        return rollout_of(self.policy.tokenizer, list(prompts), list(responses),
                          temperature=self.ppo.config.sampling.temperature,
                          device=next(self.policy.parameters()).device, positions=max_positions(self.policy.peft_model))

    def sequence_logprobs(self, layout: Rollout, rows: Sequence[int], *, reference: bool = False,
                          average: bool = False) -> torch.Tensor:
        """Return the (len(rows),) sequence log-probabilities of `rows` of the layout: the policy's (one forward
        over the distinct rows; a row listed twice is computed once and its gradient accumulates), or the
        reference's (adapter off, no grad, `direct_batch_size` rows a forward)."""
        T, device = self.ppo.config.sampling.temperature, layout.query_response.device
        index = torch.as_tensor(list(rows), dtype=torch.long, device=device)
        if not reference:
            distinct, back = torch.unique(index, return_inverse=True)
            out = self.policy(layout.query_response[distinct], layout.attention_mask[distinct],
                              layout.context_length, T)
            return sequence_logprobs(out.logprobs, layout.response_mask[distinct], average=average)[back]
        pieces = []
        for chunk in index.split(self.config.direct_batch_size):
            ref = self.policy.reference(layout.query_response[chunk], layout.attention_mask[chunk],
                                        layout.context_length, T)
            pieces.append(sequence_logprobs(ref.logprobs, layout.response_mask[chunk], average=average))
        return torch.cat(pieces)

    def loss(self, found: Examples, layout: Rollout, reference: torch.Tensor,
             batch: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the objective's loss on the items `batch` (one policy forward) and its statistics by name."""
        beta, items = self.config.beta, [found.items[i] for i in batch]
        if found.objective in ("dpo", "ipo"):
            chosen, rejected = [list(column) for column in zip(*items)]
            logps = self.sequence_logprobs(layout, chosen + rejected)
            chosen_logps, rejected_logps = logps[:len(chosen)], logps[len(chosen):]
            lengths = layout.response_mask[chosen + rejected].sum(1)  # (2N,) response tokens
            if found.objective == "dpo":
                loss, stats = dpo_loss(chosen_logps, rejected_logps, reference[chosen], reference[rejected], beta)
            else:
                loss, stats = ipo_loss(chosen_logps, rejected_logps, reference[chosen], reference[rejected],
                                       lengths[:len(chosen)], lengths[len(chosen):], beta)
            if self.config.rpo_alpha > 0:  # RPO: the chosen ones' likelihood held up too
                nll = chosen_nll(chosen_logps, lengths[:len(chosen)])
                loss, stats["loss/nll"] = loss + self.config.rpo_alpha * nll, nll.detach()
            return loss, stats
        rows = [item[0] for item in items]
        if found.objective == "raft":
            index = torch.as_tensor(rows, device=layout.query_response.device)
            out = self.policy(layout.query_response[index], layout.attention_mask[index], layout.context_length,
                              self.ppo.config.sampling.temperature)
            loss = raft_loss(out.logprobs, layout.response_mask[index])
            logps = sequence_logprobs(out.logprobs.detach(), layout.response_mask[index])
            return loss, {"rewards/chosen": beta * (logps - reference[rows]).mean()}
        return self.kto_loss(found, layout, reference, batch, rows)

    def kto_loss(self, found: Examples, layout: Rollout, reference: torch.Tensor, batch: list[int],
                 rows: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return KTO's loss on the items `batch`: z0 from their mismatched sequences under the policy now (no grad)."""
        mismatched = [found.items[i][1] for i in batch]
        with torch.no_grad():
            z0 = kto_kl_estimate(self.sequence_logprobs(layout, mismatched), reference[mismatched])
        desirable = torch.tensor([found.desirable[i] for i in batch], device=reference.device)
        n_d = sum(found.desirable)
        lambda_d, lambda_u = kto_weights(n_d, len(found.desirable) - n_d)
        return kto_loss(self.sequence_logprobs(layout, rows), reference[rows], desirable, z0, self.config.beta,
                        lambda_d, lambda_u)

    @torch.no_grad()
    def drift(self, prompts: Sequence[str]) -> Drift:
        """Return the `Drift` of fresh samples (one per prompt of `prompts`), averaged over the team.

        The KL of a response is ``Σ_t (logπ_θ − logπ_ref)`` over its tokens (PPO's k1, as `objective/kl`); the
        perplexity ratio is exp of `excess_surprisal` at temperature 1 averaged over all the samples' response
        positions: computed from both models' whole next-token distributions, so the samples only pick the
        contexts (a few samples' own perplexity swings with the rare tokens they happen to draw).
        """
        T = self.ppo.config.sampling.temperature
        rollout = self.ppo.rollout(prompts)
        qr, attn, P, mask = rollout.query_response, rollout.attention_mask, rollout.context_length, rollout.response_mask
        logits = self.policy.response_logits(qr, attn, P)  # one forward of each model gives all three measures
        base_logits = self.policy.response_logits(qr, attn, P, reference=True)
        responses = qr[:, P:]
        logprobs = rollout.logprobs if self.policy.samples_exactly else token_logprobs(logits / T, responses)
        ref = token_logprobs(base_logits / T, responses)
        kl = self.ppo.team.mean(((logprobs - ref) * mask).sum(1).mean())
        excess = excess_surprisal(logits, base_logits)
        per_token = self.ppo.team.mean((excess * mask).sum()) / max(self.ppo.team.mean(mask.sum()), 1e-9)
        return Drift(kl, self.ppo.team.mean(mask.sum(1).mean()), math.exp(per_token))

    def stats(self, found: Examples, losses: list[float], last_pass: dict[str, list[float]], drift: Drift, *,
              passes: int) -> dict[str, float]:
        """Return the round's statistics under TRL's names, averaged over the team.

        `loss/<objective>`: the mean over all minibatches; `rewards/*` (and RPO's `loss/nll`): means over
        the last pass's; `objective/scores`: the last pass's mean implied reward margin `rewards/margins`
        (dpo, kto; else kto's `rewards/chosen` or `rewards/rejected`, whichever it has), raft's mean implied
        reward of its kept samples `rewards/chosen`; `objective/kl`, `val/mean_length` and
        `objective/perplexity_ratio`: the `Drift` of fresh samples after the last step; `direct/passes`: the
        passes begun (fewer than `--direct-epochs` when stopped on a bound or at the step budget),
        `direct/steps`: the optimizer steps taken.
        """
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        stats = {f"loss/{found.objective}": mean(losses), **{name: mean(v) for name, v in last_pass.items()}}
        rewards = ("rewards/margins", "rewards/chosen", "rewards/rejected")
        stats["objective/scores"] = next(stats[name] for name in rewards if name in stats)
        stats["objective/kl"], stats["val/mean_length"] = drift.kl, drift.length
        stats["objective/perplexity_ratio"] = drift.perplexity_ratio
        stats.update({"direct/examples": float(len(found)), "direct/passes": float(passes),
                      "direct/steps": float(len(losses)),
                      "lr": self.ppo.optimizer.param_groups[0]["lr"], "iteration": self.ppo.iteration})
        return self.ppo.team.mean_stats(stats)
