"""Storing an event's context as JSON and rebuilding it for retries.

Model instances are stored as references (app label, model name, primary key) and fetched
again when the context is rebuilt. JSON scalars, lists, tuples (rebuilt as lists),
string-keyed dicts, ``date``, ``datetime``, ``time``, ``timedelta``, ``Decimal`` and ``UUID``
round-trip to equal values of the same type. Anything else is refused with
:class:`~spark_decl.exceptions.InvalidContext` when the event is claimed, and so are strings
containing NUL (PostgreSQL's jsonb cannot store them). No pickle.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.db.models import Model

from .exceptions import InvalidContext, SparkError

# Tagged values are dicts with this one marker key; user dicts that happen to contain the
# marker are wrapped so they cannot be mistaken for a tag.
TAG = "__spark__"
# SQLite would store it, but PostgreSQL's jsonb cannot: refused on every database alike.
NUL = "\x00"
NUL_REASON = "PostgreSQL cannot store NUL (\\x00) in JSON."


class ContextUnavailable(SparkError):
    """A stored context refers to something that no longer exists (a deleted row)."""


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
            if type(item_key) is not str or NUL in item_key or item_key == TAG:
                break
            kind = type(item)
            if kind is str:
                if NUL in item:
                    break
                text = _escape(item)
            elif kind is int:
                text = int.__repr__(item)
            elif kind is bool:
                text = "true" if item else "false"
            elif item is None:
                text = "null"
            elif isinstance(item, Model):
                pk = item.pk
                if type(pk) is int:
                    pk_text = int.__repr__(pk)
                elif type(pk) is str and NUL not in pk:
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
            return "{" + ", ".join(parts) + "}"
    return json.dumps(_dump(value, (), key))


_escape = json.encoder.encode_basestring_ascii  # what json.dumps uses for str
# Per model class, the text of a reference up to its primary key.
_MODEL_HEADS: dict[type[Model], str] = {}


def _where(path: tuple[str | int, ...]) -> str:
    return "context" + "".join(f"[{part!r}]" for part in path)


def _dump(value: object, path: tuple[str | int, ...], key: str) -> Any:
    # The path is only formatted when something is wrong: this runs for every event.
    kind = type(value)
    if kind is int or kind is bool or value is None:
        return value
    if kind is str:
        if NUL in value:  # type: ignore[operator]  # pyright: ignore[reportOperatorIssue]
            raise InvalidContext(
                f"Event {key!r}: {_where(path)} contains a NUL character. {NUL_REASON}"
            )
        return value
    if isinstance(value, Model):
        if value.pk is None:
            raise InvalidContext(
                f"Event {key!r}: {_where(path)} is an unsaved {type(value).__name__}; "
                "only saved instances can be stored as references."
            )
        return {TAG: "model", "model": value._meta.label_lower, "pk": _dump(value.pk, path, key)}
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
            if NUL in item_key:
                raise InvalidContext(
                    f"Event {key!r}: {_where(path)} has the key {item_key!r}, which contains "
                    f"a NUL character. {NUL_REASON}"
                )
            items[item_key] = _dump(item, (*path, item_key), key)
        return {TAG: "dict", "value": items} if TAG in items else items
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _dump(str(value), path, key)
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
