"""Bounds on the page's queue, so that one user cannot starve everyone else.

Gradio's queue holds at most `--queue-size` requests (`demo.queue(max_size=...)`; more are refused
with "the queue is full"). Model calls (`/generate`, `/generate_stream`, the Rate tab's Generate, the
Compare button) run one at a time; with logins, each user may have at most `--generations-per-user` of
them waiting or running, counted in Gradio's own queue when a request is queued, and the excess is
refused at once with a clear message (HTTP 422 with Gradio's validation-error body: `gradio_client`
raises a ValidationError carrying it). Without logins the page
serves the one person at the machine (loopback only), so only the queue's size bounds it.

Gradio has no per-user bound of its own; this wraps the one queue's `push` (Gradio 6.x `Queue.push`,
checked against the installed source) of a built page.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import gradio as gr

MODEL_GROUP = "model"
"""The concurrency id every model call shares (see api.QUEUES)."""


def too_many_message(limit: int) -> str:
    """Return the message a user gets when they already have `limit` model calls waiting or running."""
    return (f"You already have {limit} generation{'s' if limit != 1 else ''} waiting or running; "
            "wait for one to finish, then ask again.")


def model_calls_of(queue: Any, username: str) -> int:
    """Return how many model calls (`MODEL_GROUP`) of `username` wait in Gradio's queue or run now."""
    waiting = queue.event_queue_per_concurrency_id.get(MODEL_GROUP)
    running = (event for job in queue.active_jobs if job for event in job)
    events: Iterable[Any] = [*(waiting.queue if waiting is not None else ()), *running]
    return sum(1 for e in events if e.concurrency_id == MODEL_GROUP and e.username == username)


def bound_queue(demo: gr.Blocks, queue_size: int, per_user: int) -> None:
    """Make `demo`'s queue hold at most `queue_size` requests and each logged-in user at most `per_user`
    model calls (see the module's docstring); returns nothing."""
    demo.queue(max_size=queue_size)
    queue = demo._queue
    push = queue.push
    lock = asyncio.Lock()  # counting and queueing one push at a time: two at once cannot both slip in

    async def bounded_push(body: Any, request: Any, username: str | None):
        if username is None or body.fn_index is None:
            return await push(body, request, username)
        fn = demo.fns.get(body.fn_index)
        if fn is None or fn.concurrency_id != MODEL_GROUP:
            return await push(body, request, username)
        async with lock:
            if model_calls_of(queue, username) >= per_user:
                refusal = {"__type__": "validate", "is_valid": False, "parameter_name": "generations",
                           "message": too_many_message(per_user)}
                return False, [refusal], "validator_error"
            return await push(body, request, username)

    queue.push = bounded_push
