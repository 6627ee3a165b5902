"""The app restarts its training-worker child whenever it exits, with a back-off, and says so."""
from __future__ import annotations

import sys
import time

import app
from ppo_feedback.supervisor import Supervisor


class FakeChild:
    """A child process that exits (code 1) after `lives` polls, or runs until terminated (`lives` None)."""

    pids = iter(range(1000, 2000))

    def __init__(self, lives: int | None):
        self.pid, self.lives, self.returncode = next(self.pids), lives, None

    def poll(self):
        if self.returncode is None and self.lives is not None:
            self.lives -= 1
            if self.lives <= 0:
                self.returncode = 1
        return self.returncode

    def terminate(self):
        self.returncode = -15

    kill = terminate

    def wait(self, timeout=None):
        return self.returncode


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_child_that_exits_is_restarted_with_a_growing_back_off_and_the_state_says_so():
    children = []

    def start():
        children.append(FakeChild(lives=1 if len(children) < 3 else None))  # three crashes, then it stays up
        return children[-1]

    supervisor = Supervisor(start, initial_backoff=0.05, max_backoff=0.1, poll_interval=0.01).start()
    try:
        wait_for(lambda: len(children) == 4 and supervisor.state().startswith("training worker running"))
        assert supervisor.restarts == 3
        assert supervisor.state() == "training worker running"  # no pid: raters see this line
    finally:
        supervisor.stop()
    assert children[-1].returncode == -15 and supervisor.state() == "training worker stopped"


def test_the_state_names_the_exit_code_and_the_wait_before_the_restart():
    supervisor = Supervisor(lambda: FakeChild(lives=1), initial_backoff=30, poll_interval=0.01).start()
    try:
        wait_for(lambda: supervisor.restarts == 1)
        assert supervisor.state() == "training worker exited with code 1; restart 1 in 30 s"
    finally:
        supervisor.stop()  # does not wait out the back-off


def test_a_child_that_cannot_start_is_retried():
    calls = []

    def start():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("fork failed")
        return FakeChild(lives=None)

    supervisor = Supervisor(start, initial_backoff=0.01, poll_interval=0.01).start()
    try:
        wait_for(lambda: supervisor.state().startswith("training worker running"))
    finally:
        supervisor.stop()


def test_the_app_restarts_a_real_worker_child_that_exits(monkeypatch):
    monkeypatch.setattr(app, "WORKER_MODULE", "ppo_feedback.__main__")  # exits at once after --help
    supervisor = app.supervise_worker(["--help"], initial_backoff=0.05, poll_interval=0.05)
    try:
        wait_for(lambda: supervisor.restarts >= 2, timeout=120)
    finally:
        supervisor.stop(timeout=10)
    assert supervisor.proc.poll() is not None


def test_the_status_panel_shows_the_supervisors_state_while_no_worker_holds_the_lease():
    from types import SimpleNamespace

    from ppo_feedback.page import FeedbackApp

    holder = SimpleNamespace(worker_note=lambda: "training worker exited with code 1; restart 2 in 4 s")
    absent = SimpleNamespace(present=False, state="stopped")
    assert FeedbackApp.worker_state(holder, absent) == "paused: training worker exited with code 1; restart 2 in 4 s"


def test_every_restarted_child_runs_under_one_worker_id_so_it_takes_the_lease_back_at_once(monkeypatch):
    started = []
    monkeypatch.setattr(app, "start_worker", lambda argv: (started.append(argv), (FakeChild(lives=1), None))[1])
    supervisor = app.supervise_worker(["--db=x"], initial_backoff=0.01, poll_interval=0.01)
    try:
        wait_for(lambda: len(started) >= 2)
    finally:
        supervisor.stop()
    ids = {arg for argv in started for arg in argv if arg.startswith("--worker-id=")}
    assert len(ids) == 1 and ids.pop().endswith(f":{app.os.getpid()}/worker")  # today: host:pid of each child
    given = []
    monkeypatch.setattr(app, "start_worker", lambda argv: (given.append(argv), (FakeChild(lives=None), None))[1])
    app.supervise_worker(["--worker-id=mine"], poll_interval=0.01).stop()
    assert given in ([], [["--worker-id=mine"]])


def test_the_app_releases_a_dead_childs_lease_at_once_so_the_panel_says_it_stopped(monkeypatch, tmp_path):
    from db import FeedbackStore

    store = FeedbackStore(tmp_path / "feedback.db")
    children = []

    def child_that_took_the_lease_and_died(argv):
        holder = next(a for a in argv if a.startswith("--worker-id=")).split("=", 1)[1]
        if not children:
            assert store.acquire_lease(holder, 600, state="training iteration 2 of 4")
        children.append(FakeChild(lives=3 if len(children) == 0 else None))
        return children[-1], None

    monkeypatch.setattr(app, "start_worker", child_that_took_the_lease_and_died)
    supervisor = app.supervise_worker([], store, initial_backoff=30, poll_interval=0.01)
    try:
        wait_for(lambda: supervisor.restarts == 1 and not store.worker_status().present)
        status = store.worker_status()  # today: "present", the dead worker's state, for up to --lease-ttl
        assert not status.present and status.state == "training worker exited with code 1; restart 1 in 30 s"
    finally:
        supervisor.stop()
        store.close()
