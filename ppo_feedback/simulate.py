"""Simulated raters: drive a running app through its public API as K concurrent scripted raters.

Usage: python -m ppo_feedback.simulate --url http://127.0.0.1:7860/ --raters 4 --ratings 200 \\
           --preference keyword:happy [--noise 0.5] [--bias 0.5] [--seed 0] [--pace 40]

Each rater asks `/next_prompt`, `/generate`s candidates, `/rate`s every one 1..5 and `/prefer`s
its best over the ones of lower taste (when one stands out), until `--ratings` ratings are in (or
`--duration` seconds passed). Nothing internal is touched: only `gradio_client` calls, so the page must run without
logins (each rater acts under its own name through the endpoints' `rater` argument).

A rater's taste is a pure function of the response text with values in [0, 1] (`--preference`):

    keyword:WORD    1 when the word appears (whole word, any case), else 0
    length:TARGET   1 - |words - TARGET| / TARGET, clipped to [0, 1]
    sentiment       0.5 + (positive - negative opinion words) / 6, clipped (ppo_feedback.lexicon)
    regex:PATTERN   1 when re.search(PATTERN, text) matches, else 0

and its score is `round(1 + 4 * taste + bias + noise)` clipped to 1..5, where `bias` is the
rater's own offset (`--bias B` spreads the raters evenly over [-B, +B], so a per-rater
normalisation has something to correct) and `noise` is Gaussian with sd `--noise`.

`--pace N` makes the room wait after every N ratings until the worker has published a version
trained on them (or `--pace-timeout` passed), so that a small rating budget is spread over many
versions; `--pace-lag 2` lets the room rate the next block while the worker trains on the last
(both cores busy). The worker needs `--min-new-feedback` at most one block's feedback (N ratings
plus the preferences). Without `--pace` raters rate as fast as the app answers.

Prints per adapter version the mean taste of its rated generations (± a 95% t interval) and the
ratings given so far; writes one CSV row per rating (`--csv`) and a PNG of taste against ratings
given (`--plot`, needs matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

from .lexicon import sentiment_counts

SENTIMENT_SATURATION = 3
"""Net opinion words (positive minus negative) at which the sentiment taste reaches 0 or 1."""
CSV_COLUMNS = ["time_s", "ratings_so_far", "rater", "prompt_id", "generation_id", "version", "taste", "score",
               "best"]
FALLBACK_PROMPTS = ["Tell me something nice about your day.", "Describe your favourite place.",
                    "Write a short note to a friend."]
ENDPOINTS = ("/next_prompt", "/generate", "/rate", "/prefer", "/status")
MAX_FAILED_ROUNDS = 10
"""A rater gives up after this many rounds in a row that failed (the app is gone)."""


# ------------------------------------------------------------------------------------------ tastes

def keyword_taste(text: str, word: str) -> float:
    """Return 1.0 when `word` occurs in `text` as a whole word (any case), else 0.0."""
    if not word.strip():
        raise ValueError("keyword: needs a word")
    pattern = r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)"
    return 1.0 if re.search(pattern, text, flags=re.IGNORECASE) else 0.0


def length_taste(text: str, target: int) -> float:
    """Return 1 - |words - target| / target clipped to [0, 1]: 1 at exactly `target` words."""
    if target < 1:
        raise ValueError("length: needs a target of at least one word")
    n = len(text.split())
    return max(0.0, 1.0 - abs(n - target) / target)


def sentiment_taste(text: str, saturation: int = SENTIMENT_SATURATION) -> float:
    """Return 0.5 + (positive - negative words) / (2 * saturation) clipped to [0, 1] (0.5 = neutral)."""
    positive, negative = sentiment_counts(text)
    return min(1.0, max(0.0, 0.5 + (positive - negative) / (2 * saturation)))


def regex_taste(text: str, pattern: str | re.Pattern[str]) -> float:
    """Return 1.0 when the regular expression matches anywhere in `text`, else 0.0."""
    return 1.0 if re.search(pattern, text) else 0.0


@dataclass(frozen=True)
class Preference:
    """A parsed `--preference`: its spec and the taste function (text -> [0, 1])."""

    spec: str
    taste: Callable[[str], float] = field(compare=False, repr=False)

    def __call__(self, text: str) -> float:
        return self.taste(text)


def parse_preference(spec: str) -> Preference:
    """Return the Preference a spec names (keyword:WORD, length:TARGET, sentiment, regex:PATTERN); raise ValueError."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "keyword":
        if not arg.strip():
            raise ValueError("keyword: needs a word, e.g. keyword:happy")
        word = arg.strip()
        return Preference(spec, lambda text: keyword_taste(text, word))
    if kind == "length":
        try:
            target = int(arg)
        except ValueError:
            raise ValueError(f"length: needs a whole number of words, not {arg!r}") from None
        if target < 1:
            raise ValueError("length: needs a target of at least one word")
        return Preference(spec, lambda text: length_taste(text, target))
    if kind == "sentiment":
        if arg.strip():
            raise ValueError("sentiment takes no argument")
        return Preference(spec, sentiment_taste)
    if kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as exc:
            raise ValueError(f"regex: {exc}") from None
        return Preference(spec, lambda text: regex_taste(text, pattern))
    raise ValueError(f"unknown preference {spec!r}: use keyword:WORD, length:TARGET, sentiment or regex:PATTERN")


