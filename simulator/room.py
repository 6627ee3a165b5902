"""The room: K scripted raters against a running app, through `gradio_client` (and, with `rate_via`, the
page's plain JSON routes for the cheap calls), and what they saw."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .raters import Preference, ScriptedRater, parse_preference, rater_biases

FALLBACK_PROMPTS = ["Tell me something nice about your day.", "Describe your favourite place.",
                    "Write a short note to a friend."]
ENDPOINTS = ("/next_prompt", "/generate", "/rate", "/prefer", "/status", "/json/next_prompt", "/json/rate",
             "/json/prefer")
RATE_VIA = ("json", "gradio", "both")
"""Where raters send /next_prompt, /rate and /prefer: the JSON routes, Gradio's queue, or half the raters each."""
MAX_FAILED_ROUNDS = 10
"""A rater gives up after this many rounds in a row that failed (the app is gone)."""


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
    """One answer of `/status` as the status poller saw it."""

    time_s: float
    serving_version: int
    latest_version: int
    worker_state: str
    worker_present: bool
    ratings: int


@dataclass
class SimulationResult:
    """Everything a run of the room saw: ratings, calls, status answers, generations and waits."""

    records: list[RatingRecord]
    calls: list[Call]
    status: list[StatusPoint]
    generations: dict[int, int]  # generation id -> version, every candidate received
    accepted: dict[tuple[int, str], int]  # (generation id, rater) -> score the app accepted
    preferences: int
    wall_s: float
    pace_waits: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)  # raters that gave up, and why
    handler_ms: list[tuple[str, float]] = field(default_factory=list)  # JSON routes' Server-Timing: (endpoint, ms)

    @property
    def errors(self) -> list[Call]:
        """Return the calls that failed."""
        return [c for c in self.calls if not c.ok]

    def latencies(self, endpoint: str) -> list[float]:
        """Return the latencies in seconds of an endpoint's successful calls."""
        return [c.latency_s for c in self.calls if c.endpoint == endpoint and c.ok]


def _default_client_factory(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False)


def _default_json_factory(url: str) -> Any:
    from .json_client import JsonClient

    return JsonClient(url)


