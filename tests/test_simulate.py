"""Simulated raters: the pure taste and score functions, and short runs against a launched app (tiny model).

The runs assert bookkeeping only (exact counts, exactly-once in the store, the CSV), not learning.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulator import lexicon
from simulator.raters import (
    Preference,
    ScriptedRater,
    keyword_taste,
    length_taste,
    parse_preference,
    rater_biases,
    regex_taste,
    score_from_taste,
    sentiment_taste,
)
from simulator.report import CSV_COLUMNS, check_exactly_once, percentile, t_interval, version_summary, write_csv
from simulator.room import RatingRecord, Simulation

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ tastes

@pytest.mark.parametrize("text, word, expected", [
    ("I am so happy today", "happy", 1.0),
    ("HAPPY days", "happy", 1.0),
    ("Happy, happy, joy.", "happy", 1.0),
    ("unhappy people", "happy", 0.0),
    ("happyness is not a word", "happy", 0.0),
    ("", "happy", 0.0),
    ("the sun rises", "sun", 1.0),
    ("a sunny day", "sun", 0.0),
    ("C++ is fun", "C++", 1.0),
])
def test_keyword_taste_matches_whole_words_in_any_case(text, word, expected):
    assert keyword_taste(text, word) == expected


@pytest.mark.parametrize("n_words, target, expected", [(10, 10, 1.0), (5, 10, 0.5), (15, 10, 0.5), (0, 10, 0.0),
                                                        (20, 10, 0.0), (35, 10, 0.0), (3, 4, 0.75)])
def test_length_taste_is_one_at_the_target_and_falls_linearly(n_words, target, expected):
    assert length_taste(" ".join(["word"] * n_words), target) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("The table is in the kitchen.", 0.5),
    ("What a wonderful, happy day!", 0.5 + 2 / 6),
    ("It was a wonderful, happy, lovely, great day!", 1.0),
    ("A terrible, awful day.", 0.5 - 2 / 6),
    ("Bad, worse, worst, awful, horrible.", 0.0),
    ("This is not good.", 0.5 - 1 / 6),
    ("Honestly, not bad at all.", 0.5 + 1 / 6),
    ("I don't hate it.", 0.5 + 1 / 6),
    ("Good but sad.", 0.5),
])
def test_sentiment_taste_counts_lexicon_words_with_negation(text, expected):
    assert sentiment_taste(text) == pytest.approx(expected)


def test_the_lexicon_is_small_disjoint_and_lower_case():
    assert 100 < len(lexicon.POSITIVE) < 1000 and 100 < len(lexicon.NEGATIVE) < 1000
    assert not lexicon.POSITIVE & lexicon.NEGATIVE
    assert all(w == w.lower() and w.isalpha() for w in lexicon.POSITIVE | lexicon.NEGATIVE)
    assert lexicon.sentiment_counts("Happy HAPPY happy, sad\u2019s sad") == (3, 1)


def test_regex_taste_is_one_on_a_match():
    assert regex_taste("Call me at 555-1234", r"\d{3}-\d{4}") == 1.0
    assert regex_taste("no numbers here", r"\d") == 0.0
    assert regex_taste("Yes!", r"(?i)^yes") == 1.0


def test_parse_preference_builds_each_builtin_and_refuses_nonsense():
    assert parse_preference("keyword:sun")("The sun is up") == 1.0
    assert parse_preference("length:4")("one two three four") == 1.0
    assert parse_preference("sentiment")("great") == pytest.approx(0.5 + 1 / 6)
    assert parse_preference("regex:^A")("A start") == 1.0 and parse_preference("regex:^A")("no") == 0.0
    assert parse_preference("regex:a:b")("a:b") == 1.0  # only the first colon separates the kind
    assert parse_preference("keyword:sun") == Preference("keyword:sun", lambda t: 0.0)  # equal by spec
    for bad in ("", "keyword:", "keyword: ", "length:x", "length:0", "regex:(", "sentiment:3", "colour:red"):
        with pytest.raises(ValueError):
            parse_preference(bad)


# ------------------------------------------------------------------------------------------ scores

@pytest.mark.parametrize("taste, bias, noise, expected", [
    (0.0, 0.0, 0.0, 1), (1.0, 0.0, 0.0, 5), (0.5, 0.0, 0.0, 3), (0.25, 0.0, 0.0, 2), (0.75, 0.0, 0.0, 4),
    (1.0, 1.0, 0.0, 5), (0.0, -1.0, 0.0, 1), (0.5, 1.0, 0.0, 4), (0.5, -1.0, 0.0, 2), (0.5, 0.0, 0.6, 4),
    (0.5, 0.0, -0.4, 3), (0.5, 0.0, 9.0, 5), (0.5, 0.0, -9.0, 1), (0.125, 0.0, 0.0, 2),
])
def test_score_from_taste_rounds_and_clips_to_1_to_5(taste, bias, noise, expected):
    assert score_from_taste(taste, bias, noise) == expected


def test_rater_biases_spread_evenly():
    assert rater_biases(1, 0.8) == [0.0]
    assert rater_biases(3, 1.0) == [-1.0, 0.0, 1.0]
    assert rater_biases(5, 0.0) == [0.0] * 5
    with pytest.raises(ValueError):
        rater_biases(0, 1.0)


def test_a_rater_is_seedable_and_its_bias_shifts_scores():
    keyword = parse_preference("keyword:sun")
    texts = ["the sun", "rain", "sun and sun", "clouds"] * 25
    a = ScriptedRater("a", keyword, noise=0.7, seed=3).judge(texts)
    again = ScriptedRater("a", keyword, noise=0.7, seed=3).judge(texts)
    other = ScriptedRater("a", keyword, noise=0.7, seed=4).judge(texts)
    assert [j.score for j in a] == [j.score for j in again] and [j.score for j in a] != [j.score for j in other]
    assert [j.taste for j in a] == [1.0, 0.0, 1.0, 0.0] * 25
    exact = ScriptedRater("b", keyword).judge(texts[:4])
    assert [j.score for j in exact] == [5, 1, 5, 1]
    lenient = ScriptedRater("c", parse_preference("length:4"), bias=1.0).judge(["a b"])  # taste .5 -> 3, +1
    assert lenient[0].score == 4
    strict_mean = sum(j.score for j in ScriptedRater("d", keyword, bias=-1, noise=0.5, seed=1).judge(texts))
    kind_mean = sum(j.score for j in ScriptedRater("e", keyword, bias=1, noise=0.5, seed=1).judge(texts))
    assert kind_mean > strict_mean


def test_best_has_the_highest_taste_and_beats_only_worse_candidates():
    rater = ScriptedRater("a", parse_preference("keyword:sun"))
    best, beaten = rater.best(rater.judge(["rain", "sun", "fog"]))
    assert (best, beaten) == (1, [0, 2])
    assert rater.best(rater.judge(["rain", "fog"])) == (None, [])  # nothing stands out: no preference
    assert rater.best(rater.judge(["sun"])) == (None, [])
    best, beaten = rater.best(rater.judge(["sun", "rain", "sun"]))
    assert best in (0, 2) and beaten == [1]  # the other "sun" is as good, so it is not beaten
    noisy = ScriptedRater("b", parse_preference("keyword:sun"), noise=2.0, seed=5)
    for _ in range(20):  # noise moves the scores, never the order of tastes
        best, beaten = noisy.best(noisy.judge(["rain", "sun", "fog", "sun sun"]))
        assert best in (1, 3) and beaten == [0, 2]
        assert noisy.best(noisy.judge(["rain", "fog"])) == (None, [])


def test_statistics_helpers():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764451 * (2.5 ** 0.5) / 5 ** 0.5, rel=1e-6)  # t(0.975, 4)
    assert t_interval([2.0])[0] == 2.0


def test_version_summary_and_csv(tmp_path):
    records = [RatingRecord(0.1 * i, i + 1, "sim-01", 1, 100 + i, 0 if i < 4 else 1, float(i >= 6), 3)
               for i in range(8)]
    rows = version_summary(records)
    assert [(r["version"], r["n_ratings"], r["first_at"], r["ratings_so_far"]) for r in rows] == \
        [(0, 4, 1, 4), (1, 4, 5, 8)]
    assert rows[0]["mean_taste"] == 0.0 and rows[1]["mean_taste"] == 0.5
    path = write_csv(records, tmp_path / "out" / "sim.csv")
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        assert len(list(reader)) == 8


# ------------------------------------------------------------------------------ against an app

class InTurn:
    """A stand-in for random.Random whose choice() takes a sequence's items in turn."""

    def __init__(self):
        self.drawn = 0

    def choice(self, seq):
        self.drawn += 1
        return seq[(self.drawn - 1) % len(seq)]