def score_from_taste(taste: float, bias: float = 0.0, noise: float = 0.0) -> int:
    """Return the 1..5 score of a taste in [0, 1] given the rater's bias and a noise draw: round(1 + 4t + b + n)."""
    value = 1.0 + 4.0 * taste + bias + noise
    return int(min(5, max(1, math.floor(value + 0.5))))


def rater_biases(k: int, bias: float) -> list[float]:
    """Return k per-rater offsets spread evenly over [-bias, +bias] (one rater: 0)."""
    if k < 1:
        raise ValueError("at least one rater")
    if k == 1:
        return [0.0]
    return [bias * (2 * i / (k - 1) - 1) for i in range(k)]


@dataclass
class Judgement:
    """What a rater thinks of one candidate: its taste, its noisy utility and the score given."""

    taste: float
    utility: float
    score: int


class ScriptedRater:
    """One simulated person: a name, a taste, an offset and a seeded noise source."""

    def __init__(self, name: str, preference: Preference, *, bias: float = 0.0, noise: float = 0.0,
                 seed: int = 0):
        self.name, self.preference, self.bias, self.noise = name, preference, bias, noise
        self.rng = random.Random(seed)

    def judge(self, texts: Sequence[str]) -> list[Judgement]:
        """Return a judgement per text (scores use one noise draw each)."""
        out = []
        for text in texts:
            taste = float(self.preference(text))
            draw = self.rng.gauss(0.0, self.noise) if self.noise > 0 else 0.0
            out.append(Judgement(taste, taste + (draw + self.bias) / 4.0, score_from_taste(taste, self.bias, draw)))
        return out

    @staticmethod
    def best(judgements: Sequence[Judgement]) -> tuple[int | None, list[int]]:
        """Return (index of the best candidate, indices it beats); (None, []) when no candidate stands out.

        The best has the highest taste (the noisy utility breaks ties) and beats exactly the
        candidates of lower taste: like a person who picks a best one only when it is better,
        the noise blurs the 1..5 scores, not which of two responses has more of what it likes.
        """
        if len(judgements) < 2:
            return None, []
        best = max(range(len(judgements)), key=lambda i: (judgements[i].taste, judgements[i].utility))
        beaten = [i for i, j in enumerate(judgements) if j.taste < judgements[best].taste]
        return (best, beaten) if beaten else (None, [])


# ------------------------------------------------------------------------------------ bookkeeping

@dataclass
class RatingRecord:
    """One rating the app accepted."""

    time_s: float
    ratings_so_far: int
    rater: str
    prompt_id: int | None
    generation_id: int
    version: int
    taste: float
    score: int
    best: bool = False


@dataclass
class Call:
    """One API call as a client saw it."""

    endpoint: str
    start_s: float
    latency_s: float
    ok: bool
    error: str | None = None
    retries: int = 0


@dataclass
class StatusPoint:
    time_s: float
    serving_version: int
    latest_version: int
    worker_state: str
    worker_present: bool
    ratings: int


