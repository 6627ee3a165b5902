"""How much failed logins stall everyone else's requests: hashing on the event loop against off it.

    python bench/login_stall.py [--guessers 4] [--guesses 10] [--iterations 600000]

Serves a bare page with a users file hashed at `--iterations` rounds, once with the login as this
project gives it to Gradio (`launch_options`: hashed in a worker thread) and once with the plain
`UserDirectory.check` (what Gradio calls on its event loop, as before issue 18). In each,
`--guessers` clients send `--guesses` wrong logins each while a prober sends a cheap request
(`/gradio_api/login_check`) every 20 ms; prints the probes' p50, p95 and max latency and one JSON line.
The limit on failed logins is lifted for the run (it would refuse the guesses before hashing them).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr  # noqa: E402
import httpx  # noqa: E402

from ppo_feedback.auth import User, UserDirectory, hash_password, write_users_file  # noqa: E402
from ppo_feedback.config import AppConfig  # noqa: E402
from ppo_feedback.page import launch_options  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(users: UserDirectory, on_loop: bool, guessers: int, guesses: int) -> dict[str, float]:
    """Serve a bare page, guess and probe at once; return the probes' latencies (ms) and the run's length (s)."""
    options = launch_options(SimpleNamespace(users=users), AppConfig(login_max_failures=10**9))
    if on_loop:
        options["auth"] = users.check
    port = free_port()
    with gr.Blocks() as demo:
        gr.Markdown("bench")
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **options)
    url = f"http://127.0.0.1:{port}"
    done = threading.Event()
    latencies: list[float] = []

    def probe() -> None:
        with httpx.Client() as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get(f"{url}/gradio_api/login_check")
                latencies.append((time.perf_counter() - start) * 1000)
                time.sleep(0.02)

    def guess(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            for j in range(guesses):
                client.post(f"{url}/login", data={"username": "ana", "password": f"wrong {i} {j}"})

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.3)
    start = time.perf_counter()
    threads = [threading.Thread(target=guess, args=(i,)) for i in range(guessers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    done.set()
    prober.join()
    demo.close()
    return {"probe_p50_ms": round(statistics.median(latencies), 1),
            "probe_p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1), "probe_max_ms": round(max(latencies), 1),
            "probes": len(latencies), "guessing_s": round(elapsed, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guessers", type=int, default=4)
    parser.add_argument("--guesses", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=600_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "users.json"
        write_users_file(path, {"ana": User("ana", hash_password("right", args.iterations), admin=True)})
        users = UserDirectory(path)
        result = {"on_event_loop": run(users, True, args.guessers, args.guesses),
                  "worker_thread": run(users, False, args.guessers, args.guesses)}
    for name, row in result.items():
        print(f"{name:>14}: probe p50 {row['probe_p50_ms']} ms, p95 {row['probe_p95_ms']} ms, max {row['probe_max_ms']} ms "
              f"({row['probes']} probes, {row['guessing_s']} s of guessing)")
    print(json.dumps({"guessers": args.guessers, "guesses": args.guesses, "iterations": args.iterations, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
