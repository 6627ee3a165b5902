"""What every request to the page passes before Gradio sees it: two ASGI middlewares.

- `LoopbackHostOnly`, on a page without logins bound to this machine: answers only requests whose
  `Host` header names this machine (localhost, 127.0.0.0/8, [::1], any port), so that a web site
  elsewhere cannot reach the page through a name of its own that resolves to 127.0.0.1 (DNS
  rebinding); others get 403 with the reason.
- `SessionGuard`, on a page with logins: ends the session of a user no longer in the users file (its
  Gradio token is forgotten, so this request and every later one is refused as logged out), and
  tells the login guard the client's address (`ppo_feedback.login.CLIENT_ADDRESS`).

`launch_options` hands them to Gradio as FastAPI middleware (`app_kwargs`).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import UserDirectory
from ..config import is_loopback
from ..login import CLIENT_ADDRESS


def host_name(host_header: str | None) -> str | None:
    """Return the host a `Host` header names, without port or brackets (None when there is none)."""
    if not host_header:
        return None
    try:
        return urlsplit("//" + host_header.strip()).hostname
    except ValueError:
        return None


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    """Answer a request with `status` and {"detail": message}, or close a websocket (policy violation)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)


class LoopbackHostOnly:
    """ASGI middleware: refuse (403) every request whose `Host` header does not name this machine."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = Headers(scope=scope).get("host")
            name = host_name(header)
            if name is None or not is_loopback(name):
                await _refuse(scope, receive, send, 403, (
                    f"This page runs without logins and answers only to localhost, 127.0.0.1 or [::1], not to the "
                    f"host {header!r}: a web site elsewhere must not reach it through a name of its own (DNS "
                    f"rebinding). Open it as http://127.0.0.1:<port>/, or run it with --auth-file."))
                return
        await self.app(scope, receive, send)


class SessionGuard:
    """ASGI middleware: end the sessions of users removed from the users file; note the client's address."""

    def __init__(self, app: ASGIApp, users: UserDirectory):
        self.app = app
        self.users = users

    def end_removed_session(self, scope: Scope) -> None:
        """Forget the Gradio login token of this request if its user is no longer in the users file."""
        gradio_app = scope.get("app")
        tokens, cookie_id = getattr(gradio_app, "tokens", None), getattr(gradio_app, "cookie_id", None)
        if not tokens or cookie_id is None:
            return
        cookies = cookie_parser(Headers(scope=scope).get("cookie", ""))
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            token = cookies.get(name)
            if token in tokens and not self.users.exists(tokens[token]):
                del tokens[token]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.end_removed_session(scope)
        client = scope.get("client")
        reset = CLIENT_ADDRESS.set(client[0] if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(reset)