class FakeClient:
    """An in-process stand-in for gradio_client.Client on a FeedbackStore (no model, no HTTP)."""

    def __init__(self, store, texts, version=0, fail_rate_every=0, serving=None, worker_state="paused", in_turn=False,
                 latest=None):
        self.store, self.texts, self.version, self.worker_state = store, texts, version, worker_state
        self.serving = serving or (lambda counts: self.version)  # the version /status reports
        self.latest = latest  # (version, status) of the newest version /status reports; default: the serving one
        self.fail_rate_every, self.calls = fail_rate_every, 0
        self.rng = InTurn() if in_turn else random.Random(0)  # in_turn: candidates take the texts in order

    def predict(self, *args, api_name):
        from gradio_client.exceptions import AppError

        if api_name == "/next_prompt":
            p = self.store.next_prompt(args[0])
            return {"prompt_id": p.id if p else None, "text": p.text if p else None}
        if api_name == "/generate":
            from db import NewGeneration

            prompt, n, rater = args
            pid = self.store.add_prompt(prompt, source="rater")
            gens = self.store.record_generations(pid, self.version,
                                                 [NewGeneration(self.rng.choice(self.texts)) for _ in range(n)],
                                                 rater=rater)
            return [{"generation_id": g.id, "prompt_id": pid, "page_id": g.page_id, "text": g.text,
                     "version": g.adapter_version} for g in gens]
        if api_name == "/rate":
            self.calls += 1
            if self.fail_rate_every and self.calls % self.fail_rate_every == 0:
                raise AppError("simulated refusal")
            gid, score, comment, rater = args
            self.store.rate(gid, rater, score, comment or None)
            return {"ok": True}
        if api_name == "/prefer":
            chosen, rejected, rater = args
            self.store.pick_best(chosen, rejected, rater)
            return {"ok": True}
        if api_name == "/status":
            c = self.store.counts()
            latest, status = self.latest or (self.serving(c), "published")
            return {"serving_version": self.serving(c), "latest_version": latest, "latest_status": status,
                    "worker": {"state": self.worker_state, "present": False}, "counts": c, "versions": []}
        raise AssertionError(api_name)


