"""The training worker: its own process, sharing only the database and the adapter directory.

A round: hold the lease → wait for `--min-new-feedback` new ratings/preferences since the serving
version → refit the reward model on all feedback (`--reward-l2`, `--prior-weight`, ...) →
`--ppo-iterations` PPO iterations on prompts from the pool → publish the next adapter version
atomically. With `--objective dpo|raft|kto` a round skips the reward model and PPO: it trains that
direct objective on all rated pages (`ppo_feedback.direct`) and waits while they give it nothing to
learn from. A NaN/inf loss or a KL beyond `--max-kl` discards the round (the weights go back to the
round's start) and records why, and so does a trained version whose text the base model finds more than
`--max-perplexity-ratio` times as perplexing as its own (`FluencyGate`); the round after that one waits for
`--min-new-feedback` more. SIGTERM abandons the current round without publishing any of it.

Usage: python -m ppo_feedback.worker --db URL --adapters-dir DIR [--model ...] (--help lists all)
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from db.records import BASE_VERSION, Cursor, FeedbackCounts, VersionRecord
from .adapters import AdapterState, AdapterStore, VersionLifecycle, apply_version, shrink_toward_base
from .config import AppConfig, LoraSettings, ModelConfig, ObjectiveConfig, PPOConfig, RewardConfig, RolloutSampling, \
    SamplingConfig, WorkerConfig, add_dataclass_arguments, add_worker_arguments, configure_logging, from_namespace
from .direct import WAITING_FOR, DirectTrainer, Examples, examples
from .feedback import RatedFeedback, Replay, read_feedback
from .fluency import FluencyGate
from .policy import PolicyWithValueHead
from .rewards import FitReport, RewardModel, fit_reward_model
from .team import Team
from .trainer import OPTIMIZER_FILE, TRAINER_STATE_FILE, PPOTrainer
from .versions import AdapterLoadError, check_files, read_metadata, version_dir

log = logging.getLogger("ppo_feedback.worker")

MAX_BACKOFF = 60.0
"""Longest wait, in seconds, between retries after an error (a database outage, ...); the first waits --wait-interval."""

class RoundAbandoned(Exception):
    """The round stopped before publishing (SIGTERM or a lost lease); nothing of it is kept."""


class Heartbeat:
    """Renews the lease acquired under fencing token `token` from a background thread while the worker
    trains; notices when it is lost (expired and taken, or acquired again under the same worker id)."""

    def __init__(self, store, holder: str, ttl: float, token: int | None = None):
        self.store, self.holder, self.ttl, self.token = store, holder, ttl, token
        self.state = "idle"
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def start(self) -> None:
        """Start renewing every ttl/3 seconds."""
        self._thread.start()

    def set_state(self, state: str) -> None:
        """Publish the worker's state for the status panel now."""
        self.state = state
        self._renew()

    def _renew(self) -> None:
        try:
            if not self.store.renew_lease(self.holder, self.ttl, state=self.state, token=self.token):
                self.lost.set()
        except Exception:  # a database hiccup: try again on the next beat; expiry is the real guard
            log.exception("lease renewal failed")

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._renew()

    def stop(self) -> None:
        """Stop renewing."""
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class RoundPlan:
    """What process 0 prepares for a round and shares with the others."""

    version: int  # the version the round will publish
    reward_model: RewardModel | None  # None in a direct round
    report: FitReport | None
    replay_pool: Replay | None
    feedback_end: Cursor  # after the feedback the round trains on
    total: FeedbackCounts  # all feedback then
    examples: Examples | None = None  # a direct round's (`--objective` other than ppo, or PPO's fallback)
    wait_reason: str | None = None  # set when the round must not train (an untrusted reward model, no fallback)


