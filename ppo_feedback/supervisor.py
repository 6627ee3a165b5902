"""Keep the app's training-worker child running: restart it with a back-off whenever it exits.

`Supervisor(start)` calls `start()` (which returns a `subprocess.Popen`-like object: `poll`, `pid`,
`terminate`, `kill`, `wait`) from a background thread, watches it, and starts it again after it
exits (calling `on_exit(why)` first): after `initial_backoff` seconds, doubling up to `max_backoff`, back to `initial_backoff`
once a child has run `healthy_after` seconds. `state()` says what it is doing, for the status panel.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Supervisor:
    """Runs one child process and restarts it whenever it exits, until `stop()`."""

    def __init__(self, start: Callable[[], subprocess.Popen], *, initial_backoff: float = 1.0,
                 max_backoff: float = 60.0, healthy_after: float = 120.0, poll_interval: float = 0.5,
                 on_exit: Callable[[str], None] | None = None):
        self._start, self._on_exit = start, on_exit
        self.initial_backoff, self.max_backoff = initial_backoff, max_backoff
        self.healthy_after, self.poll_interval = healthy_after, poll_interval
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._state = "starting the training worker"
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> Supervisor:
        """Start the child and watch it from a background thread; return self."""
        self._thread.start()
        return self

    def state(self) -> str:
        """Return what the supervisor is doing: the child running, or waiting to restart it and why."""
        return self._state

    def _run(self) -> None:
        delay = self.initial_backoff
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self.proc = self._start()
                self._state = "training worker running"  # no pid: raters see this line (the holder, admins only, has it)
                while self.proc.poll() is None and not self._stopping.wait(self.poll_interval):
                    pass
                why = f"exited with code {self.proc.poll()}"
            except Exception as exc:  # the child could not even be started
                log.exception("could not start the training worker")
                why = f"could not start ({type(exc).__name__}; see the app's log)"  # no paths for raters
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= self.healthy_after:
                delay = self.initial_backoff
            self.restarts += 1
            self._state = f"training worker {why}; restart {self.restarts} in {delay:g} s"
            if self._on_exit is not None:
                try:
                    self._on_exit(self._state)
                except Exception:  # noqa: BLE001 - e.g. the database is down: the lease expires by itself
                    log.exception("the training worker's exit hook failed")
            log.error("the training worker %s; restarting it in %g s", why, delay)
            if self._stopping.wait(delay):
                return
            delay = min(self.max_backoff, delay * 2)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop restarting; ask the child to stop (SIGTERM) and kill it after `timeout` seconds; returns nothing."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        self._state = "training worker stopped"
        stop_worker(proc, timeout)
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def stop_worker(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """Ask a worker process to stop (SIGTERM), kill it after `timeout` seconds; returns nothing."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
