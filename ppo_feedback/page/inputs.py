"""What the page accepts from people and scripts: integers, prompt uploads, the built-in prompts,
and how errors caused by bad input are shown (as Gradio messages, never as a server error)."""
from __future__ import annotations

import functools
import html
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

BUILTIN_PROMPTS = Path(__file__).resolve().parent.parent / "prompts.txt"


class Forbidden(PermissionError):
    """An admin-only action asked for by someone who is not an admin."""


def builtin_prompts() -> list[str]:
    """Return the prompts shipped with the app (`ppo_feedback/prompts.txt`, one per line)."""
    return [line.rstrip() for line in BUILTIN_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_prompt_upload(text: str, filename: str = "") -> list[str]:
    """Return the prompts of an upload: JSONL with a "prompt" field (a .jsonl/.json file, or text whose
    first line is a JSON object), otherwise one prompt per non-blank line. Raises ValueError naming
    the offending line."""
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if not first:
        raise ValueError("The upload holds no prompts.")
    as_jsonl = filename.lower().endswith((".jsonl", ".json")) or first.startswith("{")
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not as_jsonl:
            prompts.append(line.rstrip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Line {number} is not valid JSON ({exc.msg}).") from None
        except ValueError:  # an integer longer than Python's limit on converting text to int
            raise ValueError(f"Line {number} holds a number of more than {sys.get_int_max_str_digits():,} "
                             "digits.") from None
        except RecursionError:
            raise ValueError(f"Line {number} nests arrays or objects too deeply to read.") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'Line {number} has no text field "prompt".')
        prompts.append(row["prompt"])
    return prompts


def as_int(value: Any, what: str) -> int:
    """Return an integral number as int (JSON clients may send 3.0); raise ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"The {what} must be an integer, not {value!r}.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"The {what} must be an integer, not {value!r}.")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"The {what} must be an integer, not {value!r}.")


def json_int(value: Any, what: str) -> int:
    """Return a JSON number that is a whole number as int (3 or 3.0); raise ValueError for anything else
    (text, true/false, fractions, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"The {what} must be a whole number, not {value!r}.")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"The {what} must be a whole number, not {value!r}.")
    return int(value)


def md_escape(text: str) -> str:
    """Return text that Markdown shows literally (for names the operator chose)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>&])", r"\\\1", text)


DATABASE_UNAVAILABLE = ("The database is unavailable just now; try again in a few seconds (sending the same "
                        "rating or submission again stores it once).")
"""What a request that met a database outage is told (a lost connection, a lock held past the busy timeout)."""


def database_unavailable(exc: BaseException) -> bool:
    """Return whether `exc` says the database could not be reached or stayed locked (worth retrying later),
    rather than that the request was wrong."""
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    return isinstance(exc, (OperationalError, PoolTimeout)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def shown_errors(fn: Callable) -> Callable:
    """Return `fn` with bad-input exceptions turned into gr.Error: ValueError (StoreError, PromptError,
    AdapterLoadError, ExportError, limits) and PermissionError (Forbidden), and a database outage into
    DATABASE_UNAVAILABLE. Anything else stays a server error. Generator functions keep streaming."""
    def convert(exc: Exception) -> gr.Error:
        if database_unavailable(exc):
            return gr.Error(DATABASE_UNAVAILABLE, print_exception=False)
        return gr.Error(html.escape(str(exc), quote=False), print_exception=False)  # toasts render HTML

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                if not isinstance(exc, (ValueError, PermissionError)) and not database_unavailable(exc):
                    raise
                raise convert(exc) from exc
        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            if not isinstance(exc, (ValueError, PermissionError)) and not database_unavailable(exc):
                raise
            raise convert(exc) from exc
    return wrapper