class Worker:
    """Trains one policy from the store's feedback and publishes adapter versions.

    With a `Team` of several processes, process 0 alone holds the lease, fits the reward model and
    publishes (`Team.from_main`); each process draws its own prompts and all run the PPO iterations.
    """

    def __init__(self, store, adapters: AdapterStore, policy: PolicyWithValueHead, ppo_config: PPOConfig,
                 config: WorkerConfig, base_model: str, accelerator=None, reward_config: RewardConfig | None = None,
                 objective: ObjectiveConfig | None = None):
        config.validate()
        self.reward_config = reward_config or RewardConfig()
        self.reward_config.validate()
        self.store, self.adapters, self.policy, self.config = store, adapters, policy, config
        self.base_model = base_model
        self.team = Team(accelerator)
        self.trainer = PPOTrainer(policy, ppo_config, team=self.team)
        self.objective = objective or ObjectiveConfig()
        fallback = self.objective.reward_model_fallback
        direct = self.objective if self.objective.direct else \
            None if fallback in ("wait", "ppo") else replace(self.objective, objective=fallback)
        self.direct = DirectTrainer(self.trainer, direct) if direct is not None else None  # direct rounds' trainer
        self.holder = config.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.initial = AdapterState.initial(policy)
        self.loaded_version: int | None = None
        self.unloadable: dict[int, str] = {}  # published versions that cannot be loaded -> why (skipped)
        self.note: str | None = None  # said after every state while set: the version skipped, the last error
        self._reference_features: torch.Tensor | None = None
        self._examples_at: tuple[tuple, Examples | None] | None = None  # direct_examples' cache
        self._published_examples: tuple[int, frozenset] | None = None  # (version, fingerprint) of the last direct round
        self._distrusted: tuple[Cursor, str] | None = None  # (feedback end, verdict) of an untrusted reward model
        self.gate = FluencyGate(self.trainer) if config.max_perplexity_ratio is not None else None
        self._disfluent: tuple[Cursor, str] | None = None  # (feedback end, why) of the last round the gate refused
        self.trained_from: AdapterState | None = None  # the loaded version's weights: the gate searches back to them
        self.stop_requested = threading.Event()
        self.lease_token: int | None = None  # the fencing token of this worker's newest acquisition of the lease
        self.heartbeat: Heartbeat | None = None  # process 0's, while it holds the lease
        self.rng = random.Random(ppo_config.seed + self.team.rank)  # each process draws its own prompts
        self.tensorboard = None
        if config.tensorboard and self.team.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(config.tensorboard)

    # ------------------------------------------------------------------------------ main loop

    def run(self, max_rounds: int | None = None) -> int:
        """Train until stopped (or `max_rounds` published versions); return how many versions were published.

        An error in a round (the database unreachable, a version that cannot be loaded, ...) does not end
        it: the round's weights go back, the error is logged and shown in the worker state, and it tries
        again after a back-off (--wait-interval, doubling up to MAX_BACKOFF). A data-parallel team stops
        instead: its processes cannot agree on where to resume.
        """
        published, failures = 0, 0
        try:
            while True:
                try:
                    action = self.team.from_main(lambda: self.next_action(published, max_rounds))
                    if action == "stop":
                        return published
                    if action == "round" and self.run_round() is not None:
                        published += 1
                    failures = 0
                except Exception as exc:
                    if self.team.size > 1:
                        raise
                    failures += 1
                    self.back_off(exc, failures)
        finally:
            if self.team.is_main:
                try:
                    self.drop_lease()
                except Exception:  # the database is gone: the lease expires by itself
                    log.exception("could not release the training lease")

    def back_off(self, exc: Exception, failures: int) -> float:
        """Log an error that interrupted the loop, say so in the worker state and wait; return the seconds waited."""
        delay = min(MAX_BACKOFF, self.config.wait_interval * 2 ** (failures - 1))
        log.error("error %d in a row, retrying in %.1f s: %s", failures, delay, exc, exc_info=exc)
        try:
            self.set_state(f"error ({type(exc).__name__}), retrying in {delay:.0f} s")
        except Exception:  # the store is what failed: the heartbeat thread keeps trying
            pass
        self.stop_requested.wait(delay)
        return delay

    def next_action(self, published: int, max_rounds: int | None) -> str:
        """Return what to do next: "stop", a "round" (the lease is held) or "wait" (another worker holds it)."""
        if self.stop_requested.is_set() or (max_rounds is not None and published >= max_rounds):
            return "stop"
        return "round" if self.hold_lease() else "wait"

    def hold_lease(self) -> bool:
        """Return whether this worker holds the training lease now, taking it when free (waits a little if not)."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            log.warning("lost the training lease; waiting to take it again")
            self.heartbeat.stop()
            self.heartbeat = None
        if self.heartbeat is None:
            token = self.store.acquire_lease(self.holder, self.config.lease_ttl, state="idle", token=self.lease_token)
            if token is None:
                self.stop_requested.wait(self.config.wait_interval)  # another worker trains
                return False
            self.lease_token = token
            self.heartbeat = Heartbeat(self.store, self.holder, self.config.lease_ttl, token)
            self.heartbeat.start()
        return True

    def drop_lease(self) -> None:
        """Stop the heartbeat and release the lease."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.lease_token is not None:  # never by name alone: another process may hold it under the same id
            self.store.release_lease(self.holder, token=self.lease_token)

    def set_state(self, state: str) -> None:
        """Publish the worker's state for the status panel (process 0, which holds the heartbeat), with the
        worker's note (a version it skipped) after it."""
        if self.heartbeat is not None:
            self.heartbeat.set_state(state if self.note is None else f"{state} ({self.note})")

    # ------------------------------------------------------------------------------ a round

    def run_round(self) -> int | None:
        """Run one round if there is enough new feedback; return the published version, else None."""
        serving, cursor, missing = self.team.from_main(self.plan_round)
        parent = self.load_trainable(serving)
        if missing:
            if self.team.is_main:
                self.set_state(f"waiting for {missing}")
                self.stop_requested.wait(self.config.wait_interval)
            return None
        start = self.snapshot()
        try:
            return self.train_and_publish(parent, cursor)
        except RoundAbandoned as why:
            log.warning("round abandoned, nothing published: %s", why)
            self.restore(start)
            return None
        except (FloatingPointError, DivergenceError) as why:
            self.restore(start)
            self.team.from_main(lambda: self.record_failure(parent, why))
            if isinstance(why, Disfluent):
                self._disfluent = (why.feedback_end, str(why))
            return None
        except BaseException:  # a database error, ...: keep nothing of the round; `run` retries
            self.restore(start)
            raise

    def plan_round(self) -> tuple[int, Cursor, str | None]:
        """Return the serving version, its feedback cursor, and what feedback a round still waits for (None: nothing)."""
        parent = self.store.serving_version()
        cursor = self.store.cursor_of(parent)
        total = self.store.count_feedback_since()
        missing = missing_feedback(self.config, total, self.store.count_feedback_since(cursor))
        if missing is None and self.objective.direct:
            missing = self.missing_examples(parent, self.direct_examples(cursor))
        if missing is None and self._distrusted is not None and self._distrusted[0] == self.feedback_end(cursor):
            missing = f"more feedback: the {self._distrusted[1]}"
        if missing is None and self._disfluent is not None:
            since, why = self._disfluent
            more = missing_feedback(self.config, total, self.store.count_feedback_since(since))
            missing = None if more is None else f"{more}: the last version trained was not published, {why}"
        return parent, cursor, missing

    def missing_examples(self, parent: int, found: Examples | None) -> str | None:
        """Return what a direct round on `found` waits for (None: nothing): examples at all, or, when `parent`
        is the version this worker's last direct round published from exactly these examples, new ones (the
        ratings since made no new pair, kept candidate or label: a round would only train on the same again)."""
        if found is None:
            return WAITING_FOR[self.objective.objective]
        published = self._published_examples
        if published is not None and published[0] == parent and published[1] == found.fingerprint:
            return f"new examples: v{parent} was trained on all the feedback gives ({WAITING_FOR[found.objective]})"
        return None

    def train_and_publish(self, parent: int, cursor: Cursor) -> int:
        """Refit the reward model and run the PPO iterations (or a direct round) and publish; return the new version."""
        plan = self.team.from_main(lambda: self.prepare(cursor))
        if plan.wait_reason is not None:
            raise RoundAbandoned(plan.wait_reason)
        stats = self.train(plan)
        self.check_continue()
        self.check_fluency(plan, stats)
        self.check_continue()  # the gate may have taken a while
        published, failure = self.team.from_main(lambda: self.publish(parent, plan, stats))
        if failure is not None:
            raise RoundAbandoned(failure)
        self.loaded_version, self._disfluent = published, None
        if plan.examples is not None:
            self._published_examples = (published, plan.examples.fingerprint)
        if self.team.is_main:
            self.prune()
        self.set_state("idle")
        return published

    def prepare(self, cursor: Cursor) -> RoundPlan:
        """Fit and judge the reward model on all feedback and plan the round: its version, replay pool and feedback.

        A direct round fits nothing: its plan holds the objective's examples from all rated pages. A
        PPO round whose reward model does not order held-out pages better than chance
        (`FitReport.trusted`) does not optimise it: its plan holds `--reward-model-fallback`'s
        examples instead, or a `wait_reason` (fallback "wait", or the fallback has no examples yet).
        """
        self.store.begin_round(self.holder, token=self.lease_token)  # submissions before now can no longer be undone (after their grace)
        feedback_end = self.feedback_end(cursor)
        total = self.store.count_feedback_since()
        version = self.adapters.next_version(self.store)
        if self.objective.direct:
            return RoundPlan(version=version, reward_model=None, report=None, replay_pool=None,
                             feedback_end=feedback_end, total=total, examples=self.direct_examples(cursor))
        self.set_state("fitting the reward model")
        feedback = read_feedback(self.store, self.reward_config.prior_weight)
        reward_model, report = fit_reward_model(feedback, self.trainer.features, config=self.reward_config,
                                                reference_features=self.reference_features())
        log.info("reward model: %s", report.summary())
        plan = RoundPlan(version=version, reward_model=reward_model, report=report,
                         replay_pool=self.replay_pool(feedback), feedback_end=feedback_end, total=total)
        if report.trusted or self.objective.reward_model_fallback == "ppo":
            return plan
        verdict = report.agreement.summary()
        fallback = self.objective.reward_model_fallback
        found = None if fallback == "wait" else examples(fallback, feedback, self.objective.good_score)
        if found is None:
            self._distrusted = (feedback_end, verdict)
            return replace(plan, wait_reason=f"{verdict}; waiting for more feedback")
        log.warning("%s: this round trains %s on the rated pages instead of PPO", verdict, fallback)
        return replace(plan, reward_model=None, replay_pool=None, examples=found)

    def train(self, plan: RoundPlan) -> dict[str, float]:
        """Train the round (its PPO iterations, or `train_direct` for a direct objective's pages), recording the
        statistics; return the last ones."""
        self.trained_from = AdapterState.capture(self.policy)  # the loaded version, before a refit or shrink
        if plan.examples is not None:
            return self.train_direct(plan)
        c = self.config
        stats: dict[str, float] = {}
        progress = tqdm(range(c.ppo_iterations), desc=f"v{plan.version}", unit="it",
                        disable=not (sys.stderr.isatty() and self.team.is_main))
        for i in progress:
            self.check_continue()
            self.set_state(f"training iteration {i + 1} of {c.ppo_iterations}")
            stats = self.trainer.step(self.pick_prompts(), plan.reward_model, self.pick_replay(plan.replay_pool))
            self.check_divergence(stats)
            if self.team.is_main:
                self.record(plan.version, i + 1, stats)
            progress.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.2f}")
            log.info("v%d iteration %d/%d: score %.3f kl %.3f kl_coef %.4f loss/policy %.4f loss/value %.4f",
                     plan.version, i + 1, c.ppo_iterations, stats["objective/scores"], stats["objective/kl"],
                     stats["kl_coef"], stats["loss/policy"], stats["loss/value"])
        return stats

    def train_direct(self, plan: RoundPlan) -> dict[str, float]:
        """Run the round's direct objective on the plan's examples, recorded as iteration 1; return its stats,
        with `direct/from_base` 1 when it refitted from the base (`DirectTrainer.refits`), else 0 (it continued
        from the loaded version, first shrunk by `--direct-shrink`)."""
        self.check_continue()
        objective = plan.examples.objective
        instead = "" if plan.report is None else f" instead of PPO ({plan.report.agreement.summary()})"
        refit = self.objective.direct and self.direct.refits(len(plan.examples))  # fallback rounds continue
        afresh = " from the base" if refit else ""
        self.set_state(f"training {objective} on {len(plan.examples)} examples{afresh}{instead}")
        if refit:  # one fit of all pages, from the base
            self.load_version(BASE_VERSION)
        elif self.objective.direct and self.objective.direct_shrink < 1:  # earlier rounds' fit fades
            shrink_toward_base(self.policy, self.objective.direct_shrink)
        stats = {**self.direct.step(plan.examples, self.pick_prompts()), "direct/from_base": float(refit)}
        self.check_divergence(stats)
        if self.team.is_main:
            self.record(plan.version, 1, stats)
        log.info("v%d %s on %d examples: loss %.4f score %.3f kl %.3f perplexity ratio %.3f", plan.version, objective,
                 len(plan.examples), stats[f"loss/{objective}"], stats["objective/scores"], stats["objective/kl"],
                 stats["objective/perplexity_ratio"])
        return stats

    def direct_examples(self, cursor: Cursor) -> Examples | None:
        """Return the direct objective's examples from all feedback in the store, None when it gives none.

        Read once per state of the feedback (keyed by the cursor after the newest rating or preference
        since `cursor` and the store's `judgement_stamp`, which an undo or a submission without new rows
        changes), so a waiting worker and the round it then prepares do not reread it all."""
        end = (self.feedback_end(cursor), self.store.judgement_stamp())
        if self._examples_at is None or self._examples_at[0] != end:
            feedback = read_feedback(self.store, self.reward_config.prior_weight)
            self._examples_at = (end, examples(self.objective.objective, feedback, self.objective.good_score))
        return self._examples_at[1]

    def publish(self, parent: int, plan: RoundPlan, stats: dict[str, float]) -> tuple[int | None, str | None]:
        """Publish the trained adapter with the round's metrics; return (its version, None) or (None, why not)."""
        fit = report_metrics(plan.report) if plan.report is not None else {}
        metrics = {**{k: v for k, v in stats.items() if math.isfinite(v)}, **fit}
        record = VersionRecord(parent=parent, base_model=self.base_model, cursor=plan.feedback_end,
                               n_ratings=plan.total.ratings, n_preferences=plan.total.preferences, metrics=metrics)
        try:
            return VersionLifecycle(self.store, self.adapters).publish(
                self.policy, record, holder=self.holder, token=self.lease_token,
                write_extra=lambda d: self.trainer.save_state(d, include_adapter=False)), None
        except Exception as exc:  # the lease was lost, the parent rolled back, ...: tell every process
            return None, f"publishing failed: {exc}"

    def prune(self) -> list[int]:
        """Remove old versions' files (`--keep-versions`, `VersionLifecycle.prune`); return the versions pruned.
        A failure is logged, not raised: the version is published and the next publish tries again."""
        try:
            return VersionLifecycle(self.store, self.adapters).prune(self.config.keep_versions)
        except Exception:
            log.exception("pruning old versions failed")
            return []

    def record_failure(self, parent: int, why: Exception) -> None:
        """Record the round's version as failed, with why."""
        version = self.adapters.next_version(self.store)
        self.store.record_failed_version(version, parent, f"{getattr(why, 'kind', 'diverged')}: {why}",
                                         holder=self.holder, token=self.lease_token)
        log.error("round discarded, version %d recorded as failed: %s", version, why)

    # ------------------------------------------------------------------------------ pieces

    def record(self, version: int, iteration: int, stats: dict[str, float]) -> None:
        """Store an iteration's metrics (for the page's plots) and, when asked, write them to TensorBoard."""
        self.store.record_metrics(version, iteration, stats, holder=self.holder, token=self.lease_token)
        if self.tensorboard is not None:
            for name, value in stats.items():
                self.tensorboard.add_scalar(name, value, global_step=self.trainer.iteration)
            self.tensorboard.flush()

    def feedback_end(self, cursor: Cursor) -> Cursor:
        """Return the cursor after all feedback present now (what this round trains on)."""
        while True:
            page = self.store.feedback_since(cursor, limit=1000)
            if not page.ratings and not page.preferences:
                return cursor
            cursor = page.cursor

    def load_trainable(self, serving: int) -> int:
        """Load the newest version that can be loaded, from `serving` down (published ones, then 0 = base);
        return its number, what the round trains from.

        A version whose files are missing, corrupt or do not fit (`AdapterLoadError`) is skipped, logged
        once, and named in the worker state for as long as training goes on from an older one.
        """
        def candidates():  # the older published versions are listed only when the serving one fails
            yield serving
            yield from sorted((v.version for v in self.store.list_versions()
                               if v.status == "published" and v.version < serving), reverse=True)
            yield BASE_VERSION

        for version in candidates():
            if version == self.loaded_version:
                break
            if version in self.unloadable:
                continue
            try:
                self.load_version(version)
                break
            except AdapterLoadError as exc:
                self.unloadable[version] = str(exc)
                log.error("skipping version %d, it cannot be loaded: %s", version, exc)
        loaded = self.loaded_version
        skipped = [v for v in self.unloadable if loaded < v <= serving]
        self.note = None if not skipped else \
            f"version {', '.join(map(str, skipped))} cannot be loaded: training from version {loaded}"
        return loaded

    def load_version(self, version: int) -> None:
        """Load a version's adapter (0 = base) and, when it has one, its optimizer and trainer state, every
        file checked against its published checksum first. Raises AdapterLoadError, changing nothing, when
        one is missing or altered."""
        if version != BASE_VERSION:
            directory = version_dir(self.adapters.root, version)
            meta = read_metadata(directory, version)
            resume = (directory / OPTIMIZER_FILE).is_file()
            check_files(directory, meta, (OPTIMIZER_FILE, TRAINER_STATE_FILE) if resume else ())
        directory = apply_version(self.policy, self.adapters.root, version, initial=self.initial)
        self.trainer.optimizer.state.clear()
        if self.direct is not None:
            self.direct.forget()
        if directory is not None and resume:
            self.trainer.load_state(directory, include_adapter=False)
        self.loaded_version = version
        log.info("training from version %d", version)

    def snapshot(self) -> tuple[AdapterState, dict, float, int, dict, int | None]:
        """Return what a discarded round must restore: adapter, optimizer, KL coefficient, iteration, how
        often a direct round's items were trained on, and which version the adapter is (a refit loads the base)."""
        seen = dict(self.direct.seen) if self.direct is not None else {}
        return (AdapterState.capture(self.policy), copy.deepcopy(self.trainer.optimizer.state_dict()),
                self.trainer.kl_ctl.value, self.trainer.iteration, seen, self.loaded_version)

    def restore(self, snapshot) -> None:
        """Put back a snapshot taken at the start of a round."""
        adapter, optimizer, kl_coef, iteration, seen, self.loaded_version = snapshot
        adapter.restore()
        self.trainer.optimizer.load_state_dict(optimizer)
        self.trainer.kl_ctl.value, self.trainer.iteration = kl_coef, iteration
        if self.direct is not None:
            self.direct.seen = seen

    def check_continue(self) -> None:
        """Raise RoundAbandoned (in every process) when a stop was requested or the lease was lost."""
        reason = self.team.from_main(self.stop_reason)
        if reason is not None:
            raise RoundAbandoned(reason)

    def stop_reason(self) -> str | None:
        """Return why the round must stop now, or None."""
        if self.stop_requested.is_set():
            return "stop requested"
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            return "the training lease was lost"
        return None

    def check_divergence(self, stats: dict[str, float]) -> None:
        """Raise DivergenceError on non-finite stats or a KL beyond the hard limit."""
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            raise DivergenceError(f"non-finite {', '.join(bad)}")
        if stats["objective/kl"] > self.config.max_kl:
            raise DivergenceError(f"KL {stats['objective/kl']:.2f} beyond --max-kl {self.config.max_kl}")

    def check_fluency(self, plan: RoundPlan, stats: dict[str, float]) -> None:
        """Measure the trained weights' `FluencyGate` ratio into `stats` (`objective/text_perplexity_ratio`);
        past `--max-perplexity-ratio`, search back toward the version the round trained from, which the gate
        passed when it was published (`GATE_FRACTIONS` of the way from it to the trained weights, each tensor on
        the line between them, measured on the same prompts and seed: TRPO's backtracking line search) and keep
        the first within it (`objective/gate_fraction`: how far toward the trained weights, 1 when none was
        undone; the round's other statistics stay those of its trained weights); raise Disfluent when none is.
        A refit from the base searches back toward that version too, not toward the base, so what it learnt
        is kept: the versions a worker trains all grow from its one initial adapter, so a point between two
        is a blend of both fits (weight averaging of fine-tunes from one start, Wortsman et al. 2022's model
        soups), and whatever it is, the gate measures it. Nothing without the gate."""
        if self.gate is None:
            return
        self.set_state(f"measuring the fluency of v{plan.version}")
        bound, prompts = self.config.max_perplexity_ratio, self.pick_prompts(self.config.fluency_samples)
        ratio, fraction = self.gate.ratio(prompts), 1.0
        log.info("v%d text perplexity ratio %.3f (gate %s)", plan.version, ratio, bound)
        if not ratio <= bound:  # NaN is past it too
            trained = AdapterState.capture(self.policy)
            for fraction in GATE_FRACTIONS:
                self.check_continue()
                self.trained_from.interpolate(trained, fraction)
                ratio = self.gate.ratio(prompts)
                log.info("v%d %.2f of the way from the version it trained from: text perplexity ratio %.3f",
                         plan.version, fraction, ratio)
                if ratio <= bound:
                    break
        stats["objective/text_perplexity_ratio"], stats["objective/gate_fraction"] = ratio, fraction
        if not ratio <= bound:
            raise Disfluent(f"its text's perplexity ratio to the base's own, {ratio:.2f} at {fraction:g} of the "
                            f"way from the version it trained from, is beyond --max-perplexity-ratio {bound}",
                            plan.feedback_end)

    def pick_prompts(self, n: int | None = None) -> list[str]:
        """Return `n` (default batch_size) prompt texts drawn from the active pool (with replacement when it
        is smaller)."""
        pool = [p.text for p in self.store.list_prompts(active_only=True)]
        if not pool:
            raise RoundAbandoned("no active prompts in the pool")
        n = n or self.trainer.config.batch_size
        return self.rng.sample(pool, n) if len(pool) >= n else [self.rng.choice(pool) for _ in range(n)]

    def replay_pool(self, feedback: RatedFeedback) -> Replay | None:
        """Return the rated generations PPO may replay (`RatedFeedback.replay_pool`), None when replay is off."""
        return feedback.replay_pool(self.trainer.config.sampling.temperature) if self.config.replay_samples else None

    def pick_replay(self, pool: Replay | None) -> Replay | None:
        """Return `--replay-samples` rated generations drawn from the pool without replacement (all when fewer)."""
        if not pool:
            return None
        return pool.take(self.rng.sample(range(len(pool)), min(self.config.replay_samples, len(pool))))

    def reference_features(self) -> torch.Tensor:
        """Return (N, F) reward features of base-model samples, the reward model's calibration set.

        Sampled as PPO samples (`PPOTrainer.reference_rollout`) and made once: the base never changes.
        """
        if self._reference_features is None:
            prompts = []
            while len(prompts) < self.config.reference_samples:
                prompts.extend(self.pick_prompts())
            rollout = self.trainer.reference_rollout(prompts[:self.config.reference_samples])
            self._reference_features = self.trainer.features.of_rollout(rollout).cpu()
        return self._reference_features


