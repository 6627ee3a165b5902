"""Plain JSON routes beside the page: the cheap endpoints (the `ENDPOINTS` rows marked `json_route`)
served as `POST /json/<name>`, outside Gradio's queue.

Through `gradio_client` a rating joins Gradio's queue (`POST /gradio_api/queue/join`), waits for the
queue's loop to start it, and comes back over a server-sent-event stream: several requests and
event-loop turns per call, each of them waiting for the interpreter while a model call decodes in
the same process. A JSON route answers in one request and runs the very same function
(`api.endpoint_call`, so the same checks: shown-to, number bounds, admin rights) in a worker thread.

The body is a JSON object of the endpoint's arguments by name ({} or no body when it takes none);
the answer is what the Gradio endpoint returns, with a `Server-Timing: handler;dur=<ms>` header (the
time spent in the function). With logins, the user is the one of Gradio's login cookie, the same
session as the page's (the `SessionGuard` middleware ends the session of a user no longer in the
users file, and the controller checks the file again). Errors are {"error": message} with 400 (bad
input), 401 (not logged in), 403 (not allowed), 404 (no such route), 413 (body over `MAX_BODY_BYTES`)
or 503 (the database is unavailable just now; with Retry-After).
"""
from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import Any

import gradio as gr
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api import ENDPOINTS, Api, Endpoint, endpoint_call
from .controller import FeedbackApp
from .inputs import DATABASE_UNAVAILABLE, database_unavailable

PREFIX = "/json"
"""The path every JSON route starts with: `POST /json/<endpoint name>`."""
MAX_BODY_BYTES = 256 * 1024
"""The largest request body a JSON route reads (a page's judgement is a few kilobytes)."""
RETRY_AFTER_S = 5
"""Seconds a client is asked to wait after a database outage (503)."""


class RouteError(Exception):
    """A request a JSON route refuses: its HTTP status and the message shown."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> JSONResponse:
    """Return the JSON error answer {"error": message} with `status` (Retry-After on 503)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def logged_in_user(request: Request) -> str | None:
    """Return the user of the request's Gradio login cookie (None when it has none, or an ended one)."""
    gradio_app = request.scope.get("app")
    tokens, cookie_id = getattr(gradio_app, "tokens", None) or {}, getattr(gradio_app, "cookie_id", None)
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        token = request.cookies.get(name)
        if token in tokens:
            return tokens[token]
    return None


async def read_arguments(request: Request) -> dict[str, Any]:
    """Return the request body's JSON object of arguments ({} for an empty body); raise RouteError for a
    body too large, not JSON, holding numbers too long or nesting too deep to read, or not an object."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise RouteError(413, f"The request body is larger than {MAX_BODY_BYTES:,} bytes.")
    if not body.strip():
        return {}
    try:
        arguments = json.loads(bytes(body))
    except RecursionError:
        raise RouteError(400, "The request body nests arrays or objects too deeply to read.") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer longer than Python reads
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise RouteError(400, f"The request body is not JSON that can be read: {reason}.") from None
    if not isinstance(arguments, dict):
        raise RouteError(400, "The request body must be a JSON object of the endpoint's arguments by name.")
    return arguments


def _bad_arguments(endpoint: Endpoint, call: Callable, arguments: dict[str, Any]) -> str | None:
    """Return why `arguments` do not fit the endpoint (unknown or missing names), or None when they do."""
    accepted = [p for p in inspect.signature(call).parameters.values() if p.name != "request"]
    names = {p.name for p in accepted}
    unknown = sorted(set(arguments) - names)
    missing = [p.name for p in accepted if p.default is inspect.Parameter.empty and p.name not in arguments]
    if not unknown and not missing:
        return None
    takes = ", ".join(p.name for p in accepted) or "no arguments"
    what = f"unknown argument(s) {unknown}" if unknown else f"missing argument(s) {missing}"
    return f"/{endpoint.name}: {what}; it takes {takes}."


def json_route(app: FeedbackApp, api: Api, endpoint: Endpoint) -> Route:
    """Return the `POST /json/<name>` route serving one ENDPOINTS row (see the module's docstring)."""
    call = endpoint_call(api, endpoint)
    takes_request = "request" in inspect.signature(call).parameters

    async def serve(request: Request) -> Response:
        try:
            username = None
            if app.users is not None:
                username = logged_in_user(request)
                if username is None:
                    raise RouteError(401, "Log in first (POST /login with username and password).")
            arguments = await read_arguments(request)
            refused = _bad_arguments(endpoint, call, arguments)
            if refused:
                raise RouteError(400, refused)
            if takes_request:
                arguments["request"] = gr.Request(request=request, username=username)
            start = time.perf_counter()
            result = await run_in_threadpool(call, **arguments)
            handler_ms = (time.perf_counter() - start) * 1000
        except RouteError as exc:
            return error_response(exc.status, exc.message)
        except PermissionError as exc:  # Forbidden: "Log in first." or not an admin
            return error_response(401 if app.users is not None and not username else 403, str(exc))
        except ValueError as exc:
            return error_response(400, str(exc))
        except Exception as exc:
            if database_unavailable(exc):
                return error_response(503, DATABASE_UNAVAILABLE)
            raise
        return JSONResponse(result, headers={"Server-Timing": f"handler;dur={handler_ms:.1f}"})

    return Route(f"{PREFIX}/{endpoint.name}", serve, methods=["POST"], name=f"json_{endpoint.name}")


def json_routes(app: FeedbackApp) -> list[Route]:
    """Return the JSON routes of every ENDPOINTS row marked `json_route` (for FastAPI's `routes`)."""
    api = Api(app)
    return [json_route(app, api, endpoint) for endpoint in ENDPOINTS if endpoint.json_route]