class Simulation:
    """K scripted raters against a running app, through `gradio_client` only."""

    def __init__(self, url: str, preference: Preference | str, *, raters: int = 4, ratings: int | None = 100,
                 duration: float | None = None, candidates: int = 4, noise: float = 0.5, bias: float = 0.5,
                 seed: int = 0, rater_prefix: str = "sim", pace: int | None = None, pace_lag: int = 1,
                 pace_timeout: float = 600.0,
                 status_interval: float | None = None, retries: int = 3, prefer: bool = True,
                 client_factory: Callable[[str], Any] = _default_client_factory, rate_via: str = "gradio",
                 json_factory: Callable[[str], Any] = _default_json_factory,
                 log: Callable[[str], None] | None = print):
        if ratings is None and duration is None:
            raise ValueError("give a number of ratings, a duration, or both")
        if ratings is not None and ratings < 1:
            raise ValueError("--ratings must be >= 1")
        if raters < 1 or candidates < 1 or (pace is not None and pace < 1) or pace_lag < 1:
            raise ValueError("--raters, --candidates, --pace and --pace-lag must be >= 1")
        if rate_via not in RATE_VIA:
            raise ValueError(f"rate_via must be one of {RATE_VIA}, not {rate_via!r}")
        self.url, self.candidates, self.target, self.duration = url, candidates, ratings, duration
        self.rate_via, self.json_factory = rate_via, json_factory
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
        # the cheap calls of rater i: the JSON routes (None: through Gradio); with "both", the even-numbered raters'
        cheap = [self.json_factory(self.url) if self.rate_via == "json" or (self.rate_via == "both" and i % 2 == 0)
                 else None for i in range(len(self.raters))]
        status_client = self.client_factory(self.url)
        self._t0 = time.perf_counter()
        if self.pace:
            self._start_version = self._call(status_client, "/status")["serving_version"]
        threads = [threading.Thread(target=self._rater_main, args=(r, c, j), name=r.name, daemon=True)
                   for r, c, j in zip(self.raters, clients, cheap)]
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
        handler_ms = [timing for j in cheap if j is not None for timing in getattr(j, "handler_ms", ())]
        for client in [*clients, *(j for j in cheap if j is not None), status_client]:
            close = getattr(client, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        return SimulationResult(records=list(self._records), calls=list(self._calls), status=list(self._status),
                                generations=dict(self._generations), accepted=dict(self._accepted),
                                preferences=self._preferences, wall_s=time.perf_counter() - self._t0,
                                pace_waits=list(self._pace_waits), failures=list(self._failures),
                                handler_ms=handler_ms)

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

    def _call(self, client: Any, endpoint: str, *args: Any, retry: bool = True, json_route: bool = False) -> Any:
        """Call an endpoint (recorded as /json/<name> when `client` is a JsonClient, `json_route`), retrying
        transport failures and "retry later" answers (after the Retry-After they give), never errors the
        app raised; record each outcome."""
        from gradio_client.exceptions import AppError

        from .json_client import RetryLater, RouteRefused

        label = f"/json{endpoint}" if json_route else endpoint
        attempts = 1 + (self.retries if retry else 0)
        start = time.perf_counter()
        error = None
        for attempt in range(attempts):
            try:
                result = client.predict(*args, api_name=endpoint)
            except (AppError, RouteRefused) as exc:  # the app said no: a real error, never retried
                error = f"{type(exc).__name__}: {exc}"
                break
            except Exception as exc:  # noqa: BLE001 - connection trouble, an outage: the call may be repeated
                error = f"{type(exc).__name__}: {exc}"
                if attempt + 1 < attempts and not self._stop.is_set():
                    time.sleep(max(0.2 * (attempt + 1), getattr(exc, "retry_after_s", 0.0)))
                    continue
                break
            else:
                with self._lock:
                    self._calls.append(Call(label, start - self._t0, time.perf_counter() - start, True,
                                            retries=attempt))
                return result
        with self._lock:
            self._calls.append(Call(label, start - self._t0, time.perf_counter() - start, False, error,
                                    retries=attempt))
        raise RuntimeError(f"{label}: {error}")

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
            # the worker wants more feedback (--min-new-feedback) than is left and nothing is in flight (the
            # newest version serves, or failed): waiting longer cannot bring a version, the room must rate on
            # (or, at the end, stop)
            if (status["worker"]["state"].startswith("waiting for")
                    and (status["latest_version"] == status["serving_version"]
                         or status["latest_status"] == "failed")):
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

    def _rater_main(self, rater: ScriptedRater, client: Any, cheap: Any = None) -> None:
        try:
            self._rate_until_done(rater, client, cheap)
        except Exception as exc:  # noqa: BLE001 - reported after the run
            message = f"{rater.name} gave up: {type(exc).__name__}: {exc}"
            self._say(message)
            with self._lock:
                self._failures.append(message)

    def _rate_until_done(self, rater: ScriptedRater, client: Any, cheap: Any = None) -> None:
        seen_prompts: list[str] = []
        failed_in_a_row = 0
        while not self._stop.is_set():
            n = self._reserve(self.candidates, client)
            if n == 0:
                return
            accepted = 0
            try:
                accepted = self._one_round(rater, client, n, seen_prompts, cheap)
                failed_in_a_row = 0
            except RuntimeError:
                failed_in_a_row += 1
                if failed_in_a_row >= MAX_FAILED_ROUNDS:
                    raise
                self._stop.wait(0.5)  # the failed call is recorded; try another round
            finally:
                self._release(n, accepted)

    def _one_round(self, rater: ScriptedRater, client: Any, n: int, seen_prompts: list[str], cheap: Any = None) -> int:
        """Prompt, generate n, rate each, prefer the best; return how many ratings the app accepted. The cheap
        calls (/next_prompt, /rate, /prefer) go to `cheap` (a JsonClient) when given, else to `client`."""
        via_json = cheap is not None
        cheap = cheap if via_json else client
        pool = self._call(cheap, "/next_prompt", rater.name, json_route=via_json)
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
                self._call(cheap, "/rate", gid, j.score, "", rater.name, json_route=via_json)
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
                self._call(cheap, "/prefer", int(items[best]["generation_id"]),
                           [int(items[i]["generation_id"]) for i in beaten], rater.name, json_route=via_json)
                with self._lock:
                    self._preferences += len(beaten)
            except RuntimeError:
                pass
        return accepted

