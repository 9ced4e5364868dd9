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
    from django.db.models import Field

    from .registry import HandlerSpec
    from .types import Event

E = TypeVar("E", bound="Mapping[str, Any]")

MIN_SQLITE = (3, 35, 0)
# Rows per INSERT statement: 4 parameters a row stays under SQLite's 999-parameter floor.
ROWS_PER_STATEMENT = 240


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof that this process claimed ``key``, and which handlers it owes a call."""

    record_id: int
    using: str
    handlers: tuple[HandlerSpec, ...]


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
    create_outcomes: bool = True,
) -> list[Event[Any]]:
    """Claim the keys of already validated ``events``; return the ones claimed now.

    Every context is converted for storage first, so an unstorable context raises before
    anything is written. Duplicate keys within ``events`` keep their first occurrence.
    The result is in input order.
    """
    first: dict[str, Event[Any]] = {}
    for event in events:
        first.setdefault(event["key"], event)
    if not first:
        return []
    rows = [
        (key, event["group"], dump_context(event["context"], key=key))
        for key, event in first.items()
    ]
    from .models import HandlerOutcome

    connection = connections[using]
    check_database(connection)
    with transaction.atomic(using=using):
        now = timezone.now()
        claimed = _insert_ignoring_conflicts(connection, rows, now)
        if not claimed:
            return []
        result: list[Event[Any]] = []
        outcomes: list[HandlerOutcome] = []
        for key, event in first.items():
            record_id = claimed.get(key)
            if record_id is None:
                continue
            handlers = registry.handlers_for(event["group"]) if create_outcomes else ()
            outcomes.extend(
                HandlerOutcome(record_id=record_id, handler=spec.name, created_at=now)
                for spec in handlers
            )
            claimed_event = ClaimedEvent(event)
            claimed_event.spark_claim = Claim(record_id, using, handlers)
            result.append(cast("Event[Any]", claimed_event))
        if outcomes:
            HandlerOutcome.objects.using(using).bulk_create(outcomes)
    return result


def _insert_ignoring_conflicts(
    connection: BaseDatabaseWrapper,
    rows: list[tuple[str, str, Any]],
    now: Any,
) -> dict[str, int]:
    from .models import EventRecord

    meta = EventRecord._meta
    quote = connection.ops.quote_name
    key_field, group_field, context_field, created_field = (
        cast("Field[Any, Any]", meta.get_field(name))
        for name in ("key", "group", "context", "created_at")
    )
    columns = ", ".join(
        quote(f.column) for f in (key_field, group_field, context_field, created_field)
    )
    head = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES "
    tail = (
        f" ON CONFLICT ({quote(key_field.column)}) DO NOTHING "
        f"RETURNING {quote(meta.pk.column)}, {quote(key_field.column)}"
    )
    created = created_field.get_db_prep_save(now, connection)
    claimed: dict[str, int] = {}
    with connection.cursor() as cursor:
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            batch = rows[start : start + ROWS_PER_STATEMENT]
            params: list[Any] = []
            for key, group, context in batch:
                params += [
                    key,
                    group,
                    context_field.get_db_prep_save(context, connection),
                    created,
                ]
            values = ", ".join(["(%s, %s, %s, %s)"] * len(batch))
            cursor.execute(head + values + tail, params)
            claimed.update((key, pk) for pk, key in cursor.fetchall())
    return claimed


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
