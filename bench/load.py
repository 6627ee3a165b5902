"""Load and faults: a room of simulated raters against the app while the worker trains.

    python bench/load.py [--model tiny|smollm2-135m|DIR] [--raters 16] [--duration 120] [--kill-worker]
                         [-- extra worker/app options, e.g. --min-new-feedback 16]

Starts the app with `--no-worker` and runs `python -m ppo_feedback.worker` itself (so it owns the
worker's pid), runs `--raters` simulated raters (`simulator`, through `gradio_client`
only) for `--duration` seconds while a status poller watches `/status`, then stops everything and
checks the store (read with `db.FeedbackStore`, as a checker) against what the clients saw:

- ratings per second; p50/p95/p99 latency of /rate and /generate (and the other endpoints);
- exactly-once: every (generation, rater) rating a client saw accepted is in the database exactly
  once, with that score, and no other rating of this run's generations by these raters is;
- with `--kill-worker`: the worker is SIGKILLed halfway through (in the middle of a round if one
  comes within a fifth of the duration) and started again (same
  `--worker-id`, so it takes its lease back at once): no client error, no lost rating, and the
  serving version only moves forward.

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


def wait_for_recovery(db: Path, runner: "WorkerRunner", timeout: float) -> dict[str, Any]:
    """After a restart, wait until the new worker holds the lease and has published a version (reading the
    store, as a checker); return the seconds each took from the restart (None if not within `timeout`)."""
    from db import FeedbackStore

    restarted = [e["at"] for e in runner.events if e["event"] == "started"][-1]
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


def run_load(*, model: str = "tiny", workdir: str | Path | None = None, raters: int = 16, duration: float = 120.0,
             kill_worker: bool = False, preference: str = "sentiment", candidates: int = 4, max_new_tokens: int = 16,
             noise: float = 0.5, bias: float = 0.5, seed: int = 0, worker_args: list[str] = (),
             app_args: list[str] = (), kill_at: float = 0.5, recovery_timeout: float = 180.0,
             log=print) -> dict[str, Any]:
    """Run the load (and, with `kill_worker`, fault) benchmark; return its report."""
    from db import FeedbackStore
    from simulator.report import check_exactly_once, latency_report
    from simulator.room import Simulation

    say = log or (lambda *_: None)
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="ppo-load-")) if own_dir else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(model, workdir)
    db, adapters, port = workdir / "feedback.db", workdir / "adapters", free_port()
    url = f"http://127.0.0.1:{port}/"
    app = subprocess.Popen(app_command(spec, port, db, adapters, candidates=candidates, max_new_tokens=max_new_tokens,
                                       extra=list(app_args)),
                           cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = WorkerRunner(worker_command(spec, db, adapters, max_new_tokens=max_new_tokens, extra=list(worker_args)),
                          workdir / "worker.log")
    killer: threading.Thread | None = None
    recovery: dict[str, Any] = {}
    try:
        worker.start()
        startup_s = wait_for_app(url, app)
        worker_s = wait_for_worker(url, worker)
        say(f"app up in {startup_s:.1f}s on {url} ({spec}), worker {worker_s:.1f}s later")
        sim = Simulation(url, preference, raters=raters, ratings=None, duration=duration, candidates=candidates,
                         noise=noise, bias=bias, seed=seed, rater_prefix="load", status_interval=0.5,
                         log=None)
        if kill_worker:
            def kill_and_restart() -> None:
                time.sleep(duration * kill_at)
                give_up = time.perf_counter() + duration * 0.2
                while not sim_state().startswith(("training", "fitting")) and time.perf_counter() < give_up:
                    time.sleep(0.1)  # kill it in the middle of a round when one comes soon
                state = sim_state()
                worker.kill()
                worker.events[-1]["worker_state"] = state
                say(f"worker SIGKILLed (it was: {state}); restarting it")
                worker.start()

            def sim_state() -> str:
                point = sim.latest_status()
                return point.worker_state if point else "unknown"

            killer = threading.Thread(target=kill_and_restart, name="worker-killer", daemon=True)
            killer.start()
        say(f"{raters} raters for {duration:.0f}s ...")
        result = sim.run()
        if killer is not None:
            killer.join(timeout=duration + 30)
            recovery = wait_for_recovery(db, worker, timeout=recovery_timeout)
            say(f"after the restart: {recovery}")
    finally:
        if killer is not None:
            killer.join(timeout=duration + 30)
        worker_code = worker.stop()
        stop_process(app)
    with FeedbackStore(db) as store:
        check = check_exactly_once(store, result.accepted, result.generations, [r.name for r in sim.raters])
        versions = [(v.version, v.status, _ts(v.created_at)) for v in store.list_versions()]
        counts = store.counts()
    serving = [p.serving_version for p in result.status]
    restarts = [e["at"] for e in worker.events if e["event"] == "started"][1:]
    after_restart = [v for v, _, at in versions if restarts and at > restarts[-1]]
    latency = latency_report(result)
    rating_span = max((r.time_s for r in result.records), default=0.0)
    report = {
        "bench": "load" + ("+kill-worker" if kill_worker else ""),
        "model": model, "raters": raters, "duration_s": duration, "wall_s": round(result.wall_s, 1),
        "ratings": len(result.records), "preferences": result.preferences,
        "ratings_per_s": round(len(result.records) / result.wall_s, 2) if result.wall_s else None,
        "generations": len(result.generations),
        "latency_ms": latency,
        "client_errors": len(result.errors), "error_examples": [c.error for c in result.errors[:5]],
        "rater_failures": result.failures,
        "retried_calls": sum(1 for c in result.calls if c.retries),
        "exactly_once": check,
        "store_counts": {k: counts[k] for k in ("generations", "ratings", "rating_revisions", "preferences")},
        "versions": [(v, status) for v, status, _ in versions],
        "versions_after_restart": after_restart,
        "recovery": recovery,
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
                      max_new_tokens=args.max_new_tokens, seed=args.seed, worker_args=worker_args)
    lat = report["latency_ms"]
    print(f"{report['ratings']} ratings in {report['wall_s']}s = {report['ratings_per_s']}/s by {args.raters} raters; "
          f"client errors {report['client_errors']}")
    for endpoint in ("/rate", "/generate", "/prefer", "/next_prompt", "/status"):
        if endpoint in lat:
            l = lat[endpoint]
            print(f"  {endpoint:<12} {l['calls']:>5} calls  p50 {l['p50_ms']} ms  p95 {l['p95_ms']} ms  "
                  f"p99 {l['p99_ms']} ms  errors {l['errors']}")
    c = report["exactly_once"]
    print(f"exactly once: {'ok' if c['ok'] else 'FAILED'} ({c['accepted']} accepted, {c['stored']} stored, "
          f"{c['missing']} missing, {c['duplicated']} duplicated, {c['unexpected']} unexpected)")
    print(f"versions {report['versions']}; serving versions seen {report['serving_versions_seen']} "
          f"(monotonic: {report['serving_version_monotonic']}); worker {report['worker']['events']}")
    print(json.dumps(report))
    ok = c["ok"] and report["client_errors"] == 0 and report["serving_version_monotonic"] and not report["rater_failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