@dataclass
class SimulationResult:
    records: list[RatingRecord]
    calls: list[Call]
    status: list[StatusPoint]
    generations: dict[int, int]  # generation id -> version, every candidate received
    accepted: dict[tuple[int, str], int]  # (generation id, rater) -> score the app accepted
    preferences: int
    wall_s: float
    pace_waits: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)  # raters that gave up, and why

    @property
    def errors(self) -> list[Call]:
        return [c for c in self.calls if not c.ok]

    def latencies(self, endpoint: str) -> list[float]:
        return [c.latency_s for c in self.calls if c.endpoint == endpoint and c.ok]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Return (mean, half-width of the two-sided Student t confidence interval); half-width nan below two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan")
    return mean, float(student_t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def version_summary(records: Iterable[RatingRecord]) -> list[dict[str, Any]]:
    """Return per version (in order): ratings, mean taste ± 95% CI, mean score, and the ratings given so far
    when its first and last rating came in."""
    by_version: dict[int, list[RatingRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.ratings_so_far):
        by_version[r.version].append(r)
    rows = []
    for version in sorted(by_version):
        rs = by_version[version]
        mean, half = t_interval([r.taste for r in rs])
        rows.append({"version": version, "n_ratings": len(rs), "mean_taste": mean, "ci95": half,
                     "mean_score": statistics.fmean(r.score for r in rs),
                     "first_at": rs[0].ratings_so_far, "ratings_so_far": rs[-1].ratings_so_far})
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """Return the per-version table as text."""
    lines = ["version  ratings so far  ratings  mean taste (95% CI)   mean score"]
    for r in rows:
        ci = "" if math.isnan(r["ci95"]) else f" ± {r['ci95']:.3f}"
        lines.append(f"{r['version']:>7}  {r['ratings_so_far']:>14}  {r['n_ratings']:>7}  "
                     f"{r['mean_taste']:.3f}{ci:<10}        {r['mean_score']:.2f}")
    return "\n".join(lines)


def write_csv(records: Sequence[RatingRecord], path: str | Path) -> Path:
    """Write one row per rating (CSV_COLUMNS), in the order ratings were accepted; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in sorted(records, key=lambda r: r.ratings_so_far):
            row = asdict(r)
            row["time_s"], row["taste"] = round(r.time_s, 3), round(r.taste, 4)
            writer.writerow({k: row[k] for k in CSV_COLUMNS})
    return path


def write_plot(records: Sequence[RatingRecord], path: str | Path, title: str = "", window: int = 20) -> Path:
    """Plot taste against ratings given: each rating, a moving mean, and each version's mean; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records, key=lambda r: r.ratings_so_far)
    xs = [r.ratings_so_far for r in ordered]
    ys = [r.taste for r in ordered]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.scatter(xs, ys, s=8, alpha=0.25, color="grey", label="rated generation")
    if ordered:
        w = max(1, min(window, len(ys)))
        moving = [statistics.fmean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, moving, color="tab:blue", label=f"moving mean ({w} ratings)")
    for row in version_summary(ordered):
        ax.hlines(row["mean_taste"], row["first_at"], max(row["ratings_so_far"], row["first_at"] + 1),
                  color="tab:red", linewidth=2.5)
        ax.annotate(f"v{row['version']}", (row["first_at"], row["mean_taste"]), textcoords="offset points",
                    xytext=(0, 5), fontsize=8, color="tab:red")
    ax.plot([], [], color="tab:red", linewidth=2.5, label="mean per version")
    ax.set_xlabel("ratings given")
    ax.set_ylabel("preference score (taste, 0..1)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or "Simulated raters: preference score of rated generations")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_exactly_once(store, accepted: dict[tuple[int, str], int], generation_ids: Iterable[int],
                       raters: Iterable[str]) -> dict[str, Any]:
    """Compare what clients saw accepted with the store (read with `db.FeedbackStore`, checker only).

    For every generation this run received, read its rating history; a (generation, rater) pair
    of our raters must have exactly one rating row, current, with the score the client sent, and
    exactly the accepted pairs may have any. Returns counts and up to 10 examples of each problem.
    """
    raters = set(raters)
    rows: dict[tuple[int, str], list] = defaultdict(list)
    for gid in sorted(set(generation_ids)):
        for rating in store.rating_history(gid):
            if rating.rater in raters:
                rows[(gid, rating.rater)].append(rating)
    missing = [k for k in accepted if k not in rows]
    unexpected = [k for k in rows if k not in accepted]
    duplicated = [k for k, rs in rows.items() if len(rs) != 1]
    wrong = [k for k, rs in rows.items() if k in accepted and not any(r.current and r.score == accepted[k]
                                                                       for r in rs)]
    ok = not (missing or unexpected or duplicated or wrong)
    return {"ok": ok, "accepted": len(accepted), "stored": sum(len(rs) for rs in rows.values()),
            "missing": len(missing), "unexpected": len(unexpected), "duplicated": len(duplicated),
            "wrong_score": len(wrong),
            "examples": {"missing": missing[:10], "unexpected": unexpected[:10], "duplicated": duplicated[:10],
                         "wrong_score": wrong[:10]}}


# ------------------------------------------------------------------------------------- the room

def _default_client_factory(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False)


class Simulation:
    """K scripted raters against a running app, through `gradio_client` only."""

    def __init__(self, url: str, preference: Preference | str, *, raters: int = 4, ratings: int | None = 100,
                 duration: float | None = None, candidates: int = 4, noise: float = 0.5, bias: float = 0.5,
                 seed: int = 0, rater_prefix: str = "sim", pace: int | None = None, pace_lag: int = 1,
                 pace_timeout: float = 600.0,
                 status_interval: float | None = None, retries: int = 3, prefer: bool = True,
                 client_factory: Callable[[str], Any] = _default_client_factory,
                 log: Callable[[str], None] | None = print):
        if ratings is None and duration is None:
            raise ValueError("give a number of ratings, a duration, or both")
        if ratings is not None and ratings < 1:
            raise ValueError("--ratings must be >= 1")
        if raters < 1 or candidates < 1 or (pace is not None and pace < 1) or pace_lag < 1:
            raise ValueError("--raters, --candidates, --pace and --pace-lag must be >= 1")
        self.url, self.candidates, self.target, self.duration = url, candidates, ratings, duration
        self.preference = parse_preference(preference) if isinstance(preference, str) else preference
        self.pace, self.pace_lag, self.pace_timeout = pace, pace_lag, pace_timeout
        self.idle_grace_s = 5.0  # how long the worker must say "waiting for ..." before a wait gives up
        self.status_interval = status_interval
        self.retries, self.prefer, self.client_factory, self.log = retries, prefer, client_factory, log
        self.raters = [ScriptedRater(f"{rater_prefix}-{i + 1:02d}", self.preference, bias=b, noise=noise,
                                     seed=seed * 1000 + i)
                       for i, b in enumerate(rater_biases(raters, bias))]
        self._lock = threading.Lock()  # counters and results
        self._pace_lock = threading.Lock()  # held by the thread that waits for the worker
        self._stop = threading.Event()
        self._reserved = 0  # rating slots handed out (released again when a rating fails)
        self._done = 0  # slots finished: accepted or released
        self._cleared_block = 0
        self._start_version = 0
        self._t0 = 0.0
        self._records: list[RatingRecord] = []
        self._calls: list[Call] = []
        self._status: list[StatusPoint] = []
        self._generations: dict[int, int] = {}
        self._accepted: dict[tuple[int, str], int] = {}
        self._preferences = 0
        self._seen_versions: set[int] = set()
        self._pace_waits: list[dict[str, Any]] = []
        self._failures: list[str] = []

    # ---------------------------------------------------------------------------------- public

    def run(self) -> SimulationResult:
        """Run the room until the ratings are in or the duration is over; return what happened."""
        clients = [self.client_factory(self.url) for _ in self.raters]
        status_client = self.client_factory(self.url)
        self._t0 = time.perf_counter()
        if self.pace:
            self._start_version = self._call(status_client, "/status")["serving_version"]
        threads = [threading.Thread(target=self._rater_main, args=(r, c), name=r.name, daemon=True)
                   for r, c in zip(self.raters, clients)]
        poller = None
        if self.status_interval:
            poller = threading.Thread(target=self._poll_status, args=(self.client_factory(self.url),),
                                      name="status-poller", daemon=True)
            poller.start()
        for t in threads:
            t.start()
        deadline = None if self.duration is None else self._t0 + self.duration
        while any(t.is_alive() for t in threads):
            if deadline is not None and time.perf_counter() >= deadline:
                self._stop.set()
            for t in threads:
                t.join(timeout=0.2)
        if self.pace and not self._failures and not (deadline and time.perf_counter() >= deadline):
            self._wait_for_worker(status_client, final=True)  # the versions trained on the last blocks
        self._stop.set()
        if poller is not None:
            poller.join(timeout=10)
        for client in [*clients, status_client]:
            close = getattr(client, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        return SimulationResult(records=list(self._records), calls=list(self._calls), status=list(self._status),
                                generations=dict(self._generations), accepted=dict(self._accepted),
                                preferences=self._preferences, wall_s=time.perf_counter() - self._t0,
                                pace_waits=list(self._pace_waits), failures=list(self._failures))

    def latest_status(self) -> StatusPoint | None:
        """Return the status poller's newest view of /status (None before the first poll or without a poller)."""
        with self._lock:
            return self._status[-1] if self._status else None

    # ------------------------------------------------------------------------------- internals

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)

    def _call(self, client: Any, endpoint: str, *args: Any, retry: bool = True) -> Any:
        """Call an endpoint, retrying transport failures (never errors the app raised); record each outcome."""
        from gradio_client.exceptions import AppError

        attempts = 1 + (self.retries if retry else 0)
        start = time.perf_counter()
        error = None
        for attempt in range(attempts):
            try:
                result = client.predict(*args, api_name=endpoint)
            except AppError as exc:  # the app said no: a real error, never retried
                error = f"{type(exc).__name__}: {exc}"
                break
            except Exception as exc:  # noqa: BLE001 - connection trouble: the call may be repeated
                error = f"{type(exc).__name__}: {exc}"
                if attempt + 1 < attempts and not self._stop.is_set():
                    time.sleep(0.2 * (attempt + 1))
                    continue
                break
            else:
                with self._lock:
                    self._calls.append(Call(endpoint, start - self._t0, time.perf_counter() - start, True,
                                            retries=attempt))
                return result
        with self._lock:
            self._calls.append(Call(endpoint, start - self._t0, time.perf_counter() - start, False, error,
                                    retries=attempts - 1))
        raise RuntimeError(f"{endpoint}: {error}")

    def _reserve(self, want: int, client: Any) -> int:
        """Return how many rating slots this rater may fill now (0 = stop), waiting at a pace boundary."""
        with self._pace_lock:
            if self.pace:
                with self._lock:
                    boundary = self._reserved > 0 and self._reserved % self.pace == 0 \
                        and self._reserved // self.pace > self._cleared_block
                if boundary and not (self.target is not None and self._reserved >= self.target):
                    self._wait_for_worker(client)
            with self._lock:
                if self._stop.is_set():
                    return 0
                grant = want
                if self.target is not None:
                    grant = min(grant, self.target - self._reserved)
                if self.pace:
                    grant = min(grant, self.pace - self._reserved % self.pace)
                grant = max(grant, 0)
                self._reserved += grant
                return grant

    def _release(self, n: int, accepted: int) -> None:
        with self._lock:
            self._reserved -= n - accepted
            self._done += accepted

    def _wait_for_worker(self, client: Any, final: bool = False) -> None:
        """At a block boundary: wait until the worker published enough versions since the start.

        After block k the room needs k - (lag - 1) new versions (lag 1: one per block, every block
        rated on a version trained on all earlier ones; lag 2: training of one block overlaps the
        rating of the next). At the end (`final`) it needs one per block. It also goes on when
        nothing is left to train on, and after `--pace-timeout` seconds.
        """
        with self._lock:
            blocks = -(-self._reserved // self.pace) if final else self._reserved // self.pace
        need = blocks if final else blocks - (self.pace_lag - 1)
        if need > 0:
            self._wait_for_versions(client, need, final)
        with self._lock:
            self._cleared_block = max(self._cleared_block, self._reserved // self.pace)

    def _wait_for_versions(self, client: Any, need: int, final: bool) -> None:
        start = time.perf_counter()
        deadline = start + self.pace_timeout
        if final or self.pace_lag == 1:  # the ratings still in flight belong to this block
            while not self._stop.is_set() and time.perf_counter() < deadline:
                with self._lock:
                    if self._done >= self._reserved:
                        break
                time.sleep(0.05)
        status = self._status_or_none(client)
        announced = False
        outcome = "timeout"
        idle_since: float | None = None
        while not self._stop.is_set() or final:
            if status is None:  # the failed call is recorded; keep asking until the deadline
                if time.perf_counter() >= deadline:
                    break
                time.sleep(1.0)
                status = self._status_or_none(client)
                continue
            counts = status["counts"]
            if status["serving_version"] - self._start_version >= need:
                outcome = "trained"
                break
            if counts["ratings_since_serving"] == 0 and counts["preferences_since_serving"] == 0:
                outcome = "nothing new to train on"
                break
            # the worker wants more feedback (--min-new-feedback) than is left and nothing is in flight:
            # waiting longer cannot bring a version, the room must rate on (or, at the end, stop)
            if (status["worker"]["state"].startswith("waiting for")
                    and status["latest_version"] == status["serving_version"]):
                idle_since = idle_since if idle_since is not None else time.perf_counter()
                if time.perf_counter() - idle_since >= self.idle_grace_s:
                    outcome = "the worker waits for more feedback"
                    break
            else:
                idle_since = None
            if time.perf_counter() >= deadline:
                break
            if not announced:
                self._say(f"[{self._now():7.1f}s] {self._done} ratings in: waiting for version "
                          f"{self._start_version + need} (serving v{status['serving_version']}, worker: "
                          f"{status['worker']['state']})")
                announced = True
            time.sleep(1.0)
            status = self._status_or_none(client)
        waited = time.perf_counter() - start
        serving = status["serving_version"] if status else None
        self._pace_waits.append({"after_ratings": self._reserved, "rated": self._done, "waited_s": round(waited, 1),
                                 "outcome": outcome, "serving_version": serving})
        if announced or outcome == "timeout":
            self._say(f"[{self._now():7.1f}s] {outcome} after {waited:.0f}s: serving v{serving}")

    def _status_or_none(self, client: Any) -> dict[str, Any] | None:
        try:
            return self._call(client, "/status", retry=True)
        except RuntimeError:
            return None

    def _poll_status(self, client: Any) -> None:
        while not self._stop.is_set():
            try:
                s = self._call(client, "/status", retry=False)
                with self._lock:
                    self._status.append(StatusPoint(self._now(), s["serving_version"], s["latest_version"],
                                                    s["worker"]["state"], bool(s["worker"].get("present")),
                                                    s["counts"]["ratings"]))
            except Exception:  # noqa: BLE001 - recorded as a failed call
                pass
            self._stop.wait(self.status_interval)

    def _rater_main(self, rater: ScriptedRater, client: Any) -> None:
        try:
            self._rate_until_done(rater, client)
        except Exception as exc:  # noqa: BLE001 - reported after the run
            message = f"{rater.name} gave up: {type(exc).__name__}: {exc}"
            self._say(message)
            with self._lock:
                self._failures.append(message)

    def _rate_until_done(self, rater: ScriptedRater, client: Any) -> None:
        seen_prompts: list[str] = []
        failed_in_a_row = 0
        while not self._stop.is_set():
            n = self._reserve(self.candidates, client)
            if n == 0:
                return
            accepted = 0
            try:
                accepted = self._one_round(rater, client, n, seen_prompts)
                failed_in_a_row = 0
            except RuntimeError:
                failed_in_a_row += 1
                if failed_in_a_row >= MAX_FAILED_ROUNDS:
                    raise
                self._stop.wait(0.5)  # the failed call is recorded; try another round
            finally:
                self._release(n, accepted)

    def _one_round(self, rater: ScriptedRater, client: Any, n: int, seen_prompts: list[str]) -> int:
        """Prompt, generate n, rate each, prefer the best; return how many ratings the app accepted."""
        pool = self._call(client, "/next_prompt", rater.name)
        prompt = pool.get("text") if isinstance(pool, dict) else None
        if prompt is None:  # this rater has rated the whole pool: ask again about one it has seen
            prompt = rater.rng.choice(seen_prompts or FALLBACK_PROMPTS)
        else:
            seen_prompts.append(prompt)
        items = self._call(client, "/generate", prompt, n, rater.name, retry=False)
        with self._lock:
            for item in items:
                self._generations[int(item["generation_id"])] = int(item["version"])
                if item["version"] not in self._seen_versions:
                    self._seen_versions.add(item["version"])
                    self._say(f"[{self._now():7.1f}s] {len(self._records)} ratings in: first generations "
                              f"of v{item['version']}")
        judgements = rater.judge([item["text"] for item in items])
        best, beaten = rater.best(judgements)
        accepted = 0
        for i, (item, j) in enumerate(zip(items, judgements)):
            gid = int(item["generation_id"])
            try:
                self._call(client, "/rate", gid, j.score, "", rater.name)
            except RuntimeError:
                continue
            accepted += 1
            with self._lock:
                self._accepted[(gid, rater.name)] = j.score
                self._records.append(RatingRecord(self._now(), len(self._records) + 1, rater.name,
                                                  item.get("prompt_id"), gid, int(item["version"]), j.taste,
                                                  j.score, best == i))
        if self.prefer and best is not None:
            try:
                self._call(client, "/prefer", int(items[best]["generation_id"]),
                           [int(items[i]["generation_id"]) for i in beaten], rater.name)
                with self._lock:
                    self._preferences += len(beaten)
            except RuntimeError:
                pass
        return accepted


# ---------------------------------------------------------------------------------- command line

def latency_report(result: SimulationResult, endpoints: Sequence[str] = ENDPOINTS) -> dict[str, Any]:
    """Return per endpoint: calls, errors, and p50/p95/p99 latency in milliseconds of the successful calls."""
    report = {}
    for endpoint in endpoints:
        calls = [c for c in result.calls if c.endpoint == endpoint]
        if not calls:
            continue
        ok = [c.latency_s * 1000 for c in calls if c.ok]
        report[endpoint] = {"calls": len(calls), "errors": len(calls) - len(ok),
                            **{f"p{q}_ms": None if not ok else round(percentile(ok, q), 1) for q in (50, 95, 99)}}
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ppo_feedback.simulate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--url", default="http://127.0.0.1:7860/", help="the running app (default %(default)s)")
    parser.add_argument("--raters", type=int, default=4, help="concurrent simulated raters (default %(default)s)")
    parser.add_argument("--ratings", type=int, default=None,
                        help="stop after this many ratings (default 100 unless --duration is given)")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--preference", default="sentiment",
                        help="keyword:WORD, length:TARGET, sentiment or regex:PATTERN (default %(default)s)")
    parser.add_argument("--noise", type=float, default=0.5, help="sd of the Gaussian noise on scores (default %(default)s)")
    parser.add_argument("--bias", type=float, default=0.5,
                        help="per-rater offsets spread over [-B, +B] (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the raters' noise (default %(default)s)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per prompt (default %(default)s)")
    parser.add_argument("--pace", type=int, default=None,
                        help="after every N ratings wait for the worker to publish a version trained on them")
    parser.add_argument("--pace-lag", type=int, default=1,
                        help="blocks the room may run ahead of training: 1 waits for each block's version, 2 "
                             "rates the next block while the worker trains on the last (default %(default)s)")
    parser.add_argument("--pace-timeout", type=float, default=600.0,
                        help="longest wait for the worker per --pace block, seconds (default %(default)s)")
    parser.add_argument("--no-prefer", dest="prefer", action="store_false", help="rate only, never /prefer")
    parser.add_argument("--rater-prefix", default="sim", help="raters are named PREFIX-01, PREFIX-02, ...")
    parser.add_argument("--csv", default="simulate.csv", help="one row per rating (default %(default)s)")
    parser.add_argument("--plot", default="simulate.png", help="PNG of taste vs ratings given; '' for none")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preference = parse_preference(args.preference)
        ratings = 100 if args.ratings is None and args.duration is None else args.ratings
        sim = Simulation(args.url, preference, raters=args.raters, ratings=ratings, duration=args.duration,
                         candidates=args.candidates, noise=args.noise, bias=args.bias, seed=args.seed,
                         rater_prefix=args.rater_prefix, pace=args.pace, pace_lag=args.pace_lag,
                         pace_timeout=args.pace_timeout,
                         prefer=args.prefer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = sim.run()
    rows = version_summary(result.records)
    print(format_summary(rows))
    write_csv(result.records, args.csv)
    if args.plot:
        try:
            write_plot(result.records, args.plot, title=f"Simulated raters, preference {args.preference}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            args.plot = ""
    summary = {"preference": args.preference, "ratings": len(result.records), "preferences": result.preferences,
               "wall_s": round(result.wall_s, 1), "errors": len(result.errors),
               "error_messages": sorted({f"{c.endpoint}: {c.error}" for c in result.errors})[:10],
               "versions": [{k: (None if isinstance(v, float) and math.isnan(v) else
                                 round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
               "latency": latency_report(result), "csv": args.csv, "plot": args.plot or None}
    print(json.dumps(summary))
    for failure in result.failures:
        print(failure, file=sys.stderr)
    return 0 if not (result.errors or result.failures) else 1


if __name__ == "__main__":
    sys.exit(main())
