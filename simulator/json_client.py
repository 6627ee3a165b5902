"""A client of the page's plain JSON routes (`POST /json/<name>`) with `gradio_client.Client.predict`'s
call shape, so a simulated rater can send its cheap calls there instead of through Gradio's queue."""
from __future__ import annotations

from typing import Any

import httpx

ARGUMENTS: dict[str, tuple[str, ...]] = {
    "/next_prompt": ("rater",),
    "/rate": ("generation_id", "score", "comment", "rater"),
    "/prefer": ("chosen_id", "rejected_ids", "rater"),
    "/status": (),
}
"""The positional arguments of each endpoint the simulator sends to a JSON route, in `/generate`'s order."""


class RouteRefused(Exception):
    """The app refused the call (a 4xx answer): a real error, never retried."""


class RetryLater(Exception):
    """The app could not serve the call just now (503: the database is unavailable); `retry_after_s` says when to
    try again. Sending the same rating again stores it once."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JsonClient:
    """Calls `POST <url>json/<name>` with `predict(*args, api_name="/name")`; returns the JSON answer, raises
    RouteRefused (4xx), RetryLater (503) or httpx's transport errors. `handler_ms` lists each answer's
    `Server-Timing` handler time."""

    def __init__(self, url: str, timeout_s: float = 60.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)
        self.handler_ms: list[tuple[str, float]] = []

    def predict(self, *args: Any, api_name: str) -> Any:
        names = ARGUMENTS[api_name]
        if len(args) > len(names):
            raise TypeError(f"{api_name} takes at most {len(names)} arguments")
        response = self.http.post(f"/json{api_name}", json=dict(zip(names, args)))
        if response.status_code == 503:
            raise RetryLater(_error_of(response), float(response.headers.get("retry-after", 1)))
        if 400 <= response.status_code < 500:
            raise RouteRefused(f"{response.status_code}: {_error_of(response)}")
        response.raise_for_status()
        timing = response.headers.get("server-timing", "")
        if timing.startswith("handler;dur="):
            self.handler_ms.append((api_name, float(timing.split("=", 1)[1])))
        return response.json()

    def close(self) -> None:
        """Close the HTTP connection pool; returns nothing."""
        self.http.close()


def _error_of(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:200]
