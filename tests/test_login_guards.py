"""The login and what every request passes first: hashing off the event loop, the same cost for unknown
names, guessing refused (429), removed users logged out, the Host check without logins, no public link
without logins, the upload limit and Gradio's cache cleaning (issue 18)."""
from __future__ import annotations

import asyncio
import hashlib
import threading

import httpx
import pytest
from gradio_client import Client

import app as app_module
from ppo_feedback import auth
from ppo_feedback.auth import DEFAULT_ITERATIONS, SCHEME, User, UserDirectory, write_users_file
from ppo_feedback.config import AppConfig
from ppo_feedback.login import ADDRESS_FACTOR, CLIENT_ADDRESS, LoginGuard
from ppo_feedback.page import DELETE_CACHE, FeedbackApp, build_demo, launch_options
from page_fixtures import serve, store  # noqa: F401  (fixtures)
from test_ui_support import PASSWORDS, SAMPLING, ScriptedServing, launch, write_users


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_in(url: str, name: str, password: str, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(f"{url}login", data={"username": name, "password": password})


def fake_hash(iterations: int) -> str:
    """A well-formed hash with `iterations` rounds that no password matches (computing none)."""
    return f"{SCHEME}${iterations}$" + "A" * 22 + "==$" + "A" * 43 + "="


# ------------------------------------------------------------------------------------- hashing

def test_the_login_hashes_off_the_event_loop(serve, tmp_path, monkeypatch):
    page = serve(users=write_users(tmp_path / "users.json"))
    seen = []
    real = hashlib.pbkdf2_hmac

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            seen.append(("event loop", threading.current_thread().name))
        except RuntimeError:
            seen.append(("worker thread", threading.current_thread().name))
        return real(*args, **kwargs)

    monkeypatch.setattr(auth.hashlib, "pbkdf2_hmac", recording)
    assert log_in(page.url, "ben", "wrong").status_code == 400
    assert log_in(page.url, "nobody", "wrong").status_code == 400
    assert log_in(page.url, "ben", PASSWORDS["ben"]).status_code == 200
    assert len(seen) == 3 and {where for where, _ in seen} == {"worker thread"}, seen


def test_hashing_runs_at_most_hash_slots_at_once(tmp_path, monkeypatch):
    guard = LoginGuard(write_users(tmp_path / "users.json"), max_failures=100, hash_slots=2)
    running, most = 0, 0
    lock = threading.Lock()
    real = hashlib.pbkdf2_hmac

    def counting(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real(*args[:3], 20_000)  # long enough to overlap
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(auth.hashlib, "pbkdf2_hmac", counting)

    async def many():
        return await asyncio.gather(*(guard.check("ben", f"guess {i}") for i in range(8)))

    assert asyncio.run(many()) == [False] * 8
    assert most == 2


def test_an_unknown_name_costs_as_many_rounds_as_a_real_user(tmp_path, monkeypatch):
    path = tmp_path / "users.json"
    write_users_file(path, {"ana": User("ana", fake_hash(DEFAULT_ITERATIONS), admin=True)})
    users = UserDirectory(path)
    rounds = []
    monkeypatch.setattr(auth.hashlib, "pbkdf2_hmac", lambda name, pw, salt, n: rounds.append(n) or b"\1" * 32)
    assert not users.check("ana", "guess") and not users.check("nobody", "guess")
    assert rounds == [DEFAULT_ITERATIONS, DEFAULT_ITERATIONS]
    # the dummy follows the file: cheap test users, a cheap dummy
    cheap = write_users(tmp_path / "cheap.json")
    rounds.clear()
    cheap.check("nobody", "guess")
    assert rounds == [1000]


# ------------------------------------------------------------------------------------ guessing

def test_guessing_a_password_is_refused_with_429_until_the_window_passes(serve, tmp_path):
    clock = FakeClock()
    page = serve(users=write_users(tmp_path / "users.json"), clock=clock,
                 config=AppConfig(login_max_failures=3, login_window=60))
    for _ in range(3):
        assert log_in(page.url, "ben", "wrong").status_code == 400
    refused = log_in(page.url, "ben", PASSWORDS["ben"])
    assert refused.status_code == 429 and "Too many failed logins" in refused.json()["detail"]
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert log_in(page.url, "ana", PASSWORDS["ana"]).status_code == 200  # another name still logs in
    clock.now += 61
    assert log_in(page.url, "ben", PASSWORDS["ben"]).status_code == 200


def test_one_address_guessing_many_names_is_refused(tmp_path):
    clock = FakeClock()
    guard = LoginGuard(write_users(tmp_path / "users.json"), max_failures=2, window_s=60, clock=clock)

    async def attempt(name, password, address="10.0.0.9"):
        CLIENT_ADDRESS.set(address)
        return await guard.check(name, password)

    for i in range(2 * ADDRESS_FACTOR):
        assert asyncio.run(attempt(f"name{i}", "guess")) is False
    with pytest.raises(Exception) as refused:
        asyncio.run(attempt("ana", PASSWORDS["ana"]))
    assert refused.value.status_code == 429
    assert asyncio.run(attempt("ana", PASSWORDS["ana"], address="10.0.0.10")) is True
    clock.now += 61
    assert asyncio.run(attempt("ana", PASSWORDS["ana"])) is True


def test_guesses_sent_at_once_cannot_slip_past_the_limit(tmp_path):
    guard = LoginGuard(write_users(tmp_path / "users.json"), max_failures=3)

    async def burst():
        return await asyncio.gather(*(guard.check("ben", f"guess {i}") for i in range(12)),
                                    return_exceptions=True)

    results = asyncio.run(burst())
    assert sum(r is False for r in results) == 3
    assert all(getattr(r, "status_code", None) == 429 for r in results if r is not False)


def test_raters_logging_in_at_once_from_one_address_are_not_refused(tmp_path):
    guard = LoginGuard(write_users(tmp_path / "users.json"), max_failures=3)  # 12 failures per address

    async def office():
        CLIENT_ADDRESS.set("10.0.0.1")
        return await asyncio.gather(*(guard.check(name, PASSWORDS[name]) for name in ["ana", "ben"] * 12))

    assert asyncio.run(office()) == [True] * 24


# ------------------------------------------------------------------------------ removed users

def test_a_removed_user_is_logged_out_on_the_next_request(serve, tmp_path):
    path = tmp_path / "users.json"
    page = serve(users=write_users(path))
    with httpx.Client() as browser:
        assert log_in(page.url, "ben", PASSWORDS["ben"], browser).status_code == 200
        assert browser.get(f"{page.url}config").status_code == 200
        api = Client(page.url, auth=("ben", PASSWORDS["ben"]), verbose=False)
        assert api.predict(api_name="/status")["serving_version"] == 0
        users = auth.read_users_file(path)
        del users["ben"]
        write_users_file(path, users)
        assert browser.get(f"{page.url}config").status_code == 401
        with pytest.raises(Exception):
            api.predict(api_name="/status")
        assert log_in(page.url, "ben", PASSWORDS["ben"]).status_code == 400


def test_a_removed_users_request_is_refused_by_the_controller(store, tmp_path):
    from types import SimpleNamespace

    from ppo_feedback.page import Forbidden

    path = tmp_path / "users.json"
    app = FeedbackApp(ScriptedServing(store, ["x"], tmp_path / "adapters"), store, SAMPLING, users=write_users(path))
    assert app.rater(SimpleNamespace(username="ben")) == "ben"
    write_users_file(path, {"ana": auth.read_users_file(path)["ana"]})
    with pytest.raises(Forbidden, match="no longer in the users file"):
        app.rater(SimpleNamespace(username="ben"))


# ------------------------------------------------------------------------- no logins: exposure

def test_a_public_link_without_logins_is_refused(monkeypatch, capsys, tmp_path):
    assert app_module.main(["--share", "--db", str(tmp_path / "f.db")]) == 2
    assert "--auth-file" in capsys.readouterr().err
    monkeypatch.setenv("GRADIO_SHARE", "true")
    assert app_module.main(["--db", str(tmp_path / "f.db")]) == 2
    assert "GRADIO_SHARE" in capsys.readouterr().err
    assert app_module.main(["--insecure-no-auth", "--db", str(tmp_path / "f.db")]) == 2  # no way round it


def test_the_page_never_asks_gradio_for_a_public_link_without_logins(store, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_SHARE", "true")  # Gradio reads it when launch() gets share=None
    app = FeedbackApp(ScriptedServing(store, ["x"], tmp_path / "adapters"), store, SAMPLING)
    assert launch_options(app)["share"] is False
    with_logins = FeedbackApp(ScriptedServing(store, ["x"], tmp_path / "adapters"), store, SAMPLING,
                              users=write_users(tmp_path / "users.json"))
    assert launch_options(with_logins, AppConfig(auth_file="users.json"))["share"] is True


def test_without_logins_only_this_machines_names_are_answered(serve, tmp_path):
    page = serve()
    port = page.url.rsplit(":", 1)[1].strip("/")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
        assert httpx.get(f"{page.url}config", headers={"host": host}).status_code == 200, host
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}"):
        refused = httpx.get(f"{page.url}config", headers={"host": host})
        assert refused.status_code == 403 and "DNS rebinding" in refused.json()["detail"], host
    refused = httpx.post(f"{page.url}gradio_api/call/rate", headers={"host": "attacker.example"},
                         json={"data": [1, 5, "", ""]})
    assert refused.status_code == 403


def test_with_logins_the_host_is_not_checked(serve, tmp_path):
    page = serve(users=write_users(tmp_path / "users.json"))
    assert httpx.get(f"{page.url}config", headers={"host": "rating.example.org"}).status_code == 401  # login, not 403


# ----------------------------------------------------------------------------- uploads, cache

def test_uploads_are_limited_and_the_cache_is_cleaned(serve, store, tmp_path):
    app = FeedbackApp(ScriptedServing(store, ["x"], tmp_path / "adapters"), store, SAMPLING)
    assert build_demo(app).delete_cache == DELETE_CACHE
    assert launch_options(app, AppConfig(max_upload_mb=2))["max_file_size"] == 2 * 1024 * 1024
    page = serve(config=AppConfig(max_upload_mb=1))
    small = httpx.post(f"{page.url}gradio_api/upload", files={"files": ("p.txt", b"a prompt\n" * 10)})
    assert small.status_code == 200
    big = httpx.post(f"{page.url}gradio_api/upload", files={"files": ("p.txt", b"x" * (1024 * 1024 + 10))})
    assert big.status_code == 413
