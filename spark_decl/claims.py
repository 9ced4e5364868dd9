"""Claiming keys: the database side of "once per key".

A key is claimed by inserting it into ``EventRecord``'s unique ``key`` column with
``INSERT ... ON CONFLICT DO NOTHING RETURNING``: the database, not Python, decides which of
several concurrent claimers wins, and one statement claims a whole chunk. The claim and one
pending :class:`~spark_decl.models.HandlerOutcome` per matching handler are written in one
transaction (a savepoint inside the caller's), so a claim is never left without the
record of what still has to run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from .conf import get_settings
from .context import dump_context
from .exceptions import UnsupportedDatabase
from .registry import registry
from .validation import validate_event

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import Field, Model

    from .registry import HandlerSpec
    from .types import Event

E = TypeVar("E", bound="Mapping[str, Any]")

MIN_SQLITE = (3, 35, 0)
# Parameters per statement: SQLite's historic floor (999) bounds every supported backend.
MAX_PARAMETERS = 999


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof that this process claimed a key, and the handler calls it owes.

    ``outcome_ids[i]`` is the :class:`~spark_decl.models.HandlerOutcome` row of
    ``handlers[i]``.
    """

    record_id: int
    using: str
    handlers: tuple[HandlerSpec, ...]
    outcome_ids: tuple[int, ...]
    #: The background calls were enqueued in the claiming transaction already (outbox).
    enqueued: bool = False


class ClaimedEvent(dict[str, Any]):
    """An event this process claimed; equal to the event it was made from.

    :func:`spark_decl.process_events` recognises it and records each handler's outcome.
    """

    __slots__ = ("spark_claim",)
    spark_claim: Claim


def check_database(connection: BaseDatabaseWrapper) -> None:
    """Raise :class:`UnsupportedDatabase` unless the database can claim keys atomically."""
    if connection.vendor == "postgresql":
        return
    if connection.vendor == "sqlite":
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise UnsupportedDatabase(
                f"spark_decl needs SQLite >= {'.'.join(map(str, MIN_SQLITE))} "
                f"(INSERT ... ON CONFLICT ... RETURNING); this Python has "
                f"{sqlite3.sqlite_version}."
            )
        return
    raise UnsupportedDatabase(
        f"spark_decl supports SQLite and PostgreSQL; the database {connection.alias!r} "
        f"is {connection.vendor}."
    )


def claim_events(
    events: Sequence[Event[Any]],
    *,
    using: str = DEFAULT_DB_ALIAS,
    handlers: bool = True,
) -> list[Event[Any]]:
    """Claim the keys of already validated ``events``; return the ones claimed now.

    Every context is converted for storage first, so an unstorable context raises before
    anything is written. Duplicate keys within ``events`` keep their first occurrence.
    The result is in input order; each returned event is a :class:`ClaimedEvent`.
    Inside a transaction the claims belong to it: a rollback takes them back.
    ``handlers=False`` claims the keys without owing any handler call (``--mark-only``).
    """
    first: dict[str, Event[Any]] = {}
    for event in events:
        first.setdefault(event["key"], event)
    if not first:
        return []
    from .models import EventRecord, HandlerOutcome

    connection = connections[using]
    check_database(connection)
    # What JSONField.get_db_prep_save ends in, without its per-value checks.
    to_db = connection.ops.adapt_json_value
    now = timezone.now()
    created_at = EventRecord.created_at.field.get_db_prep_save(now, connection)
    records = [
        (
            key,
            event["group"],
            to_db(dump_context(event["context"], key=key), None),
            created_at,
        )
        for key, event in first.items()
    ]
    # savepoint=False: the claim and its outcome rows are one unit, and a savepoint per
    # save would cost more than the claim itself; an error marks the transaction for
    # rollback instead.
    with transaction.atomic(using=using, savepoint=False):
        claimed = {
            key: pk
            for pk, key in insert_rows(
                connection,
                EventRecord,
                ("key", "group", "context", "created_at"),
                records,
                returning=("id", "key"),
                skip_conflicts_on="key",
            )
        }
        if not claimed:
            return []
        owed: list[tuple[ClaimedEvent, int, tuple[HandlerSpec, ...]]] = []
        outcome_rows: list[tuple[Any, ...]] = []
        for key, event in first.items():
            record_id = claimed.get(key)
            if record_id is None:
                continue
            owes = registry.handlers_for(event["group"]) if handlers else ()
            outcome_rows.extend(
                (record_id, spec.name, "pending", 0, "", "", created_at) for spec in owes
            )
            owed.append((ClaimedEvent(event), record_id, owes))
        outcome_ids = {
            (record_id, handler): pk
            for pk, record_id, handler in insert_rows(
                connection,
                HandlerOutcome,
                (
                    "record",
                    "handler",
                    "status",
                    "attempts",
                    "last_error",
                    "traceback",
                    "created_at",
                ),
                outcome_rows,
                returning=("id", "record", "handler"),
            )
        }
    result: list[Event[Any]] = []
    for claimed_event, record_id, owes in owed:
        ids = tuple(outcome_ids[record_id, spec.name] for spec in owes)
        claimed_event.spark_claim = Claim(record_id, using, owes, ids)
        result.append(cast("Event[Any]", claimed_event))
    return result