def missing_feedback(config: WorkerConfig, total: FeedbackCounts, new: FeedbackCounts) -> str | None:
    """Return what a round still waits for, as the status panel says it after "waiting for" ("12 more
    ratings", "ratings on 2 more prompts"), or None when it may start.

    Any round needs `min_ratings` ratings on `min_rated_prompts` prompts in all (so the first one
    does not train on a handful), and `min_new_feedback` new ratings plus preferences since the serving
    version (or since what `new` counts from)."""
    def plural(n: int, what: str) -> str:
        return f"{n} more {what}{'s' if n != 1 else ''}"

    if total.ratings < config.min_ratings:
        return plural(config.min_ratings - total.ratings, "rating")
    if total.rated_prompts < config.min_rated_prompts:
        return f"ratings on {plural(config.min_rated_prompts - total.rated_prompts, 'prompt')}"
    missing = config.min_new_feedback - (new.ratings + new.preferences)
    return plural(missing, "rating") if missing > 0 else None


GATE_FRACTIONS = (0.5, 0.25)
"""How far from the version a round trained from toward its trained weights a version past
`--max-perplexity-ratio` is measured at in turn (halving, as TRPO's line search), the first within it published."""


class DivergenceError(RuntimeError):
    """A PPO iteration whose statistics show the policy diverging."""

    kind = "diverged"


