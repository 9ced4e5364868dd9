"""Storing an event's context as JSON and rebuilding it for retries.

Model instances are stored as references (app label, model name, primary key) and fetched
again when the context is rebuilt. JSON scalars, lists, tuples (rebuilt as lists),
string-keyed dicts, ``date``, ``datetime``, ``time``, ``timedelta``, ``Decimal`` and ``UUID``
round-trip to equal values of the same type. Anything else is refused with
:class:`~spark_decl.exceptions.InvalidContext` when the event is claimed, and so is what
one of the supported databases, or a later reader, could not take: strings containing NUL
or a lone surrogate, ints of more than 4300 digits, nesting more than :data:`MAX_DEPTH`
levels deep, and contexts of more than :data:`MAX_CONTEXT_BYTES` of JSON. No pickle.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.db.models import Model

from .exceptions import ContextUnavailable, InvalidContext

# Tagged values are dicts with this one marker key; user dicts that happen to contain the
# marker are wrapped so they cannot be mistaken for a tag.
TAG = "__spark__"
# SQLite would store it, but PostgreSQL's jsonb cannot: refused on every database alike.
NUL = "\x00"
NUL_REASON = "PostgreSQL cannot store NUL (\\x00) in JSON."
# Likewise a lone surrogate (what os.fsdecode() makes of bytes that are not UTF-8): it has
# no UTF-8 encoding, so PostgreSQL refuses it.
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_REASON = (
    "It has no UTF-8 encoding, so PostgreSQL cannot store it; decode bytes with "
    "errors='replace' (or store them base64-encoded)."
)
#: Containers nested deeper than this are refused: every reader of the stored JSON recurses
#: per level, and a context a retry cannot rebuild would never run.
MAX_DEPTH = 100
#: Ints beyond Python's default int/str conversion limit (4300 digits) are refused:
#: ``json.dumps`` and every reader would fail on them.
MAX_INT_DIGITS = 4300
_INT_BOUND = 10**MAX_INT_DIGITS
#: The most JSON text one context may take (it is ASCII, so bytes and characters agree):
#: far above anything a context of references and values needs, far below what a database
#: takes in one value, so a claim statement can always hold it.
MAX_CONTEXT_BYTES = 64 * 1024 * 1024
#: The most stored context text handled at once: in one claim statement (PostgreSQL takes
#: at most 1 GB in one), or loaded at once by a retry. One larger context goes alone.
BATCH_BYTES = 16 * 1024 * 1024


def dump_context(value: object, *, key: str) -> Any:
    """Return ``value`` as JSON-compatible data, or raise ``InvalidContext`` naming the spot."""
    return _dump(value, (), key)


def dump_context_json(value: object, *, key: str) -> str:
    """:func:`dump_context` encoded as JSON text, exactly as ``json.dumps`` would.

    This runs for every event claimed, so the usual context, a dict of model instances
    (with int or str primary keys), strings, ints, bools and ``None`` under str keys, is
    encoded in one pass; anything else goes through :func:`dump_context` and ``json.dumps``
    (which also names what cannot be stored).
    """
    if type(value) is dict:
        parts: list[str] = []
        for item_key, item in value.items():
            if type(item_key) is not str or item_key == TAG or not _plain(item_key):
                break
            kind = type(item)
            if kind is str:
                if not _plain(item):
                    break
                text = _escape(item)
            elif kind is int:
                if not -_INT_BOUND < item < _INT_BOUND:
                    break
                text = int.__repr__(item)
            elif kind is bool:
                text = "true" if item else "false"
            elif item is None:
                text = "null"
            elif isinstance(item, Model):
                pk = item.pk
                if type(pk) is int and -_INT_BOUND < pk < _INT_BOUND:
                    pk_text = int.__repr__(pk)
                elif type(pk) is str and _plain(pk):
                    pk_text = _escape(pk)
                else:
                    break
                head = _MODEL_HEADS.get(kind)
                if head is None:
                    label = _escape(item._meta.label_lower)
                    head = _MODEL_HEADS[kind] = (
                        f'{{{_escape(TAG)}: "model", "model": {label}, "pk": '
                    )
                text = f"{head}{pk_text}}}"
            else:
                break
            parts.append(f"{_escape(item_key)}: {text}")
        else:
            return _bounded("{" + ", ".join(parts) + "}", key)
    return _bounded(json.dumps(_dump(value, (), key)), key)


_escape = json.encoder.encode_basestring_ascii  # what json.dumps uses for str
# Per model class, the text of a reference up to its primary key.
_MODEL_HEADS: dict[type[Model], str] = {}


def _plain(text: str) -> bool:
    """Whether ``text`` has neither NUL nor a lone surrogate (ASCII, the usual case, is
    settled by one fast check)."""
    return NUL not in text and (text.isascii() or SURROGATE.search(text) is None)


def _bounded(text: str, key: str) -> str:
    if len(text) > MAX_CONTEXT_BYTES:
        raise InvalidContext(
            f"Event {key!r}: the context is {len(text):,} bytes of JSON; the maximum is "
            f"{MAX_CONTEXT_BYTES:,}. Store references (model instances), not the data."
        )
    return text


def _where(path: tuple[str | int, ...]) -> str:
    parts = [f"[{part!r}]" for part in path]
    if len(parts) > 8:  # a path MAX_DEPTH long would drown the message
        parts[5:-2] = [f"...({len(parts) - 7} more)..."]
    return "context" + "".join(parts)


def _check_str(text: str, path: tuple[str | int, ...], key: str, what: str) -> None:
    if NUL in text:
        raise InvalidContext(f"Event {key!r}: {_where(path)} {what} a NUL character. {NUL_REASON}")
    if not text.isascii() and (found := SURROGATE.search(text)) is not None:
        raise InvalidContext(
            f"Event {key!r}: {_where(path)} {what} a lone surrogate ({found.group()!r} at "
            f"index {found.start()}). {SURROGATE_REASON}"
        )


def _dump(value: object, path: tuple[str | int, ...], key: str) -> Any:
    # The path is only formatted when something is wrong: this runs for every event.
    kind = type(value)
    if kind is bool or value is None:
        return value
    if isinstance(value, int):  # bool is settled above
        if not -_INT_BOUND < value < _INT_BOUND:
            raise InvalidContext(
                f"Event {key!r}: {_where(path)} is an int of more than {MAX_INT_DIGITS} "
                "digits, which JSON readers refuse; store it as a str."
            )
        return value
    if isinstance(value, str):
        _check_str(value, path, key, "contains")
        return value if kind is str else str(value)
    if isinstance(value, Model):
        if value.pk is None:
            raise InvalidContext(
                f"Event {key!r}: {_where(path)} is an unsaved {type(value).__name__}; "
                "only saved instances can be stored as references."
            )
        return {TAG: "model", "model": value._meta.label_lower, "pk": _dump(value.pk, path, key)}
    if isinstance(value, Mapping | list | tuple) and len(path) >= MAX_DEPTH:
        raise InvalidContext(
            f"Event {key!r}: {_where(path)} is nested more than {MAX_DEPTH} levels deep; "
            "readers of the stored context could not rebuild it."
        )
    if isinstance(value, Mapping):
        items: dict[str, Any] = {}
        for item_key, item in value.items():
            if type(item_key) is not str:
                if not isinstance(item_key, str):
                    raise InvalidContext(
                        f"Event {key!r}: {_where(path)} has the key {item_key!r}; "
                        "only str keys can be stored."
                    )
                item_key = str(item_key)
            _check_str(item_key, path, key, f"has the key {item_key!r}, which contains")
            items[item_key] = _dump(item, (*path, item_key), key)
        return {TAG: "dict", "value": items} if TAG in items else items
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidContext(
                f"Event {key!r}: {_where(path)} is {value!r}; JSON cannot store NaN or infinity."
            )
        return value
    if isinstance(value, list | tuple):
        return [_dump(item, (*path, index), key) for index, item in enumerate(value)]
    # datetime is a date subclass: test it first.
    if isinstance(value, dt.datetime):
        return {TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, dt.date):
        return {TAG: "date", "value": value.isoformat()}
    if isinstance(value, dt.time):
        return {TAG: "time", "value": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {TAG: "timedelta", "value": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, Decimal):
        return {TAG: "decimal", "value": str(value)}
    if isinstance(value, uuid.UUID):
        return {TAG: "uuid", "value": str(value)}
    raise InvalidContext(
        f"Event {key!r}: {_where(path)} is a {type(value).__module__}.{type(value).__qualname__}, "
        "which cannot be stored. Use model instances, JSON values, date/time values, "
        "Decimal or UUID."
    )


def load_stored_context(text: str) -> Any:
    """Rebuild a context from the JSON text it is stored as: :func:`rebuild_context`."""
    try:
        data = json.loads(text)
    except Exception as exc:
        raise ContextUnavailable(
            f"The stored context cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    return rebuild_context(data)


def rebuild_context(data: Any) -> Any:
    """:func:`load_context` for a reader that must fail only the call it rebuilds for:
    whatever stops it is :class:`ContextUnavailable`. Rows may hold what no validation
    refused when they were written (JSON nested deeper than Python's recursion limit, a
    tagged value that is not what its tag says)."""
    try:
        return load_context(data)
    except ContextUnavailable:
        raise
    except Exception as exc:
        raise ContextUnavailable(
            f"The stored context cannot be rebuilt: {type(exc).__name__}: {exc}"
        ) from exc


def load_context(data: Any) -> Any:
    """Rebuild a context stored by :func:`dump_context`; model instances are re-fetched."""
    if isinstance(data, list):
        return [load_context(item) for item in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(TAG)
    if tag is None:
        return {item_key: load_context(item) for item_key, item in data.items()}
    value: Any = data.get("value")
    match tag:
        case "dict":
            return {item_key: load_context(item) for item_key, item in value.items()}
        case "model":
            return _fetch(data["model"], load_context(data["pk"]))
        case "datetime":
            return dt.datetime.fromisoformat(value)
        case "date":
            return dt.date.fromisoformat(value)
        case "time":
            return dt.time.fromisoformat(value)
        case "timedelta":
            days, seconds, microseconds = value
            return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
        case "decimal":
            return Decimal(value)
        case "uuid":
            return uuid.UUID(value)
        case _:
            raise ContextUnavailable(f"Unknown stored context tag {tag!r}.")


# -- reading a stored context as stored (the admin shows it without rebuilding it) ------

# The tags whose value rebuilds to a scalar without a query: what a stored primary key may
# be besides an int or a str.
_SCALAR_TAGS = frozenset({"uuid", "decimal", "date", "datetime", "time"})


def stored_model(data: dict[str, Any]) -> tuple[str, Any] | None:
    """``(model label, stored primary key)`` when ``data`` is a model instance as
    :func:`dump_context` stores it; ``None`` for any other mapping."""
    if data.get(TAG) != "model" or data.keys() != {TAG, "model", "pk"}:
        return None
    label = data["model"]
    return (label, data["pk"]) if isinstance(label, str) else None


def wraps_dict(data: dict[str, Any]) -> bool:
    """Whether ``data`` wraps a dict of the user's that has the tag among its keys: its
    ``"value"`` is that dict, never itself a tagged value."""
    return data.get(TAG) == "dict" and data.keys() == {TAG, "value"}


def stored_scalar(data: Any) -> object:
    """A stored primary key rebuilt without a query: an int or a str as it is, a tagged
    date, time, decimal or UUID rebuilt; ``None`` for what no primary key can be."""
    if isinstance(data, bool):
        return None
    if isinstance(data, int | str):
        return data
    if isinstance(data, dict) and data.get(TAG) in _SCALAR_TAGS:
        try:
            return load_context(data)
        except Exception:
            return None
    return None


def _fetch(label: str, pk: object) -> Model:
    try:
        model = apps.get_model(label)
    except LookupError as exc:
        raise ContextUnavailable(f"The model {label} is no longer installed.") from exc
    try:
        instance: Model = model._base_manager.get(pk=pk)
    except model.DoesNotExist as exc:
        raise ContextUnavailable(f"{model.__name__} with pk={pk!r} no longer exists.") from exc
    return instance