@pytest.fixture()
def store(tmp_path):
    from db import FeedbackStore
    from store_fixtures import migrated_sqlite_template

    shutil.copyfile(migrated_sqlite_template(), tmp_path / "feedback.db")
    s = FeedbackStore(tmp_path / "feedback.db")
    s.add_prompts([f"Pool prompt {i}" for i in range(6)])
    yield s
    s.close()


TEXTS = ["a happy day", "a sad day", "rain again", "happy happy sun"]


def test_the_room_stops_at_exactly_n_ratings_and_they_are_stored_once(store):
    sim = Simulation("fake", "keyword:happy", raters=3, ratings=23, candidates=4, noise=0.3, bias=0.5, seed=1,
                     client_factory=lambda url: FakeClient(store, TEXTS), log=None)
    result = sim.run()
    assert len(result.records) == 23 and len(result.accepted) == 23 and not result.errors
    assert sorted(r.ratings_so_far for r in result.records) == list(range(1, 24))
    assert {r.rater for r in result.records} == {"sim-01", "sim-02", "sim-03"}
    assert store.counts()["ratings"] == 23 and store.counts()["rating_revisions"] == 23
    check = check_exactly_once(store, result.accepted, result.generations, [r.name for r in sim.raters])
    assert check["ok"], check
    assert result.preferences > 0
    assert all(r.taste == keyword_taste(store.get_generation(r.generation_id).text, "happy")
               for r in result.records)


def test_refused_ratings_are_errors_not_records_and_the_check_sees_them(store):
    sim = Simulation("fake", "sentiment", raters=2, ratings=12, candidates=3, seed=2,
                     client_factory=lambda url: FakeClient(store, TEXTS, fail_rate_every=5), log=None)
    result = sim.run()
    assert len(result.records) == 12  # a refused rating frees its slot for another one
    assert [c.endpoint for c in result.errors] and {c.endpoint for c in result.errors} == {"/rate"}
    assert check_exactly_once(store, result.accepted, result.generations, ["sim-01", "sim-02"])["ok"]
    forged = dict(result.accepted)
    (gid, rater), score = next(iter(forged.items()))
    forged[(gid, rater)] = 1 if score != 1 else 2
    store.rate(gid, rater, forged[(gid, rater)])  # a second revision: duplicated, but current score matches
    bad = check_exactly_once(store, forged, result.generations, ["sim-01", "sim-02"])
    assert not bad["ok"] and bad["duplicated"] == 1
    del forged[(gid, rater)]
    assert check_exactly_once(store, forged, result.generations, ["sim-01", "sim-02"])["unexpected"] == 1


def test_a_room_with_a_duration_stops_in_time(store):
    sim = Simulation("fake", "length:3", raters=2, ratings=None, duration=0.5, candidates=2,
                     client_factory=lambda url: FakeClient(store, TEXTS), log=None)
    result = sim.run()
    assert result.wall_s < 5 and len(result.records) > 0
    assert check_exactly_once(store, result.accepted, result.generations, ["sim-01", "sim-02"])["ok"]


