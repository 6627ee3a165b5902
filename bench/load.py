"""Load and faults: a room of simulated raters against the app while the worker trains.

    python bench/load.py [--model tiny|smollm2-135m|DIR] [--raters 16] [--duration 120] [--kill-worker]
                         [--db-outage SECONDS] [--db URL] [--rate-via json|gradio|both]
                         [-- extra worker/app options, e.g. --min-new-feedback 16]

Starts the app with `--no-worker` and runs `python -m ppo_feedback.worker` itself (so it owns the
worker's pid), runs `--raters` simulated raters (`simulator`: /generate through `gradio_client`;
/next_prompt, /rate and /prefer through the page's JSON routes, `POST /json/<name>`, or with
`--rate-via gradio` through Gradio's queue as well, or `both`: half the raters each way) for
`--duration` seconds while a status poller watches `/status`, then stops everything and checks the
store (read with `db.FeedbackStore`, as a checker) against what the clients saw:

- ratings per second; p50/p95/p99 latency of /rate (`/json/rate` through the JSON route) and
  /generate (and the other endpoints), and of the JSON routes' handler time (`Server-Timing`): the
  rest of a JSON call's latency is HTTP and waiting for a thread, the rest of a Gradio call's the queue;
- exactly-once: every (generation, rater) rating a client saw accepted is in the database exactly
  once, with that score, and no other rating of this run's generations by these raters is;
- with `--kill-worker`: the worker is SIGKILLed halfway through (in the middle of a round if one
  comes within a fifth of the duration) and started again (same
  `--worker-id`, so it takes its lease back at once): no client error, no lost rating, and the
  serving version only moves forward;
- with `--db-outage SECONDS`: the database is unavailable for that long at the same moment (see
  `bench/outage.py`: SQLite held under `BEGIN EXCLUSIVE`; PostgreSQL, given with `--db URL`, reached
  through a TCP gate that cuts and refuses every connection): the worker comes back by itself (holds
  its lease and publishes a version after the outage), no rating is lost (a refused one is a clear
  "database is unavailable" error, which the JSON client retries after Retry-After), and the serving
  version only moves forward.

Prints a few lines and one JSON line. `--model tiny` builds the test suite's tiny GPT-2 locally.
Torch runs one thread per process (OMP_NUM_THREADS=1 unless set): on a busy 2-core machine two
processes with two OpenMP threads each are several times slower than with one each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKER_ID = "bench-worker"


def split_at_dashes(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """Return (a bench's own arguments, the app's or worker's options after `--`) of `argv` (None: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def free_port() -> int:
    """Return a free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """Return the environment for the app and worker: offline, one torch thread unless the caller set one."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def wait_for_app(url: str, process: subprocess.Popen | None = None, timeout: float = 300.0) -> float:
    """Wait until the page answers on `url`; return the seconds it took. Raises if the process died or time ran out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process is not None and process.poll() is not None:
            err = process.stderr.read()[-4000:] if process.stderr else ""
            raise RuntimeError(f"the app exited with code {process.returncode} before serving:\n{err}")
        try:
            with urllib.request.urlopen(url + "config", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f}s")


def stop_process(process: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    """SIGTERM a process we started, SIGKILL it after `timeout`; return its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def resolve_model(model: str, workdir: Path) -> str:
    """Return a model spec: `tiny` is built into the work directory (no hub), anything else is passed through."""
    if model != "tiny":
        return model
    from ppo_feedback.local_models import build_gpt2

    return str(build_gpt2(workdir / "gpt2-tiny", "tiny"))


def app_command(model: str, port: int, db: Path, adapters: Path, *, candidates: int, max_new_tokens: int,
                extra: list[str] = (), worker: bool = False, log_level: str = "WARNING") -> list[str]:
    """Return the command line that starts app.py on loopback with these paths."""
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", model, "--device", "cpu", "--port", str(port),
           "--db", str(db), "--adapters-dir", str(adapters), "--num-candidates", str(candidates),
           "--max-new-tokens", str(max_new_tokens), "--log-level", log_level, *extra]
    return cmd if worker else [*cmd, "--no-worker"]


def worker_command(model: str, db: Path, adapters: Path, *, max_new_tokens: int, extra: list[str] = ()) -> list[str]:
    """Return the command line of a worker on the same store and adapters directory."""
    return [sys.executable, "-m", "ppo_feedback.worker", "--model", model, "--device", "cpu", "--db", str(db),
            "--adapters-dir", str(adapters), "--max-new-tokens", str(max_new_tokens), "--worker-id", WORKER_ID,
            "--log-level", "INFO", *extra]