def seen_keys(keys: Sequence[str], *, using: str = DEFAULT_DB_ALIAS) -> set[str]:
    """The subset of ``keys`` that were claimed before (one query per 999 keys)."""
    from .models import EventRecord

    seen: set[str] = set()
    for start in range(0, len(keys), MAX_PARAMETERS):
        seen.update(
            EventRecord.objects.using(using)
            .filter(key__in=keys[start : start + MAX_PARAMETERS])
            .values_list("key", flat=True)
        )
    return seen


def parameter_limit(connection: BaseDatabaseWrapper) -> int:
    """How many parameters one statement may bind on this connection."""
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        limit: int = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return limit
    return 65_535  # PostgreSQL's wire protocol counts parameters in 16 bits


def insert_rows(
    connection: BaseDatabaseWrapper,
    model: type[Model],
    fields: tuple[str, ...],
    rows: Sequence[Sequence[Any]],
    *,
    returning: tuple[str, ...],
    skip_conflicts_on: str | None = None,
) -> list[tuple[Any, ...]]:
    """``INSERT ... [ON CONFLICT (col) DO NOTHING] RETURNING ...`` in as few statements
    as the database's parameter limit allows; returns the inserted rows' ``returning``
    columns, in no guaranteed order. Values must be ready for the database (JSON and
    datetime values through their field's ``get_db_prep_save``)."""
    if not rows:
        return []
    head, placeholder, tail = _insert_sql(
        connection.vendor, model, fields, returning, skip_conflicts_on
    )
    per_statement = max(1, parameter_limit(connection) // len(fields))
    inserted: list[tuple[Any, ...]] = []
    with connection.cursor() as cursor:
        for start in range(0, len(rows), per_statement):
            batch = rows[start : start + per_statement]
            params = [value for row in batch for value in row]
            cursor.execute(head + ", ".join([placeholder] * len(batch)) + tail, params)
            inserted.extend(cursor.fetchall())
    return inserted


@cache
def _insert_sql(
    vendor: str,
    model: type[Model],
    fields: tuple[str, ...],
    returning: tuple[str, ...],
    skip_conflicts_on: str | None,
) -> tuple[str, str, str]:
    """The fixed parts of :func:`insert_rows`' statement, built once per shape.
    ``vendor`` is part of the cache key only: SQLite and PostgreSQL (the databases
    :func:`check_database` admits) quote identifiers alike."""
    quote = _quote
    meta = model._meta

    def column(name: str) -> str:
        return quote(cast("Field[Any, Any]", meta.get_field(name)).column)

    head = f"INSERT INTO {quote(meta.db_table)} ({', '.join(map(column, fields))}) VALUES "
    tail = ""
    if skip_conflicts_on is not None:
        tail += f" ON CONFLICT ({column(skip_conflicts_on)}) DO NOTHING"
    tail += f" RETURNING {', '.join(map(column, returning))}"
    placeholder = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return head, placeholder, tail


def _quote(name: str) -> str:
    return name if name.startswith('"') and name.endswith('"') else f'"{name}"'


def only_new_events(
    events: Iterable[E],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> Iterator[E]:
    """Yield the events whose keys were never seen before, claiming them as it goes.

    Each event is validated (:class:`~spark_decl.exceptions.InvalidEvent` on bad input),
    keys are claimed in the database a chunk at a time, and only events claimed by this
    call are yielded, in input order, each key once. Pass the result to
    :func:`process_events`::

        process_events(only_new_events(events_from_challenge(challenge)))

    Claimed events whose handlers never run (the caller stops iterating, the process dies)
    stay pending and are finished by ``manage.py retry_spark_events``.
    """
    chunk_size = get_settings().CHUNK_SIZE
    iterator = iter(events)
    while chunk := list(islice(iterator, chunk_size)):
        valid = [validate_event(candidate) for candidate in chunk]
        # A claimed event is a dict equal to the one passed in, so its static type (and the
        # handler-side context type, e.g. Event[ChallengeContext]) carries over.
        yield from cast("list[E]", claim_events(valid, using=using))
