"""The web page and its named API: rate candidates, watch the model learn, compare versions, operate.

- `controller.py`: `FeedbackApp`, what the page does as plain Python (identities, limits, store and
  model calls, the JSON the API returns);
- `layout.py`: the Gradio components, by tab;
- `handlers.py`: the page's events (load, status refresh, Generate, Submit, Compare, Operate);
- `api.py`: the named endpoints for scripts and `gradio_client`, from one table (`ENDPOINTS`);
- `inputs.py`: parsing and checking what people send, and how bad input is shown;
- `limits.py`: the bounds on the queue (its size, each user's model calls);
- `cards.py`: the Rate tab's cards as data (blind shuffled order, what a submission says, progress);
- `keyboard.js`, `keyboard.css`: the Rate tab's keyboard shortcuts.

Model text, prompts and comments are only ever shown in text boxes, never as HTML or Markdown.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from .api import ENDPOINTS, register_endpoints
from .cards import version_label
from .controller import LOCAL_USER, FeedbackApp
from .handlers import wire_page
from .inputs import Forbidden, builtin_prompts, parse_prompt_upload, shown_errors
from .layout import lay_out
from .limits import bound_queue

_HERE = Path(__file__).resolve().parent
KEYBOARD_HEAD = (f"<style>\n{(_HERE / 'keyboard.css').read_text(encoding='utf-8')}</style>\n"
                 f"<script>\n{(_HERE / 'keyboard.js').read_text(encoding='utf-8')}</script>\n")
"""What the page adds to its <head>: the keyboard shortcuts' style and script."""

__all__ = ["ENDPOINTS", "KEYBOARD_HEAD", "LOCAL_USER", "FeedbackApp", "Forbidden", "build_demo", "builtin_prompts",
           "launch_options", "parse_prompt_upload", "shown_errors", "version_label"]


def build_demo(app: FeedbackApp) -> gr.Blocks:
    """Return the page: Rate, Progress, Compare and (for admins) Operate, with the named API endpoints."""
    with gr.Blocks(title=app.title) as demo:
        page = lay_out(app)
        wire_page(app, page, demo)
        register_endpoints(app, page)
    bound_queue(demo, app.queue_size, app.generations_per_user)
    return demo


def launch_options(app: FeedbackApp) -> dict[str, Any]:
    """Return the keyword arguments of `demo.launch` that the page needs: login, keyboard script."""
    options: dict[str, Any] = {"head": KEYBOARD_HEAD, "show_error": True}
    if app.users is not None:
        options["auth"] = app.users.check
        options["auth_message"] = "Log in to rate the model's answers."
    return options