class Disfluent(DivergenceError):
    """A trained version whose text the base model finds too perplexing (`Worker.check_fluency`), with the
    feedback end of its round: the next round waits for `--min-new-feedback` more than that."""

    kind = "not fluent"

    def __init__(self, message: str, feedback_end: Cursor):
        super().__init__(message)
        self.feedback_end = feedback_end


def report_metrics(report) -> dict[str, float]:
    """Return the reward-model fit report as flat metrics (finite numbers only)."""
    values = {
        "reward_model/held_out_preference_accuracy": report.held_out_preference_accuracy,
        "reward_model/held_out_score_correlation": report.held_out_score_correlation,
        "reward_model/train_loss": report.train_loss,
        "reward_model/n_examples": report.n_examples,
        "reward_model/n_raters": report.n_raters,
        "reward_model/l2": report.l2,
    }
    if report.agreement is not None:  # the page-ordering judgement; agreement and interval only when judged
        judged = report.agreement
        values.update({"reward_model/page_agreement": judged.agreement, "reward_model/page_agreement_low": judged.low,
                       "reward_model/page_agreement_high": judged.high, "reward_model/judged_pages": judged.pages,
                       "reward_model/trusted": float(judged.trusted)})
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


# ---------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Return the worker's parser: model, LoRA, sampling, store, PPO, reward-model and worker options."""
    parser = argparse.ArgumentParser(prog="python -m ppo_feedback.worker", description=__doc__.splitlines()[0])
    for cls, title in ((ModelConfig, "model"), (LoraSettings, "LoRA"), (SamplingConfig, "sampling")):
        add_dataclass_arguments(parser, cls, title)
    group = parser.add_argument_group("store")
    app_defaults = AppConfig()
    group.add_argument("--db", default=os.environ.get("PPO_FEEDBACK_DB", app_defaults.db), help="SQLite file or SQLAlchemy URL")
    group.add_argument("--adapters-dir", default=os.environ.get("PPO_FEEDBACK_ADAPTERS_DIR", app_defaults.adapters_dir),
                       help="directory of published adapter versions")
    group.add_argument("--log-level", default=os.environ.get("PPO_FEEDBACK_LOG_LEVEL", "INFO"))
    add_worker_arguments(parser)
    return parser


