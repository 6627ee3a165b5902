"""The web page and its named API: rate candidates, watch the model learn, compare versions, operate.

- `controller.py`: `FeedbackApp`, what the page does as plain Python (identities, limits, store and
  model calls, the JSON the API returns);
- `layout.py`: the Gradio components, by tab;
- `handlers.py`: the page's events (load, status refresh, Generate, Submit, Compare, Operate);
- `api.py`: the named endpoints for scripts and `gradio_client`, from one table (`ENDPOINTS`);
- `inputs.py`: parsing and checking what people send, and how bad input is shown;
- `limits.py`: the bounds on the queue (its size, each user's model calls);
- `cards.py`: the Rate tab's cards as data (blind shuffled order, what a submission says, progress);
- `guards.py`: what every request passes first (the Host check without logins, sessions of removed users);
- `routes.py`: the cheap endpoints also as plain JSON routes beside the page (`POST /json/<name>`);
- `keyboard.js`, `keyboard.css`: the Rate tab's keyboard shortcuts.

Model text, prompts and comments are only ever shown in text boxes, never as HTML or Markdown.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from ..config import AppConfig, is_loopback
from ..login import LoginGuard

from .api import ENDPOINTS, register_endpoints
from .cards import version_label
from .controller import LOCAL_USER, FeedbackApp
from .guards import LoopbackHostOnly, SessionGuard
from .handlers import wire_page
from .inputs import Forbidden, builtin_prompts, parse_prompt_upload, shown_errors
from .layout import lay_out
from .limits import bound_queue
from .routes import json_routes

_HERE = Path(__file__).resolve().parent
KEYBOARD_HEAD = (f"<style>\n{(_HERE / 'keyboard.css').read_text(encoding='utf-8')}</style>\n"
                 f"<script>\n{(_HERE / 'keyboard.js').read_text(encoding='utf-8')}</script>\n")
"""What the page adds to its <head>: the keyboard shortcuts' style and script."""
DELETE_CACHE = (3600, 3600)
"""Gradio's `delete_cache` (every hour, the page's cached files, uploads and downloads, older than an hour)."""

__all__ = ["ENDPOINTS", "KEYBOARD_HEAD", "LOCAL_USER", "FeedbackApp", "Forbidden", "build_demo", "builtin_prompts",
           "launch_options", "parse_prompt_upload", "shown_errors", "version_label"]


def build_demo(app: FeedbackApp) -> gr.Blocks:
    """Return the page: Rate, Progress, Compare and (for admins) Operate, with the named API endpoints."""
    with gr.Blocks(title=app.title, delete_cache=DELETE_CACHE) as demo:
        page = lay_out(app)
        wire_page(app, page, demo)
        register_endpoints(app, page)
    bound_queue(demo, app.queue_size, app.generations_per_user)
    return demo


def launch_options(app: FeedbackApp, config: AppConfig | None = None, *,
                   clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Return the keyword arguments of `demo.launch` that the page needs, for the app's settings (`config`,
    default AppConfig(): bound to 127.0.0.1): the keyboard script, the upload limit, a public link only
    with logins and, with a users file, the login (hashed off the event loop, guessing refused, see
    `LoginGuard`, whose clock is `clock`) and the end of removed users' sessions; without one, the
    Host check (`LoopbackHostOnly`) when bound to this machine; and the JSON routes (`routes.py`)."""
    config = config or AppConfig()
    middleware: list[Middleware] = []
    options: dict[str, Any] = {"head": KEYBOARD_HEAD, "show_error": True, "share": False,
                               "max_file_size": int(config.max_upload_mb * 1024 * 1024)}
    if app.users is not None:
        guard = LoginGuard(app.users, max_failures=config.login_max_failures, window_s=config.login_window,
                           clock=clock)
        minutes = math.ceil(config.login_window / 60)
        options.update(auth=guard.check, share=config.public_link(), auth_message=(
            f"Log in to rate the model's answers. After {config.login_max_failures} failed logins, wait "
            f"{minutes} minute{'s' if minutes != 1 else ''} before the next try."))
        middleware.append(Middleware(SessionGuard, users=app.users))
    elif is_loopback(config.host):
        middleware.append(Middleware(LoopbackHostOnly))
    options["app_kwargs"] = {"middleware": middleware, "routes": json_routes(app)}
    return options
