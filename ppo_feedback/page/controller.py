"""The page's controller: what the page and its API do, as plain Python, independent of the layout.

`FeedbackApp` knows who acts (the logged-in user, or the local one), checks limits, calls the store
and the serving model, and returns the JSON records the API returns. It alone owns its caches (the
/status record, the metric points).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from db.export import FORMATS, export_jsonl
from db.records import BASE_VERSION, Flag, NewGeneration, Submission
from ..agreement import agreement
from ..auth import UserDirectory
from ..winrate import serving_win_rate
from ..config import SamplingConfig
from ..export import export_zip
from .cards import ShownPage, confirmation, derived_order, history_label, judgement_of, progress_line, \
    shown_from_records, version_label
from .inputs import Forbidden, as_int, json_int, parse_prompt_upload

LOCAL_USER = "local"
"""The rater (and admin) every action is attributed to when the page runs without a users file."""
SWAP_ERROR_FOR_RATERS = "The page could not switch to the newest version; an admin can see why in /status."
"""What a rater's /status says instead of the swap error (which names server paths; admins see it)."""
REWARD_METRIC = "objective/scores"
KL_METRIC = "objective/kl"


DIRECT_OBJECTIVES = ("dpo", "ipo", "raft", "kto")


def training_summary(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Return how a version was trained, from its metrics: {"objective", "reward_model"} (None when the
    metrics say neither).

    `objective`: "dpo", "ipo", "raft" or "kto" when a direct round trained it (its `loss/<objective>`), else
    "ppo"; `reward_model`: the fit's page-ordering judgement {"agreement", "low", "high", "pages",
    "trusted"} (agreement, low, high None when too few pages to judge), or None in a direct round
    that fitted none.
    """
    objective = next((o for o in DIRECT_OBJECTIVES if f"loss/{o}" in metrics), "ppo")
    judged = None
    if "reward_model/trusted" in metrics:
        judged = {"agreement": metrics.get("reward_model/page_agreement"),
                  "low": metrics.get("reward_model/page_agreement_low"),
                  "high": metrics.get("reward_model/page_agreement_high"),
                  "pages": int(metrics.get("reward_model/judged_pages", 0)),
                  "trusted": bool(metrics["reward_model/trusted"])}
    if judged is None and objective == "ppo" and "objective/scores" not in metrics:
        return None
    return {"objective": objective, "reward_model": judged}


def page_records(generations) -> list[dict[str, Any]]:
    """Return the API records of recorded generations: {"generation_id", "prompt_id", "page_id", "text", "version"}."""
    return [{"generation_id": g.id, "prompt_id": g.prompt_id, "page_id": g.page_id, "text": g.text,
             "version": g.adapter_version} for g in generations]


def submission_record(submission: Submission) -> dict[str, Any]:
    """Return the API record of a submission: {"submission_id", "page_id", "prompt_id", "status", "scores"
    ({generation id: score}), "best", "tie", "none_good", "flags" ([{"generation_id", "kind", "reason"}]),
    "comment", "guideline_version", "created_at"}."""
    return {"submission_id": submission.id, "page_id": submission.page_id, "prompt_id": submission.prompt_id,
            "status": submission.status, "scores": {str(g): score for g, score in submission.scores},
            "best": list(submission.best), "tie": submission.tie, "none_good": submission.none_good,
            "flags": [{"generation_id": f.generation_id, "kind": f.kind, "reason": f.reason} for f in submission.flags],
            "comment": submission.comment or "", "guideline_version": submission.guideline_version,
            "created_at": submission.created_at.isoformat()}


def submitted_message(submission: Submission) -> str:
    """Return the short confirmation of what a submission stored."""
    parts = [f"{len(submission.scores)} rating{'s' if len(submission.scores) != 1 else ''}"]
    if submission.tie:
        parts.append(f"a tie of {len(submission.best)}")
    elif submission.best:
        parts.append("a best pick")
    if submission.none_good:
        parts.append("none is good")
    if submission.flags:
        parts.append(f"{len(submission.flags)} flag{'s' if len(submission.flags) != 1 else ''}")
    return "Saved " + ", ".join(parts) + "."


@dataclass
class _MetricCache:
    """Reward score and KL points seen so far; metrics are append-only, so only new ids are read."""

    last_id: int = 0
    steps: dict[tuple[int, int], int] = field(default_factory=dict)  # (version, iteration) -> step
    rows: list[dict[str, Any]] = field(default_factory=list)


class FeedbackApp:
    """What the page does, independent of the layout: identities, limits, store and model calls."""

    def __init__(self, serving, store, sampling: SamplingConfig, *, users: UserDirectory | None = None,
                 adapters_dir: str | os.PathLike[str] | None = None,
                 worker_note: str | Callable[[], str] | None = None,
                 model_cache_dir: str | None = None, title: str = "ppo-feedback", overlap: float = 0.0,
                 rng: random.Random | None = None, shuffle_seed: int | None = None, mix_versions: bool = False,
                 queue_size: int = 64, generations_per_user: int = 2):
        self.serving = serving
        self.queue_size = queue_size
        self.generations_per_user = generations_per_user
        self.overlap = overlap
        self.mix_versions = mix_versions
        self._page_versions: dict[int, dict[int, int]] = {}  # judged pages' candidates' versions (win rate)
        self.rng = rng or random.Random()
        self.shuffle_seed = random.SystemRandom().getrandbits(64) if shuffle_seed is None else shuffle_seed
        self._shuffle = random.Random(self.shuffle_seed)
        self._orders: OrderedDict[int, list[int]] = OrderedDict()  # page id -> card order, newest last
        self._orders_lock = threading.Lock()
        self.store = store
        self.sampling = sampling
        self.users = users
        self.adapters_dir = Path(adapters_dir) if adapters_dir is not None else Path(serving.adapters.root)
        self.worker_note = worker_note
        self.model_cache_dir = model_cache_dir
        self.title = title
        self._export_dir = Path(tempfile.mkdtemp(prefix="ppo-feedback-exports-"))
        self._export_lock = threading.Lock()
        self._metrics = _MetricCache()
        self._metrics_lock = threading.Lock()
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        self._status_lock = threading.Lock()

    def close(self) -> None:
        """Remove the temporary export files; returns nothing."""
        shutil.rmtree(self._export_dir, ignore_errors=True)

    # ------------------------------------------------------------------------- identities

    @property
    def auth_enabled(self) -> bool:
        return self.users is not None

    def rater(self, request: gr.Request | None, requested: str | None = "") -> str:
        """Return who acts: the logged-in user under auth (ignoring `requested`), else `requested` or the local user."""
        if self.users is not None:
            name = getattr(request, "username", None)
            if not name:
                raise Forbidden("Log in first.")
            if not self.users.exists(name):
                raise Forbidden(f"The user {name!r} is no longer in the users file: log in again as a listed user.")
            return name
        requested = (requested or "").strip() if isinstance(requested, str) else ""
        return requested or LOCAL_USER

    def is_admin(self, request: gr.Request | None) -> bool:
        """Return whether the request may operate (every request when auth is off)."""
        if self.users is None:
            return True
        return self.users.is_admin(getattr(request, "username", None))

    def admits_prompts(self, rater: str) -> bool:
        """Return whether prompts `rater` types enter the pool at once (an admin's, or anyone's without
        logins); others' wait for an admin's review."""
        return self.users is None or self.users.is_admin(rater)

    def require_admin(self, request: gr.Request | None, action: str) -> None:
        """Raise Forbidden unless the request comes from an admin."""
        if not self.is_admin(request):
            raise Forbidden(f"Only admins can {action}.")

    # ---------------------------------------------------------------------------- rating

    def check_prompt(self, prompt: Any) -> str:
        """Return the prompt if it is non-blank text within the length limit; raise ValueError with the reason."""
        if not isinstance(prompt, str):
            raise ValueError("The prompt must be text.")
        if not prompt.strip():
            raise ValueError("The prompt is empty.")
        if len(prompt) > self.sampling.max_prompt_chars:
            raise ValueError(f"The prompt has {len(prompt)} characters; the limit is "
                             f"{self.sampling.max_prompt_chars}.")
        return prompt

    def check_n(self, n: Any) -> int:
        """Return the number of candidates asked for if it is within 1..max_candidates; raise ValueError otherwise."""
        n = as_int(n, "number of candidates")
        if not 1 <= n <= self.sampling.max_candidates:
            raise ValueError(f"Ask for 1 to {self.sampling.max_candidates} candidates, not {n}.")
        return n

    def next_prompt(self, rater: str) -> dict[str, Any]:
        """Return {"prompt_id", "text"} of the least-rated pool prompt this rater has not rated (both None when none is left)."""
        prompt = self.store.next_prompt(rater)
        if prompt is None:
            return {"prompt_id": None, "text": None}
        return {"prompt_id": prompt.id, "text": prompt.text}

    def generate(self, prompt: str, n: int, rater: str, seed: int | None = None) -> list[dict[str, Any]]:
        """Sample and record n candidates with the serving version as one page (mixed with its parent's
        with --mix-versions, see `mixed_page`); return their API records."""
        prompt = self.check_prompt(prompt)
        n = self.check_n(n)
        old = self.mixed_with()
        if old is not None and n >= 2:
            return self.mixed_page(prompt, n, rater, seed, old)
        return page_records(self.serving.generate(prompt, n, rater=rater, seed=seed,
                                                  admit_prompt=self.admits_prompts(rater)))

    def generate_stream(self, prompt: str, n: int, rater: str, seed: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """Sample n candidates with the serving version in one batch, yielding [{"text", "version"}] (each
        candidate's text so far) after every decode step, then, recorded as one page, their API records.
        With --mix-versions (and two or more candidates) it yields only the mixed page's records (see
        `mixed_page`): streaming one version's batch before the other's would tell the cards apart."""
        prompt = self.check_prompt(prompt)
        n = self.check_n(n)
        old = self.mixed_with()
        if old is not None and n >= 2:
            yield self.mixed_page(prompt, n, rater, seed, old)
            return
        for progress in self.serving.generate_stream(prompt, n, rater=rater, seed=seed,
                                                     admit_prompt=self.admits_prompts(rater)):
            if progress.generations is not None:
                yield page_records(progress.generations)
            else:
                yield [{"text": text, "version": progress.version} for text in progress.texts]

    def mixed_with(self) -> int | None:
        """With --mix-versions, return the version a page mixes with the serving one (the serving
        version's parent: the base model for v1); None when pages are not mixed (or the base model serves)."""
        serving = self.serving.version
        if not self.mix_versions or serving == BASE_VERSION:
            return None
        return self.store.get_version(serving).parent

    def mixed_page(self, prompt: str, n: int, rater: str, seed: int | None, old: int) -> list[dict[str, Any]]:
        """Sample n - n//2 candidates with the serving version and n//2 with `old` (a second decode
        batch), record them as one page and return its API records."""
        page = self.serving.generate(prompt, n - n // 2, rater=rater, seed=seed, admit_prompt=self.admits_prompts(rater))
        params = {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                  "max_new_tokens": self.sampling.max_new_tokens, "seed": seed}
        older = self.serving.generate_with_version(prompt, old, seed, n=n // 2)
        recorded = self.store.record_generations(
            page[0].prompt_id, old, [NewGeneration(c.text, c.token_ids, c.logprobs, params) for c in older],
            rater=rater, page_id=page[0].page_id)
        return page_records([*page, *recorded])

    def win_rate_line(self) -> str:
        """Return Progress's line on the serving version's win rate over the one it replaced, from the
        picks on mixed pages ("" without --mix-versions)."""
        if not self.mix_versions:
            return ""
        found = serving_win_rate(self.store, self.serving.version, self._page_versions)
        if found is None:
            return "The base model serves: no earlier version to mix with."
        names = f"{version_label(found.new)} over {version_label(found.old)}"
        if found.rate is None:
            return f"Win rate of {names}: no pick between them yet."
        return (f"Win rate of {names}: {found.rate:.2f} (95% interval {found.low:.2f}–{found.high:.2f}) "
                f"on {found.picks} pick{'s' if found.picks != 1 else ''} on mixed pages.")

    def rate(self, generation_id: Any, score: Any, comment: str | None, rater: str) -> dict[str, Any]:
        """Store one rating (1..5, optional comment); return {"ok": True}."""
        self.store.rate(generation_id, rater, score, comment or None)
        return {"ok": True}

    def prefer(self, chosen_id: Any, rejected_ids: Any, rater: str) -> dict[str, Any]:
        """Store "chosen is better than each rejected one"; return {"ok": True}."""
        if not isinstance(rejected_ids, (list, tuple)):
            raise ValueError("rejected_ids must be a list of generation ids.")
        self.store.pick_best(chosen_id, list(rejected_ids), rater)
        return {"ok": True}

    def submit(self, shown: ShownPage, scores: list[Any], best_letters: list[str] | None, none_good: bool,
               flags: list[tuple[Any, Any]], comment: str | None, rater: str) -> tuple[Submission, str]:
        """Store the rater's judgement of the page on the cards as one submission (all or nothing, undoable
        as one, stored once however often it is sent: the page's key); return it and the confirmation.

        Card i shows `shown.ids[i]`: `scores[i]` rates it (None: not rated), `flags[i]` is (kind, reason)
        (kind None: not flagged); `best_letters` name the best card, or two or more for a tie."""
        judged = judgement_of(shown, scores, best_letters, none_good, flags, comment)
        submission = self.store.submit_page(
            shown.page_id, rater, judged.scores, judged.best, tie=len(judged.best) >= 2, none_good=judged.none_good,
            flags=[Flag(*f) for f in judged.flags], comment=judged.comment, client_key=shown.key)
        return submission, confirmation(submission, shown)

    # -------------------------------------------------------------------------- the cards

    def card_order(self, n: int) -> list[int]:
        """Return a fresh shuffled card order for a new page of n candidates (the app's seeded generator)."""
        with self._orders_lock:
            return self._shuffle.sample(range(n), n)

    def remember_order(self, page_id: int, order: list[int]) -> None:
        """Keep the card order a page was shown in, so that reopening it shows it the same; returns nothing."""
        with self._orders_lock:
            self._orders[page_id] = list(order)
            while len(self._orders) > 10_000:
                self._orders.popitem(last=False)

    def order_of(self, page_id: int, n: int) -> list[int]:
        """Return the card order of a page: the one it was shown in here, else one derived from its id."""
        with self._orders_lock:
            kept = self._orders.get(page_id)
        return kept if kept is not None and len(kept) == n else derived_order(self.shuffle_seed, page_id, n)

    def open_page(self, page_id: int, revealed: bool) -> tuple[ShownPage, list[str], str]:
        """Return a recorded page as the cards show it: (ShownPage, the texts in card order, the prompt)."""
        records = page_records(self.store.page_generations(page_id))
        shown = shown_from_records(records, self.order_of(page_id, len(records)), revealed)
        texts = {r["generation_id"]: r["text"] for r in records}
        return shown, [texts[g] for g in shown.ids], self.store.get_prompt(shown.prompt_id).text

    def submission(self, submission_id: Any, rater: str) -> Submission:
        """Return one of the rater's recent submissions (of `my_submissions`' 100); raise ValueError if it is not."""
        wanted = as_int(submission_id, "submission")
        found = [s for s in self.store.my_submissions(rater, 100) if s.id == wanted]
        if not found:
            raise ValueError(f"Submission {wanted} is not among your recent ones.")
        return found[0]

    def history(self, rater: str, limit: int = 10) -> list[tuple[str, int]]:
        """Return the rater's recent submissions as dropdown choices (label, submission id), newest first."""
        return [(history_label(s, self.store.get_prompt(s.prompt_id).text), s.id)
                for s in self.store.my_submissions(rater, limit)]

    def rater_progress(self, rater: str) -> str:
        """Return the rater's progress line: ratings today (UTC) and in total, and when the next round comes."""
        start_of_day = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        return progress_line(self.store.rater_counts(rater, start_of_day), self.status(max_age_s=0)["worker"]["state"])

    def next_offer(self, rater: str) -> dict[str, Any]:
        """Return what the Rate tab offers next: {"text", "prompt_id", "page_id"}: with probability --overlap a page
        another rater judged (its candidates shown as they are, for agreement), else the next pool prompt
        (page_id None; text None when the rater has judged every prompt)."""
        page = self.overlap_page(rater)
        if page["page_id"] is not None:
            return {"text": page["text"], "prompt_id": page["prompt_id"], "page_id": page["page_id"]}
        return {**self.next_prompt(rater), "page_id": None}

    # ------------------------------------------------------------------------ submissions

    def submit_page(self, page_id: Any, scores: Any, best: Any, tie: Any, none_good: Any, flags: Any,
                    comment: str | None, key: str | None, rater: str) -> dict[str, Any]:
        """Store one page's judgement as one unit (`FeedbackStore.submit_page`); return {"ok", "submission",
        "message"}. JSON keys of `scores` are generation ids as text; `flags`: [{"generation_id", "kind",
        "reason"}]. Bad input raises ValueError and stores nothing."""
        if not isinstance(scores, dict):
            raise ValueError("scores must be an object {generation id: score 1..5}.")
        if not isinstance(best, (list, tuple)):
            raise ValueError("best must be a list of generation ids.")
        if not isinstance(tie, bool) or not isinstance(none_good, bool):
            raise ValueError("tie and none_good must be true or false.")
        if not isinstance(flags, (list, tuple)) or not all(isinstance(f, dict) for f in flags):
            raise ValueError('flags must be a list of {"generation_id", "kind", "reason"}.')
        for flag in flags:
            if set(flag) - {"generation_id", "kind", "reason"} or not isinstance(flag.get("kind"), str):
                raise ValueError('A flag is {"generation_id": int, "kind": text, "reason": text}.')
        submission = self.store.submit_page(
            json_int(page_id, "page id"), rater,
            {as_int(k, "generation id"): json_int(v, "score") for k, v in scores.items()},
            [json_int(g, "generation id") for g in best], tie=tie, none_good=none_good,
            flags=[Flag(json_int(f.get("generation_id"), "generation id"), f["kind"], f.get("reason") or None)
                   for f in flags],
            comment=comment or None, client_key=key or None)
        return {"ok": True, "submission": submission_record(submission), "message": submitted_message(submission)}

    def undo(self, rater: str) -> dict[str, Any]:
        """Undo the rater's newest submission in force; return {"ok", "undone": its record}."""
        return {"ok": True, "undone": submission_record(self.undo_submission(rater))}

    def undo_submission(self, rater: str) -> Submission:
        """Undo the rater's newest submission in force (`FeedbackStore.undo_last_submission`); return it."""
        submission = self.store.undo_last_submission(rater)
        self.forget_status()
        return submission

    def skip(self, prompt_id: Any, rater: str) -> dict[str, Any]:
        """Record that the rater skipped a prompt (never offered to them again); return {"ok", "new"}."""
        return {"ok": True, "new": self.store.skip_prompt(json_int(prompt_id, "prompt id"), rater)}

    def my_submissions(self, limit: Any, rater: str) -> list[dict[str, Any]]:
        """Return the rater's newest submissions (undone ones too, marked), newest first, at most `limit` (1..100)."""
        limit = json_int(limit, "limit")
        if not 1 <= limit <= 100:
            raise ValueError(f"Ask for 1 to 100 submissions, not {limit}.")
        return [submission_record(s) for s in self.store.my_submissions(rater, limit)]

    def guidelines(self) -> dict[str, Any]:
        """Return the rating guidelines in force: {"version", "text", "author", "created_at"} (version 0, text
        "" when none were written)."""
        found = self.store.guidelines()
        if found is None:
            return {"version": 0, "text": "", "author": None, "created_at": None}
        return {"version": found.version, "text": found.text, "author": found.author,
                "created_at": found.created_at.isoformat()}

    def write_guidelines(self, text: Any, author: str) -> dict[str, Any]:
        """Store a new version of the guidelines (plain text); return it as `guidelines` does."""
        if not isinstance(text, str):
            raise ValueError("The guidelines must be text.")
        self.store.write_guidelines(text, author)
        return self.guidelines()

    def overlap_page(self, rater: str) -> dict[str, Any]:
        """With probability --overlap, return a page another rater judged that this rater has not, recorded as
        shown to them (so they may judge it): {"page_id", "prompt_id", "text", "candidates": /generate
        records}; else (or when there is none) all null and an empty list."""
        offer = self.overlap > 0 and self.rng.random() < self.overlap
        page = self.store.offer_overlap_page(rater) if offer else None
        if page is None:
            return {"page_id": None, "prompt_id": None, "text": None, "candidates": []}
        return {"page_id": page.id, "prompt_id": page.prompt_id, "text": self.store.get_prompt(page.prompt_id).text,
                "candidates": page_records(self.store.page_generations(page.id))}

    def agreement(self, rater: str = "") -> dict[str, Any]:
        """Return inter-rater agreement (`ppo_feedback.agreement`): {"overall", "pairs"}; with `rater`, only
        the pairs that include them."""
        result = agreement(self.store)
        if rater:
            result["pairs"] = [p for p in result["pairs"] if rater in p["raters"]]
        return result

    # ---------------------------------------------------------------------------- status

    def worker_state(self, status) -> str:
        """Return the worker line of the status panel."""
        if status.present:
            return status.state
        note = self.worker_note() if callable(self.worker_note) else self.worker_note  # the app's supervisor's state
        return f"paused: {note}" if note else "paused: no worker holds the training lease"

    def forget_status(self) -> None:
        """Drop the cached /status record, so the next `status()` reads the store; returns nothing."""
        with self._status_lock:
            self._status_cache = None

    def status(self, max_age_s: float = 1.0) -> dict[str, Any]:
        """Return the /status record (cached for `max_age_s` so that many open pages cost one query set, and
        built anew once another version is served: its `serving_version` is never older than a swap before
        the call; the rest, `swap_error` of a refused swap among it, may be up to `max_age_s` old)."""
        with self._status_lock:
            now = time.monotonic()
            if (self._status_cache is not None and now - self._status_cache[0] < max_age_s
                    and self._status_cache[1]["serving_version"] == self.serving.version):
                return self._status_cache[1]
            serving_version = self.serving.version  # read once: a swap may land while the record is built
            counts = self.store.counts(since_version=serving_version)
            worker = self.store.worker_status()
            versions = self.store.list_versions()
            summary = self.store.version_rating_summary()
            latest = versions[-1] if versions else None
            record = {
                "serving_version": serving_version,
                "latest_version": latest.version if latest else BASE_VERSION,
                "latest_status": latest.status if latest else None,
                "latest_training": training_summary(latest.metrics) if latest else None,
                "worker": {"state": self.worker_state(worker), "present": worker.present, "holder": worker.holder},
                "counts": {key: counts[key] for key in ("prompts", "generations", "ratings", "preferences", "raters",
                                                        "ratings_since_serving", "preferences_since_serving")},
                "versions": [{"version": s.version, "mean_rating": round(s.mean_rating, 4), "n_ratings": s.n_ratings}
                             for s in summary],
                "swap_error": self.serving.last_swap_error,
                "adapter_versions": [{"version": v.version, "status": v.status, "parent": v.parent}
                                     for v in versions],
            }
            self._status_cache = (now, record)
            return record

    def status_for(self, request: gr.Request | None, max_age_s: float = 1.0) -> dict[str, Any]:
        """Return the /status record as the request's user may see it: all of it for an admin; for a
        rater, without the worker's holder (host:pid) and with a swap error (server paths) replaced by a
        generic line."""
        record = self.status(max_age_s)
        if self.is_admin(request):
            return record
        return {**record, "worker": {**record["worker"], "holder": None},
                "swap_error": SWAP_ERROR_FOR_RATERS if record["swap_error"] else None}

    def metric_rows(self) -> list[dict[str, Any]]:
        """Return every reward-score and KL point as {"step", "version", "iteration", "metric", "value"}, in order.

        `step` counts training steps (a PPO iteration, or a direct round) across all versions (1, 2, ...), in the
        order they were recorded.
        """
        with self._metrics_lock:
            cache = self._metrics
            for point in self.store.metrics(since_id=cache.last_id):
                cache.last_id = point.id
                if point.name not in (REWARD_METRIC, KL_METRIC):
                    continue
                key = (point.version, point.iteration)
                step = cache.steps.setdefault(key, len(cache.steps) + 1)
                cache.rows.append({"step": step, "version": point.version, "iteration": point.iteration,
                                   "metric": point.name, "value": point.value})
            return list(cache.rows)

    def plots(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Return the data of the three plots: mean human rating per version, training score and KL per step."""
        versions = self.status()["versions"]
        # Categories sort as text in the plot (a `sort` list goes stale in the browser when versions are added):
        # "base model" < "v01" < ... < "v10" once there are ten versions.
        width = len(str(max((v["version"] for v in versions), default=0)))
        ratings = pd.DataFrame(
            [{"version": "base model" if v["version"] == BASE_VERSION else f"v{v['version']:0{width}d}",
              "mean rating": v["mean_rating"], "ratings": v["n_ratings"]} for v in versions],
            columns=["version", "mean rating", "ratings"])
        rows = pd.DataFrame(self.metric_rows(), columns=["step", "version", "iteration", "metric", "value"])
        score = rows[rows.metric == REWARD_METRIC].rename(columns={"value": "score", "step": "training step"})
        kl = rows[rows.metric == KL_METRIC].rename(columns={"value": "KL", "step": "training step"})
        return ratings, score.drop(columns="metric"), kl.drop(columns="metric")

    # --------------------------------------------------------------------------- compare

    def compare(self, prompt: str, version: int | None, seed: int) -> dict[str, Any]:
        """Sample one completion from the base model, the serving version and `version` with the same seed."""
        prompt = self.check_prompt(prompt)
        seed = as_int(seed, "seed")
        serving = self.serving.version

        def one(v: int) -> str:
            return self.serving.generate_with_version(prompt, v, seed)[0].text

        result = {"seed": seed, "base": one(BASE_VERSION), "serving": {"version": serving, "text": one(serving)}}
        if version is not None:
            version = as_int(version, "version")
            result["chosen"] = {"version": version, "text": one(version)}
        return result

    # --------------------------------------------------------------------------- operate

    def add_prompts(self, text: str, filename: str = "") -> str:
        """Add uploaded prompts to the pool (source "uploaded"); return what happened."""
        prompts = parse_prompt_upload(text, filename)
        before = {p.id for p in self.store.list_prompts(active_only=False)}
        ids = self.store.add_prompts(prompts, source="uploaded")
        new = len(set(ids) - before)
        return f"Added {new} new prompt{'s' if new != 1 else ''}; {len(set(ids)) - new} were already in the pool."

    def pending_prompts(self, limit: Any = 100) -> list[dict[str, Any]]:
        """Return the prompts raters typed that wait for review, oldest first (at most `limit`, 1..1000):
        [{"prompt_id", "text", "added_by", "created_at"}]."""
        limit = json_int(limit, "limit")
        if not 1 <= limit <= 1000:
            raise ValueError(f"Ask for 1 to 1000 prompts, not {limit}.")
        return [{"prompt_id": p.id, "text": p.text, "added_by": p.added_by, "created_at": p.created_at.isoformat()}
                for p in self.store.pending_prompts(limit)]

    def review_prompt(self, prompt_id: Any, admit: Any, reviewer: str) -> dict[str, Any]:
        """Admit a rater's prompt to the pool (offered to every rater, sampled for training) or reject it;
        return {"ok", "prompt_id", "admission"}."""
        if not isinstance(admit, bool):
            raise ValueError("admit must be true (admit) or false (reject).")
        prompt = self.store.review_prompt(json_int(prompt_id, "prompt id"), admit, reviewer)
        return {"ok": True, "prompt_id": prompt.id, "admission": prompt.admission}

    def rollback(self, version: Any) -> dict[str, Any]:
        """Serve an earlier version (0 = base model) from now on; return {"ok", "rolled_back", "serving_version"}."""
        version = as_int(version, "version")
        rolled_back = self.serving.rollback(version)
        self.forget_status()
        return {"ok": True, "rolled_back": rolled_back, "serving_version": self.serving.version}

    def export_adapter(self, version: Any) -> str:
        """Zip a version as a standard PEFT adapter folder (with a model card, checksums checked); return the zip's path."""
        version = as_int(version, "version")
        if version == BASE_VERSION:
            raise ValueError("Version 0 is the base model; it has no adapter to download.")
        with self._export_lock:
            return str(export_zip(version, self._export_dir, store=self.store, adapters_dir=self.adapters_dir,
                                  cache_dir=self.model_cache_dir, overwrite=True))

    def export_ratings(self, fmt: str) -> str:
        """Write the ratings export in one of db.export's formats; return the JSONL file's path."""
        if fmt not in FORMATS:
            raise ValueError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
        with self._export_lock:
            target = self._export_dir / f"feedback-{fmt}.jsonl"
            partial = target.with_suffix(".jsonl.partial")
            export_jsonl(self.store, fmt, partial)
            os.replace(partial, target)
        return str(target)