def test_pacing_waits_at_each_block_for_the_worker(store):
    clients = []

    def factory(url):
        clients.append(FakeClient(store, TEXTS))
        return clients[-1]

    sim = Simulation("fake", "keyword:sun", raters=2, ratings=10, candidates=3, pace=4, pace_timeout=0.5,
                     client_factory=factory, log=None)
    result = sim.run()
    assert len(result.records) == 10
    # blocks end at 4 and 8 ratings, and the final wait after 10; the fake worker never publishes
    assert [w["after_ratings"] for w in result.pace_waits] == [4, 8, 10]
    assert all(w["outcome"] == "timeout" for w in result.pace_waits)


def test_pacing_stops_waiting_when_the_worker_wants_more_feedback_than_is_left(store):
    sim = Simulation("fake", "keyword:sun", raters=2, ratings=10, candidates=3, pace=4, pace_timeout=60,
                     client_factory=lambda url: FakeClient(store, TEXTS, worker_state="waiting for 30 more ratings"),
                     log=None)
    sim.idle_grace_s = 0.3
    result = sim.run()
    assert len(result.records) == 10 and result.wall_s < 30  # not three 60 s timeouts
    assert [w["outcome"] for w in result.pace_waits] == ["the worker waits for more feedback"] * 3


@pytest.mark.parametrize("latest_status, outcome", [("failed", "the worker waits for more feedback"),
                                                    ("pending", "timeout")])
def test_pacing_does_not_wait_on_a_version_the_worker_refused(store, latest_status, outcome):
    """A newest version that failed (a diverged or not fluent round) is not in flight: the worker waiting for
    more feedback means no version is coming; one still in flight keeps the room waiting."""
    sim = Simulation("fake", "keyword:sun", raters=2, ratings=10, candidates=3, pace=4, pace_timeout=1.5,
                     client_factory=lambda url: FakeClient(store, TEXTS, worker_state="waiting for 30 more ratings",
                                                           latest=(1, latest_status)), log=None)
    sim.idle_grace_s = 0.3
    result = sim.run()
    assert len(result.records) == 10
    assert [w["outcome"] for w in result.pace_waits] == [outcome] * 3


@pytest.mark.parametrize("lag, waits", [(1, [4, 8, 10]), (2, [8, 10])])
def test_pacing_goes_on_once_the_worker_published_enough_versions(store, lag, waits):
    def one_version_per_started_block(counts):
        return -(-counts["ratings"] // 4)

    sim = Simulation("fake", "keyword:sun", raters=3, ratings=10, candidates=3, pace=4, pace_lag=lag,
                     pace_timeout=30, log=None,
                     client_factory=lambda url: FakeClient(store, TEXTS, serving=one_version_per_started_block))
    result = sim.run()
    assert len(result.records) == 10 and result.wall_s < 20
    assert [w["after_ratings"] for w in result.pace_waits] == waits  # lag 2: block 1 needs no version yet
    assert {w["outcome"] for w in result.pace_waits} == {"trained"}


def test_with_rate_via_both_half_the_raters_rate_through_the_json_routes(store):
    json_clients, texts = [], ["happy happy sun", "rain again"]  # every page of two has a best, so a /prefer

    def json_factory(url):
        client = FakeClient(store, texts, in_turn=True)
        client.handler_ms = [("/rate", 1.0)]
        json_clients.append(client)
        return client

    sim = Simulation("fake", "keyword:happy", raters=4, ratings=16, candidates=2, seed=4, rate_via="both",
                     client_factory=lambda url: FakeClient(store, texts, in_turn=True), json_factory=json_factory,
                     log=None)
    result = sim.run()
    assert len(json_clients) == 2 and len(result.records) == 16 and not result.errors
    assert {c.endpoint for c in result.calls} == {"/next_prompt", "/json/next_prompt", "/generate", "/rate",
                                                  "/json/rate", "/prefer", "/json/prefer"}
    assert result.handler_ms == [("/rate", 1.0)] * 2
    assert check_exactly_once(store, result.accepted, result.generations, [r.name for r in sim.raters])["ok"]
    with pytest.raises(ValueError, match="rate_via"):
        Simulation("fake", "sentiment", ratings=1, rate_via="smoke-signals")


def test_a_rating_answered_retry_later_is_sent_again_after_retry_after(store):
    from simulator.json_client import RetryLater

    class Outage(FakeClient):
        def predict(self, *args, api_name):
            if api_name == "/rate" and not getattr(self, "refused", False):
                self.refused = True
                raise RetryLater("The database is unavailable just now", 0.3)
            return super().predict(*args, api_name=api_name)

    sim = Simulation("fake", "sentiment", raters=1, ratings=2, candidates=2, rate_via="json", log=None,
                     client_factory=lambda url: FakeClient(store, TEXTS), json_factory=lambda url: Outage(store, TEXTS))
    result = sim.run()
    retried = [c for c in result.calls if c.retries]
    assert len(result.records) == 2 and not result.errors
    assert [c.endpoint for c in retried] == ["/json/rate"] and retried[0].latency_s >= 0.3


def test_the_tcp_gate_cuts_and_refuses_connections_during_an_outage():
    import socket
    import threading

    from bench.outage import TcpGate

    server = socket.create_server(("127.0.0.1", 0))

    def echo():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(100), b"")],
                             daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    gate = TcpGate("127.0.0.1", server.getsockname()[1])
    try:
        before = socket.create_connection(("127.0.0.1", gate.port), timeout=2)
        before.sendall(b"ping")
        assert before.recv(100) == b"ping"
        outage = threading.Thread(target=gate.outage, args=(1.0,))
        outage.start()
        time.sleep(0.3)
        assert before.recv(100) == b""  # cut
        during = socket.create_connection(("127.0.0.1", gate.port), timeout=2)
        assert during.recv(100) == b""  # refused: closed at once
        outage.join()
        after = socket.create_connection(("127.0.0.1", gate.port), timeout=2)
        after.sendall(b"pong")
        assert after.recv(100) == b"pong"
        assert gate.url_for("postgresql+psycopg://u:p@db.example:5432/x").endswith(f"@127.0.0.1:{gate.port}/x")
    finally:
        gate.close()
        server.close()


