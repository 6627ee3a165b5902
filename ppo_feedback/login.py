"""The login's guard: each attempt is hashed off the event loop, and guessing is refused for a while.

Gradio's `/login` route is `async`: it awaits an auth function that is a coroutine function, and calls
any other one on the event loop, where 600,000 PBKDF2 rounds (~0.2 s) would freeze every user's
page. `LoginGuard.check` (a coroutine function, given to `launch(auth=...)`) hashes in a worker
thread, at most `hash_slots` at once. Before hashing, it refuses with HTTP 429 a user name with
`max_failures` failed logins in the last `window_s` seconds, or a client address with
`ADDRESS_FACTOR` times as many (checked again once the attempt has its hashing slot). An attempt
counts as failed while it is hashed (so many sent at once cannot slip through); a valid one then
clears its name's failures and takes back its address's one.

The client address reaches `check` through `CLIENT_ADDRESS`, which the page's request guard sets
for every request (`ppo_feedback.page.guards`): Gradio passes the auth function only the name and
password.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextvars import ContextVar

import anyio
from fastapi import HTTPException

from .auth import UserDirectory

CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("ppo_feedback_client_address", default=None)
"""The address of the client whose request is being served (None outside a request)."""
ADDRESS_FACTOR = 4
"""A client address may fail this many times as many logins as one user name (raters may share an address)."""
HASH_SLOTS = 2
"""Password checks hashed at once (each keeps one core busy for ~0.2 s)."""


class FailureWindow:
    """Failed logins per key (a user name, a client address) within a sliding time window.

    At most `max_keys` keys are remembered (the least recently failed are forgotten first), so a
    flood of made-up names cannot grow it without bound.
    """

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float], max_keys: int = 10_000):
        self.limit, self.window_s, self.clock, self.max_keys = limit, window_s, clock, max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        return times

    def retry_after(self, key: str) -> float:
        """Return the seconds until `key` may try again (0 when it may now)."""
        times = self._recent(key)
        if len(times) < self.limit:
            return 0.0
        return times[-self.limit] + self.window_s - self.clock()

    def failed(self, key: str) -> None:
        """Count one failed login of `key` now; returns nothing."""
        times = self._recent(key)
        times.append(self.clock())
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def clear(self, key: str) -> None:
        """Forget the failures of `key` (after it logged in); returns nothing."""
        self._failures.pop(key, None)

    def forgive(self, key: str) -> None:
        """Take back the newest failure counted for `key` (an attempt that turned out valid); returns nothing."""
        times = self._failures.get(key)
        if times:
            times.pop()


class LoginGuard:
    """Checks logins against a `UserDirectory` off the event loop, refusing names and addresses that
    failed too often lately (see the module's docstring)."""

    def __init__(self, users: UserDirectory, *, max_failures: int = 5, window_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, hash_slots: int = HASH_SLOTS):
        self.users = users
        self.by_name = FailureWindow(max_failures, window_s, clock)
        self.by_address = FailureWindow(max_failures * ADDRESS_FACTOR, window_s, clock)
        self._hashing = anyio.CapacityLimiter(hash_slots)

    def refusal(self, username: str, address: str | None) -> HTTPException | None:
        """Return the HTTP 429 (with the reason and Retry-After) that refuses a login of `username` from
        `address` now, after too many failures; None when it may be checked."""
        wait = max(self.by_name.retry_after(username), self.by_address.retry_after(address) if address else 0.0)
        if wait <= 0:
            return None
        seconds = math.ceil(wait)
        return HTTPException(status_code=429, headers={"Retry-After": str(seconds)}, detail=(
            f"Too many failed logins for this user name or from this address; try again in {seconds} s."))

    def _raise_if_refused(self, username: str, address: str | None) -> None:
        refused = self.refusal(username, address)
        if refused is not None:
            raise refused

    async def check(self, username: str, password: str) -> bool:
        """Return whether the login is valid (the auth function given to Gradio's `launch`); raise
        HTTPException 429 without checking it while the name or the client address is refused."""
        address = CLIENT_ADDRESS.get()
        self._raise_if_refused(username, address)  # cheap, before waiting for a hashing slot
        async with self._hashing:
            self._raise_if_refused(username, address)  # again: failures may have come in while it waited
            # counted as failed while it is hashed, so that attempts sent at once cannot all pass the check
            self.by_name.failed(username)
            if address:
                self.by_address.failed(address)
            valid = await anyio.to_thread.run_sync(self.users.check, username, password)
        if valid:
            self.by_name.clear(username)
            if address:
                self.by_address.forgive(address)
        return valid