class WorkerRunner:
    """The worker process the bench owns: start, SIGKILL, restart, stop."""

    def __init__(self, command: list[str], log_path: Path):
        self.command, self.log_path = command, log_path
        self.process: subprocess.Popen | None = None
        self.events: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()

    def start(self) -> None:
        with self.log_path.open("a") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=child_env(), stdout=log,
                                            stderr=subprocess.STDOUT)
        self.events.append({"event": "started", "pid": self.process.pid, "t_s": round(time.perf_counter() - self._t0, 2),
                            "at": time.time()})

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.events.append({"event": "SIGKILL", "pid": self.process.pid, "t_s": round(time.perf_counter() - self._t0, 2),
                            "at": time.time()})

    def stop(self) -> int | None:
        code = stop_process(self.process)
        if self.process is not None:
            self.events.append({"event": "stopped", "pid": self.process.pid, "code": code,
                                "t_s": round(time.perf_counter() - self._t0, 2)})
        return code


def wait_for_worker(url: str, runner: "WorkerRunner", timeout: float = 300.0) -> float:
    """Wait until /status shows a worker holding the lease; return the seconds it took."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if runner.process is not None and runner.process.poll() is not None:
            raise RuntimeError(f"the worker exited with code {runner.process.returncode}; see {runner.log_path}")
        if client.predict(api_name="/status")["worker"]["present"]:
            return time.perf_counter() - start
        time.sleep(0.5)
    raise TimeoutError(f"no worker held the lease within {timeout:.0f}s")


def _ts(moment: datetime) -> float:
    """Return a store timestamp as seconds since the epoch (naive ones, as SQLite returns them, are UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def wait_for_recovery(db: Path | str, runner: "WorkerRunner", timeout: float, since: float | None = None) -> dict[str, Any]:
    """After a restart (or, given `since`, after that moment: an outage's end), wait until the worker holds the
    lease with a heartbeat after it and has published a version after it (reading the store, as a checker);
    return the seconds each took (None if not within `timeout`)."""
    from db import FeedbackStore

    restarted = since if since is not None else [e["at"] for e in runner.events if e["event"] == "started"][-1]
    out: dict[str, Any] = {"lease_s": None, "first_version_s": None, "first_version": None}
    with FeedbackStore(db) as store:
        while time.time() - restarted < timeout:
            status = store.worker_status()
            if out["lease_s"] is None and status.present and status.holder == WORKER_ID \
                    and status.heartbeat_at is not None and _ts(status.heartbeat_at) > restarted:
                out["lease_s"] = round(time.time() - restarted, 1)
            newer = [v for v in store.list_versions() if _ts(v.created_at) > restarted]
            if newer:
                out["first_version_s"] = round(_ts(newer[0].created_at) - restarted, 1)
                out["first_version"] = newer[0].version
                break
            time.sleep(1.0)
    return out


def monotonic(values: list[int]) -> bool:
    """Return whether a sequence never decreases."""
    return all(b >= a for a, b in zip(values, values[1:]))


def handler_report(timings: list[tuple[str, float]]) -> dict[str, Any]:
    """Return per JSON route: calls and p50/p95/p99 of the handler time its `Server-Timing` reported (ms)."""
    from simulator.report import percentile

    out = {}
    for endpoint in sorted({e for e, _ in timings}):
        values = [ms for e, ms in timings if e == endpoint]
        out[f"/json{endpoint}"] = {"calls": len(values),
                                   **{f"p{q}_ms": round(percentile(values, q), 1) for q in (50, 95, 99)}}
    return out


def outage_errors(calls, outage: dict[str, Any], t0_epoch: float) -> dict[str, Any]:
    """Return what the clients saw of a database outage: failed calls and the clear ones among them (saying
    the database is unavailable), and the slowest successful rating that overlapped it."""
    from ppo_feedback.page.inputs import DATABASE_UNAVAILABLE

    start, end = outage["start"] - t0_epoch, outage["end"] - t0_epoch
    during = [c for c in calls if c.start_s <= end and c.start_s + c.latency_s >= start]
    failed = [c for c in calls if not c.ok]
    clear = [c for c in failed if DATABASE_UNAVAILABLE[:40] in (c.error or "")]
    ratings = [c.latency_s for c in during if c.ok and c.endpoint.endswith("/rate")]
    return {"calls_during": len(during), "failed": len(failed), "clear_outage_errors": len(clear),
            "other_errors": len(failed) - len(clear), "retried_during": sum(1 for c in during if c.retries),
            "slowest_rating_during_s": round(max(ratings), 2) if ratings else None}


def run_load(*, model: str = "tiny", workdir: str | Path | None = None, raters: int = 16, duration: float = 120.0,
             kill_worker: bool = False, preference: str = "sentiment", candidates: int = 4, max_new_tokens: int = 16,
             noise: float = 0.5, bias: float = 0.5, seed: int = 0, worker_args: list[str] = (),
             app_args: list[str] = (), kill_at: float = 0.5, recovery_timeout: float = 180.0,
             rate_via: str = "json", db_outage: float = 0.0, db_url: str | None = None,
             log=print) -> dict[str, Any]:
    """Run the load (and, with `kill_worker` or `db_outage` seconds, fault) benchmark; return its report.
    `db_url`: a PostgreSQL database to use (an empty one, or one this bench used before) instead of a new
    SQLite file in the work directory."""
    from bench.outage import TcpGate, hold_sqlite_lock, is_postgres
    from db import FeedbackStore
    from simulator.report import check_exactly_once, latency_report
    from simulator.room import Simulation

    if kill_worker and db_outage:
        raise ValueError("run --kill-worker and --db-outage separately: both would strike at the same moment")
    say = log or (lambda *_: None)
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="ppo-load-")) if own_dir else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(model, workdir)
    db, adapters, port = db_url or workdir / "feedback.db", workdir / "adapters", free_port()
    postgres = is_postgres(str(db))
    gate = None
    if postgres and db_outage:
        target = make_url(str(db))
        gate = TcpGate(target.host or "127.0.0.1", target.port or 5432)
    served_db = gate.url_for(str(db)) if gate else db  # what the app and the worker connect to
    url = f"http://127.0.0.1:{port}/"
    app = subprocess.Popen(app_command(spec, port, served_db, adapters, candidates=candidates,
                                       max_new_tokens=max_new_tokens, extra=list(app_args)),
                           cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = WorkerRunner(worker_command(spec, served_db, adapters, max_new_tokens=max_new_tokens,
                                         extra=list(worker_args)),
                          workdir / "worker.log")
    killer: threading.Thread | None = None
    recovery: dict[str, Any] = {}
    outage: dict[str, Any] = {}
    try:
        worker.start()
        startup_s = wait_for_app(url, app)
        worker_s = wait_for_worker(url, worker)
        say(f"app up in {startup_s:.1f}s on {url} ({spec}), worker {worker_s:.1f}s later")
        sim = Simulation(url, preference, raters=raters, ratings=None, duration=duration, candidates=candidates,
                         noise=noise, bias=bias, seed=seed, rater_prefix="load", status_interval=0.5,
                         rate_via=rate_via, log=None)

        def sim_state() -> str:
            point = sim.latest_status()
            return point.worker_state if point else "unknown"

        def wait_for_a_round() -> str:
            time.sleep(duration * kill_at)
            give_up = time.perf_counter() + duration * 0.2
            while not sim_state().startswith(("training", "fitting")) and time.perf_counter() < give_up:
                time.sleep(0.1)  # strike in the middle of a round when one comes soon
            return sim_state()

        if db_outage:
            def make_outage() -> None:
                state = wait_for_a_round()
                say(f"database unavailable for {db_outage:.0f}s (the worker was: {state})")
                held = gate.outage(db_outage) if gate else hold_sqlite_lock(db, db_outage)
                outage.update(held, worker_state=state, how="tcp gate" if gate else "BEGIN EXCLUSIVE")
                say("database back")

            killer = threading.Thread(target=make_outage, name="db-outage", daemon=True)
            killer.start()
        if kill_worker:
            def kill_and_restart() -> None:
                state = wait_for_a_round()
                worker.kill()
                worker.events[-1]["worker_state"] = state
                say(f"worker SIGKILLed (it was: {state}); restarting it")
                worker.start()

            killer = threading.Thread(target=kill_and_restart, name="worker-killer", daemon=True)
            killer.start()
        say(f"{raters} raters for {duration:.0f}s ...")
        t0_epoch = time.time()
        result = sim.run()
        if killer is not None:
            killer.join(timeout=duration + 30)
            recovery = wait_for_recovery(db, worker, timeout=recovery_timeout, since=outage.get("end"))
            say(f"after the {'outage' if db_outage else 'restart'}: {recovery}")
    finally:
        if killer is not None:
            killer.join(timeout=duration + 30)
        worker_code = worker.stop()
        stop_process(app)
        if gate is not None:
            gate.close()
    with FeedbackStore(db) as store:
        check = check_exactly_once(store, result.accepted, result.generations, [r.name for r in sim.raters])
        versions = [(v.version, v.status, _ts(v.created_at)) for v in store.list_versions()]
        counts = store.counts()
    serving = [p.serving_version for p in result.status]
    restarts = [e["at"] for e in worker.events if e["event"] == "started"][1:]
    after_restart = [v for v, _, at in versions if restarts and at > restarts[-1]]
    latency = latency_report(result)
    seen_outage = outage_errors(result.calls, outage, t0_epoch) if outage.get("end") else {}
    rating_span = max((r.time_s for r in result.records), default=0.0)
    report = {
        "bench": "load" + ("+kill-worker" if kill_worker else "") + ("+db-outage" if db_outage else ""),
        "model": model, "raters": raters, "duration_s": duration, "wall_s": round(result.wall_s, 1),
        "rate_via": rate_via, "database": "postgresql" if postgres else "sqlite",
        "ratings": len(result.records), "preferences": result.preferences,
        "ratings_per_s": round(len(result.records) / result.wall_s, 2) if result.wall_s else None,
        "generations": len(result.generations),
        "latency_ms": latency,
        "handler_ms": handler_report(result.handler_ms),
        "client_errors": len(result.errors), "error_examples": [c.error for c in result.errors[:5]],
        "rater_failures": result.failures,
        "retried_calls": sum(1 for c in result.calls if c.retries),
        "exactly_once": check,
        "store_counts": {k: counts[k] for k in ("generations", "ratings", "rating_revisions", "preferences")},
        "versions": [(v, status) for v, status, _ in versions],
        "versions_after_restart": after_restart,
        "recovery": recovery,
        "db_outage": {**{k: v for k, v in outage.items() if k not in ("start", "end")},
                      "seconds": round(outage["end"] - outage["start"], 1), **seen_outage} if outage.get("end") else {},
        "serving_versions_seen": sorted(set(serving)),
        "serving_version_monotonic": monotonic(serving),
        "status_polls": len(serving),
        "worker_absent_polls": sum(not p.worker_present for p in result.status),
        "last_rating_at_s": round(rating_span, 1),
        "worker": {"events": worker.events, "exit_code": worker_code,
                   "killed": any(e["event"] == "SIGKILL" for e in worker.events),
                   "restarted": sum(e["event"] == "started" for e in worker.events) > 1},
        "workdir": str(workdir),
    }
    if own_dir and check["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir"] = None
    return report


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_at_dashes(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built locally), smollm2-135m or a model spec")
    parser.add_argument("--raters", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of rating")
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL the worker halfway and restart it")
    parser.add_argument("--db-outage", type=float, default=0.0, metavar="SECONDS",
                        help="make the database unavailable this long halfway (SQLite: BEGIN EXCLUSIVE; "
                             "PostgreSQL: a TCP gate cuts and refuses connections)")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="a PostgreSQL database to use (default: a new SQLite file in the work directory)")
    parser.add_argument("--rate-via", choices=("json", "gradio", "both"), default="json",
                        help="send /next_prompt, /rate and /prefer to the JSON routes, through Gradio's queue, or "
                             "half the raters each way (default %(default)s)")
    parser.add_argument("--preference", default="sentiment")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the database, adapters and worker log here")
    args = parser.parse_args(argv)
    worker_args = extra or ["--min-new-feedback", "16", "--ppo-iterations", "2", "--batch-size", "8",
                            "--mini-batch-size", "8", "--ppo-epochs", "2"]
    report = run_load(model=args.model, workdir=args.workdir, raters=args.raters, duration=args.duration,
                      kill_worker=args.kill_worker, preference=args.preference, candidates=args.candidates,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, worker_args=worker_args,
                      rate_via=args.rate_via, db_outage=args.db_outage, db_url=args.db)
    lat = report["latency_ms"]
    print(f"{report['ratings']} ratings in {report['wall_s']}s = {report['ratings_per_s']}/s by {args.raters} raters; "
          f"client errors {report['client_errors']}")
    for endpoint in ("/json/rate", "/rate", "/generate", "/json/prefer", "/prefer", "/json/next_prompt",
                     "/next_prompt", "/status"):
        if endpoint in lat:
            l = lat[endpoint]
            print(f"  {endpoint:<18} {l['calls']:>5} calls  p50 {l['p50_ms']} ms  p95 {l['p95_ms']} ms  "
                  f"p99 {l['p99_ms']} ms  errors {l['errors']}")
    for endpoint, h in report["handler_ms"].items():
        print(f"  {endpoint:<18} handler time: p50 {h['p50_ms']} ms  p95 {h['p95_ms']} ms")
    if report["db_outage"]:
        print(f"database outage: {report['db_outage']}; after it: {report['recovery']}")
    c = report["exactly_once"]
    print(f"exactly once: {'ok' if c['ok'] else 'FAILED'} ({c['accepted']} accepted, {c['stored']} stored, "
          f"{c['missing']} missing, {c['duplicated']} duplicated, {c['unexpected']} unexpected)")
    print(f"versions {report['versions']}; serving versions seen {report['serving_versions_seen']} "
          f"(monotonic: {report['serving_version_monotonic']}); worker {report['worker']['events']}")
    print(json.dumps(report))
    # during a database outage, a call refused with the clear "database is unavailable" message is allowed
    allowed = report["db_outage"].get("clear_outage_errors", 0)
    recovered = not report["db_outage"] or report["recovery"].get("first_version") is not None
    ok = (c["ok"] and report["client_errors"] - allowed == 0 and report["serving_version_monotonic"]
          and not report["rater_failures"] and recovered)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