# --------------------------------------------------------------------- a launched app (tiny model)

def _launch_app(model_dir, tmp_path, port, *extra):
    from store_fixtures import migrated_sqlite_template

    db = tmp_path / "feedback.db"
    shutil.copyfile(migrated_sqlite_template(), db)
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", str(model_dir), "--device", "cpu", "--port", str(port),
           "--db", str(db), "--adapters-dir", str(tmp_path / "adapters"), "--max-new-tokens", "6",
           "--num-candidates", "3", "--log-level", "WARNING", *extra]
    return db, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_simulate_command_against_a_launched_app(tiny_model_dir, tmp_path):
    from bench.load import free_port, stop_process, wait_for_app
    from db import FeedbackStore

    port = free_port()
    db, app = _launch_app(tiny_model_dir, tmp_path, port, "--no-worker")
    try:
        wait_for_app(f"http://127.0.0.1:{port}/", app, timeout=120)
        out = subprocess.run(
            [sys.executable, "-m", "simulator", "--url", f"http://127.0.0.1:{port}/", "--raters", "2",
             "--ratings", "8", "--candidates", "3", "--preference", "regex:[aeiou]", "--seed", "3",
             "--csv", str(tmp_path / "sim.csv"), "--plot", str(tmp_path / "sim.png")],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["errors"] == 0 and not summary["error_messages"], out.stdout + out.stderr
        assert out.returncode == 0, out.stderr
    finally:
        stop_process(app)
    with (tmp_path / "sim.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 8 and {r["rater"] for r in rows} == {"sim-01", "sim-02"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "sim.png").stat().st_size > 1000
    with FeedbackStore(db) as store:
        assert store.counts()["ratings"] == 8 and store.counts()["rating_revisions"] == 8
        accepted = {(int(r["generation_id"]), r["rater"]): int(r["score"]) for r in rows}
        check = check_exactly_once(store, accepted, [g for g, _ in accepted], ["sim-01", "sim-02"])
        assert check["ok"], check
        for r in rows:
            assert store.get_generation(int(r["generation_id"])).adapter_version == int(r["version"])
    assert '"ratings": 8' in out.stdout


@pytest.mark.slow
def test_short_load_run_is_exactly_once_with_a_worker_killed_and_restarted(tiny_model_dir, tmp_path):
    from bench.load import run_load

    worker_args = ["--objective", "ppo", "--min-new-feedback", "4", "--ppo-iterations", "1", "--batch-size", "2",
                   "--mini-batch-size", "2", "--ppo-epochs", "1", "--reference-samples", "2", "--min-ratings", "4",
                   "--min-rated-prompts", "1"]
    report = run_load(model=str(tiny_model_dir), workdir=tmp_path, raters=3, duration=8.0, kill_worker=True,
                      candidates=2, max_new_tokens=4, recovery_timeout=0, worker_args=worker_args, log=None)
    assert report["exactly_once"]["ok"], report["exactly_once"]
    assert report["ratings"] > 0 and not report["rater_failures"]
    assert report["client_errors"] == 0 and not report["error_examples"], report["error_examples"]
    assert report["serving_version_monotonic"]
    assert report["worker"]["killed"] and report["worker"]["restarted"]


@pytest.mark.slow
def test_short_load_run_through_the_json_routes_survives_a_database_outage(tiny_model_dir, tmp_path):
    from bench.load import run_load

    worker_args = ["--objective", "ppo", "--min-new-feedback", "4", "--ppo-iterations", "1", "--batch-size", "2",
                   "--mini-batch-size", "2", "--ppo-epochs", "1", "--reference-samples", "2", "--min-ratings", "4",
                   "--min-rated-prompts", "1"]
    report = run_load(model=str(tiny_model_dir), workdir=tmp_path, raters=3, duration=10.0, db_outage=3.0,
                      kill_at=0.3, candidates=2, max_new_tokens=4, recovery_timeout=120, worker_args=worker_args,
                      rate_via="json", log=None)
    assert report["exactly_once"]["ok"], report["exactly_once"]
    assert report["ratings"] > 0 and not report["rater_failures"]
    assert report["latency_ms"]["/json/rate"]["calls"] > 0 and "/rate" not in report["latency_ms"]
    assert report["handler_ms"]["/json/rate"]["p95_ms"] > 0
    outage = report["db_outage"]
    assert outage["how"] == "BEGIN EXCLUSIVE" and outage["seconds"] >= 3.0 and outage["other_errors"] == 0, outage
    assert report["client_errors"] == outage["clear_outage_errors"], report["error_examples"]
    assert report["serving_version_monotonic"]
    assert report["recovery"]["first_version"] is not None, report["recovery"]  # the worker came back by itself


@pytest.mark.slow
def test_the_serving_bench_streams_pages_idle_and_while_a_ppo_process_trains(tiny_model_dir):
    """bench/serving.py end to end on the tiny model: its last line is the JSON the issue asks for."""
    done = subprocess.run([sys.executable, "bench/serving.py", "--model", str(tiny_model_dir), "--pages", "2",
                           "--candidates", "2", "--max-new-tokens", "4", "--repeats", "1", "--threads", "1"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("first_token_s", "page_s", "page_s_training", "tokens_per_s", "hf_generate_page_s",
                "hf_generate_tokens_per_s"):
        assert result[key] > 0, key
    assert result["first_token_s"] <= result["page_s"] and result["page_tokens"] <= 4
    assert result["logprob_gap_nats_per_token"] < 1e-4  # float32: the recorded log-probabilities are exact
    assert result["training"][0]["nice"] == 10 and result["training"][0]["iteration_s_alone"] > 0
    assert set(result["goals"]) == {"first_token_s", "page_s", "page_s_training", "tokens_per_s_vs_hf_generate"}
    assert all(isinstance(goal["met"], bool) for goal in result["goals"].values())


def test_the_learning_curve_records_its_commit_and_gives_the_app_its_threads(monkeypatch):
    import re

    from bench.learning_curve import app_env, source_commit

    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", source_commit())  # the checkout a report's run came from

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert app_env(2)["OMP_NUM_THREADS"] == "2" and app_env(1)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in app_env(0)  # torch's default: every core, as `python app.py` runs


def test_the_held_out_evaluation_of_the_base_has_kl_zero_and_its_entropy_as_expected_surprisal(tiny_model_dir):
    import math

    import torch

    from bench.learning_curve import evaluate_policy
    from ppo_feedback.config import LoraSettings, ModelConfig
    from ppo_feedback.generation import sample
    from ppo_feedback.modeling import add_lora, load_model
    from ppo_feedback.policy import PolicyWithValueHead

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    policy = PolicyWithValueHead(add_lora(loaded.model, LoraSettings(lora_r=4, lora_alpha=8)), loaded.tokenizer)
    prompts = ["Say hello.", "Name a colour."]
    result = evaluate_policy(policy, prompts, lambda text: float(len(text) > 3), samples=2, max_new_tokens=6,
                             temperature=1.0, top_p=1.0, seed=7, batch=4)
    assert len(result["kl"]) == 4 and max(abs(k) for k in result["kl"]) < 1e-4  # the base against itself
    rollout = sample(policy.peft_model, policy.tokenizer, [p for p in prompts for _ in range(2)], max_new_tokens=6,
                     temperature=1.0, top_p=1.0, seed=7)  # the same samples: one batch, seed + 0
    mask = rollout.response_mask
    entropy = policy.reference(rollout.query_response, rollout.attention_mask, rollout.context_length).entropy
    expected = math.exp(float((entropy * mask).sum() / mask.sum()))  # the base's own next token: its entropy
    sampled = math.exp(-float((rollout.logprobs * mask).sum() / mask.sum()))
    assert result["expected_base_perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["base_perplexity"] == pytest.approx(sampled, rel=1e-4)
    assert torch.isfinite(torch.tensor(result["per_prompt"])).all()


def test_distinct_bigram_share_counts_repeated_word_pairs_once():
    from bench.learning_curve import distinct_bigram_share

    # bigrams: (a b) (b c) | (a b) (b d) | none -> 3 distinct of 4
    assert distinct_bigram_share(["a b c", "A B d", "single"]) == pytest.approx(3 / 4)
    assert distinct_bigram_share(["same words", "same words"]) == pytest.approx(1 / 2)
    assert distinct_bigram_share(["", "one"]) == 0.0


def test_learning_curve_repeats_summarise_over_runs():
    from bench.learning_curve import summarize_runs

    def report(seed, difference, half, kl, newest):
        return {"seed": seed, "out": f"run-{seed}", "goal_met": difference - half > 0, "versions_published": newest,
                "total_s": 600 + seed, "preference": "keyword:you", "training": ["--wait-interval", "1", "--seed", str(seed)],
                "held_out": {"difference": {"mean": difference, "ci95": half}, "kl_newest": {"mean": kl},
                             "base_perplexity": {f"v{newest[-1] if newest else 0}": 12.0 + seed, "v0": 11.9},
                             "perplexity_ratio": 1.0 + seed / 10, "distinct_bigram_ratio": 0.9}}

    summary = summarize_runs([report(0, 0.30, 0.10, 8.0, [1, 2, 3]), report(1, 0.10, 0.12, 6.0, [1, 2]),
                              report(2, 0.20, 0.05, 7.0, [])])
    assert summary["seeds"] == [0, 1, 2] and summary["differences"] == [0.30, 0.10, 0.20]
    assert summary["difference_mean"] == pytest.approx(0.2)
    # sd 0.1 over 3 runs: t(0.975, 2) = 4.303, half-width 4.303 * 0.1 / sqrt(3)
    assert summary["difference_ci95"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, abs=2e-3)
    assert summary["goal_met"] == [True, False, True]
    # the third published nothing: its newest is v0 itself
    assert summary["kl"] == [8.0, 6.0, 7.0] and summary["base_perplexity"] == [12.0, 13.0, 11.9]
    assert summary["perplexity_ratio"] == [1.0, 1.1, 1.2] and summary["total_s"] == [600, 601, 602]
    single = summarize_runs([report(0, 0.30, 0.10, 8.0, [1])])
    assert single["difference_mean"] == pytest.approx(0.3) and single["difference_ci95"] is None


def test_learning_curve_refuses_an_out_folder_that_holds_a_run(tmp_path, capsys, monkeypatch):
    import bench.learning_curve
    from bench.learning_curve import main

    def no_run(*args, **kwargs):
        raise AssertionError("a run started in a folder that holds one")

    monkeypatch.setattr(bench.learning_curve, "run_once", no_run)

    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "feedback.db").write_bytes(b"an earlier run's store")
    for argv in (["--out", str(tmp_path / "run-2")], ["--out", str(tmp_path), "--repeats", "2"]):
        with pytest.raises(SystemExit):
            main(["--preference", "keyword:you", *argv])
        assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run-2" / "feedback.db").read_bytes() == b"an earlier run's store"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-2"]  # nothing started, nothing written


def test_learning_curve_summarizes_runs_made_apart_and_refuses_a_mixed_set(tmp_path, capsys):
    import json

    from bench.learning_curve import main, settings_of, without_seed
    from ppo_feedback.config import ObjectiveConfig

    assert without_seed(["--beta", "1", "--seed", "1", "--seed=2", "--rpo-alpha", "1"]) == \
        ["--beta", "1", "--rpo-alpha", "1"]

    def write(seed, options, recorded, threads=None, dtype=None):
        """A finished run's report.json; `recorded`: with the settings it ran with (runs since they are kept);
        `threads`: the app's torch threads it recorded (runs before it recorded them ran one); `dtype`: the base
        dtype it recorded, or "log:bfloat16" for a report from before, whose app.log says it loaded bfloat16."""
        report = {"seed": seed, "out": f"run-{seed}", "goal_met": True, "versions_published": [1], "total_s": 600,
                  "preference": "keyword:you", "training": [*options, "--seed", str(seed)],
                  "held_out": {"difference": {"mean": [0.3, 0.1, 0.2][seed], "ci95": 0.1}, "kl_newest": {"mean": 5.0},
                               "base_perplexity": {"v1": 12.0, "v0": 11.9}, "perplexity_ratio": 1.0,
                               "distinct_bigram_ratio": 0.9}}
        if recorded:  # as a run records them, once with its user's cache path (since ignored)
            report["settings"] = {**settings_of(options), "cache_dir": f"/home/user{seed}/.cache"}
        if threads is not None:
            report["threads"] = threads
        (tmp_path / str(seed)).mkdir(exist_ok=True)
        (tmp_path / str(seed) / "app.log").unlink(missing_ok=True)
        if dtype == "log:bfloat16":
            (tmp_path / str(seed) / "app.log").write_text("INFO ppo_feedback.modeling: base weights in bfloat16: ...\n")
        elif dtype is not None:
            report["base_dtype"] = dtype
        (tmp_path / str(seed) / "report.json").write_text(json.dumps(report))
        return str(tmp_path / str(seed))

    def summarize(*options, recorded=True, threads=(None, None, None), dtypes=(None, None, None)):
        runs = [write(seed, o, recorded, t, d) for (seed, o), t, d in zip(enumerate(options), threads, dtypes)]
        try:
            assert main(["--summarize", *runs]) == 0
        except SystemExit:
            return capsys.readouterr().err
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    default_beta = ["--beta", str(ObjectiveConfig().beta)]
    summary = summarize(["--wait-interval", "1"], [*default_beta, "--wait-interval", "1"], ["--wait-interval", "1.0"])
    assert summary["differences"] == [0.3, 0.1, 0.2] and summary["difference_mean"] == pytest.approx(0.2)
    assert summary["training"] == ["--wait-interval", "1"]  # a default spelled out, another order, 1.0: the same
    assert summary["commits"] == [None, None, None]  # runs from before reports named their commit
    assert "differ in taste, settings, threads" in summarize(["--wait-interval", "1"], ["--beta", "0.5"])
    assert summarize(["--wait-interval", "1"], ["--wait-interval", "1"], threads=(None, 1))["repeats"] == 2
    assert "differ in taste, settings, threads" in summarize(["--wait-interval", "1"], ["--wait-interval", "1"],
                                                            threads=(1, 0))
    # the base's dtype: recorded, or from before it was, the app's log (bfloat16) or float32 (auto without the line)
    same = (["--wait-interval", "1"], ["--wait-interval", "1"])
    assert "differ in taste, settings, threads or base dtype" in summarize(*same, dtypes=("bfloat16", "float32"))
    assert summarize(*same, dtypes=("bfloat16", "log:bfloat16"))["repeats"] == 2
    assert summarize(*same, dtypes=("float32", None))["repeats"] == 2
    assert "differ in" in summarize(*same, dtypes=("log:bfloat16", None))
    # a report from before settings were kept, of a run that asked for bfloat16 (no log line then): its option
    bf16 = ["--wait-interval", "1", "--dtype", "bfloat16"]
    assert summarize(bf16, bf16, recorded=False, dtypes=("bfloat16", None))["repeats"] == 2
    # reports from before settings were kept: the options they set, in any order, defaults being their day's
    assert summarize(["--beta", "0.5", "--wait-interval", "1"], ["--wait-interval", "1.0", "--beta", "0.5"],
                     recorded=False)["repeats"] == 2
    assert "differ in taste, settings, threads" in summarize(["--wait-interval", "1"],
                                                            [*default_beta, "--wait-interval", "1"], recorded=False)
    assert "are not today's app's" in summarize(["--wait-interval", "1"], ["--no-such-option", "1"], recorded=False)


def test_gate_noise_splits_prompts_into_rated_before_a_version_the_rest_of_the_pool_and_held_out(store, tmp_path):
    from bench.gate_noise import prompt_sets
    from bench.learning_curve import held_out_prompts
    from db import Cursor, NewGeneration, VersionRecord

    ids = {p.text: p.id for p in store.list_prompts()}
    store.publish_version(1, VersionRecord(0, "tiny", Cursor(), n_ratings=0, n_preferences=0), "adapters/v1")
    for text, version in (("Pool prompt 0", 0), ("Pool prompt 1", 1), ("Pool prompt 2", 0)):
        page = store.record_generations(ids[text], version, [NewGeneration(f"{text} a"), NewGeneration(f"{text} b")],
                                        rater="r1")
        if text != "Pool prompt 2":  # shown on v0, never rated: not trained on
            store.submit_page(page[0].page_id, "r1", {page[0].id: 4, page[1].id: 2})
    store.add_prompt("A rater's prompt waiting for review", source="rater", added_by="r1")
    sets = prompt_sets(tmp_path / "feedback.db", 1)
    assert sets["trained"] == ["Pool prompt 0"]
    assert sets["other pool"] == [f"Pool prompt {i}" for i in range(1, 6)]
    assert sets["held-out"] == held_out_prompts()
    assert prompt_sets(tmp_path / "feedback.db", 2)["trained"] == ["Pool prompt 0", "Pool prompt 1"]
