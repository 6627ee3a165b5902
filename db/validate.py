"""Input checks of the store: each returns the cleaned value or raises StoreError."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from db.errors import StoreError
from db.models import NAME_LENGTH


def text(value: object, what: str) -> str:
    """Return `value` unchanged if it is valid UTF-8 text (bytes are decoded strictly)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"The {what} is not valid UTF-8 text.") from None
    if not isinstance(value, str):
        raise StoreError(f"The {what} must be text, not {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"The {what} is not valid UTF-8 text.") from None
    if "\x00" in value:
        raise StoreError(f"The {what} contains a NUL character.")
    return value


def prompt_text(value: object, max_chars: int) -> str:
    """Return the prompt verbatim; it must be non-blank and at most `max_chars` characters."""
    value = text(value, "prompt")
    if not value.strip():
        raise StoreError("The prompt is empty.")
    if len(value) > max_chars:
        raise StoreError(f"The prompt has {len(value)} characters; the limit is {max_chars}.")
    return value


def comment(value: object, max_chars: int) -> str | None:
    """Return the comment verbatim, or None for no comment or a blank one."""
    if value is None:
        return None
    value = text(value, "comment")
    if len(value) > max_chars:
        raise StoreError(f"The comment has {len(value)} characters; the limit is {max_chars}.")
    return value if value.strip() else None


def name(value: object, what: str) -> str:
    """Return an identifier (rater, lease holder, metric name) without surrounding whitespace."""
    value = text(value, what).strip()
    if not value:
        raise StoreError(f"The {what} is empty.")
    if len(value) > NAME_LENGTH:
        raise StoreError(f"The {what} is longer than {NAME_LENGTH} characters.")
    return value


MAX_ID = 2**63 - 1
"""The largest id a database integer column holds (SQLite and PostgreSQL bigint)."""


def integer(value: object, what: str, minimum: int = 0) -> int:
    """Return `value` as int within minimum..MAX_ID (what a database integer holds); bools, floats and
    strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise StoreError(f"The {what} must be an integer, not {value!r}.")
    value = int(value)
    if value < minimum:
        raise StoreError(f"The {what} must be at least {minimum}, not {value}.")
    if value > MAX_ID:
        raise StoreError(f"The {what} must be at most {MAX_ID} (2**63 - 1), not {value}.")
    return value


def record_id(value: object, what: str) -> int:
    """Return a database id (a positive integer that fits a database integer)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > MAX_ID:
        raise StoreError(f"Unknown {what} id {value}.")
    return integer(value, f"{what} id", minimum=1)


def score(value: object) -> int:
    """Return a rating score: an integer from 1 to 5."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= int(value) <= 5:
        raise StoreError(f"A rating must be a whole number from 1 to 5, not {value!r}.")
    return int(value)


def finite(value: object, what: str) -> float:
    """Return `value` as a finite float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StoreError(f"The {what} must be a number, not {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise StoreError(f"The {what} must be finite, not {value}.")
    return value


def positive(value: object, what: str) -> float:
    """Return `value` as a finite float greater than zero."""
    value = finite(value, what)
    if value <= 0:
        raise StoreError(f"The {what} must be positive, not {value}.")
    return value


def integers(values: Iterable[object], what: str) -> list[int]:
    """Return a list of non-negative integers (e.g. token ids)."""
    return [integer(v, what) for v in values]


def floats(values: Iterable[object], what: str) -> list[float]:
    """Return a list of finite floats (e.g. logprobs)."""
    return [finite(v, what) for v in values]


def json_object(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """Return a JSON-serialisable dict with string keys, text valid UTF-8, numbers finite."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StoreError(f"The {what} must be a mapping, not {type(value).__name__}.")
    try:
        encoded = json.dumps(dict(value), allow_nan=False, ensure_ascii=False)
        encoded.encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise StoreError(f"The {what} cannot be stored as JSON: {exc}.") from None
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded
