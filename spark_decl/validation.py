"""Checking what event sources produce, before anything is written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from .context import SURROGATE
from .exceptions import InvalidEvent
from .types import Event

MAX_LENGTH = 255


def validate_event(candidate: object, *, source: str | None = None) -> Event[Any]:
    """Return ``candidate`` as an event, or raise :class:`InvalidEvent` naming what is wrong.

    A missing ``context`` becomes ``{}`` (in a copy; the input is never mutated). Extra keys
    are kept, as django-spark allowed.
    """
    if type(candidate) is dict and _is_valid(candidate):
        return candidate  # type: ignore[return-value]  # pyright: ignore[reportReturnType]
    origin = f" from source {source}" if source else ""
    if not isinstance(candidate, Mapping):
        raise InvalidEvent(
            f"Invalid event{origin}: expected a mapping with 'group' and 'key', "
            f"got {type(candidate).__name__} {_short(candidate)}."
        )
    for field in ("group", "key"):
        if field not in candidate:
            raise InvalidEvent(
                f"Invalid event{origin}: {field!r} is missing in {_short(candidate)}."
            )
        value = candidate[field]
        if not isinstance(value, str):
            raise InvalidEvent(
                f"Invalid event{origin}: {field!r} must be a str, "
                f"got {type(value).__name__} {_short(value)}."
            )
        if not value:
            raise InvalidEvent(f"Invalid event{origin}: {field!r} must not be empty.")
        if "\x00" in value:
            # SQLite would store it, PostgreSQL refuses it with a DataError: refuse it everywhere.
            raise InvalidEvent(
                f"Invalid event{origin}: {field!r} contains a NUL character: {_short(value)}."
            )
        if not value.isascii() and (found := SURROGATE.search(value)) is not None:
            # Likewise: it has no UTF-8 encoding (os.fsdecode() makes them of bad bytes).
            raise InvalidEvent(
                f"Invalid event{origin}: {field!r} contains a lone surrogate "
                f"({found.group()!r} at index {found.start()}): {_short(value)}."
            )
        if len(value) > MAX_LENGTH:
            raise InvalidEvent(
                f"Invalid event{origin}: {field!r} is {len(value)} characters long, "
                f"the maximum is {MAX_LENGTH}: {_short(value)}."
            )
    if "context" not in candidate or candidate["context"] is None:
        return cast("Event[Any]", {**candidate, "context": {}})
    return cast("Event[Any]", candidate)


def _is_valid(candidate: dict[Any, Any]) -> bool:
    """The common case, checked fast: a dict whose key and group are fine and which has a
    context. Anything else takes the slow path, which names the problem."""
    key = candidate.get("key")
    group = candidate.get("group")
    return (
        type(key) is str
        and type(group) is str
        and 0 < len(key) <= MAX_LENGTH
        and 0 < len(group) <= MAX_LENGTH
        and "\x00" not in key
        and "\x00" not in group
        and (key.isascii() or SURROGATE.search(key) is None)
        and (group.isascii() or SURROGATE.search(group) is None)
        and candidate.get("context") is not None
    )


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