def ppo_config_from(args: argparse.Namespace, sampling: SamplingConfig) -> PPOConfig:
    """Return the PPOConfig of parsed arguments, with rollouts sampled as the page samples."""
    return from_namespace(PPOConfig, args, sampling=RolloutSampling.from_page(sampling))


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT; return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from db import FeedbackStore

    from .modeling import ModelSpecError, add_lora, load_model

    try:
        model_cfg, lora, sampling = (from_namespace(cls, args) for cls in (ModelConfig, LoraSettings, SamplingConfig))
        ppo_config, worker_cfg = ppo_config_from(args, sampling), from_namespace(WorkerConfig, args)
        reward_cfg, objective = from_namespace(RewardConfig, args), from_namespace(ObjectiveConfig, args)
        lower_priority(worker_cfg.worker_nice)
        loaded = load_model(model_cfg)
    except (ValueError, ModelSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    accelerator = data_parallel_accelerator(loaded.device)
    store = FeedbackStore(args.db)
    torch.manual_seed(ppo_config.seed)  # the same fresh LoRA in every process of a data-parallel run
    policy = PolicyWithValueHead(add_lora(loaded.model, lora), loaded.tokenizer)
    worker = Worker(store, AdapterStore(args.adapters_dir), policy, ppo_config, worker_cfg, loaded.spec,
                    accelerator=accelerator, reward_config=reward_cfg, objective=objective)

    def request_stop(signum, _frame):
        log.info("signal %d: finishing without publishing a partial round", signum)
        worker.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info("worker %s training %s; adapters in %s", worker.holder, loaded.spec, Path(args.adapters_dir).resolve())
    worker.run()
    log.info("stopped; trainable weights sha256 %s", weights_checksum(policy))
    store.close()
    return 0


def lower_priority(increment: int) -> int:
    """Add `increment` to this process's niceness (os.nice; nothing where the OS has none, or for 0); return
    the niceness it runs at, so that the page's decoding on the same cores comes first."""
    if increment and hasattr(os, "nice"):
        niceness = os.nice(increment)
        log.info("worker runs at niceness %d (--worker-nice %d): pages being generated come first", niceness,
                 increment)
        return niceness
    return os.nice(0) if hasattr(os, "nice") else 0


def data_parallel_accelerator(device: torch.device):
    """Return an accelerate.Accelerator when started by `accelerate launch` with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    if device.type == "cpu":  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    log.info("data-parallel process %d of %d", accelerator.process_index + 1, accelerator.num_processes)
    return accelerator


def weights_checksum(policy: PolicyWithValueHead) -> str:
    """Return a sha256 of the trainable weights (LoRA and value head), to compare processes or runs."""
    digest = hashlib.sha256()
    for p in policy.trainable_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
