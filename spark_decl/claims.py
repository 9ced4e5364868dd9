"""Claiming keys: the database side of "once per key".

A key is claimed by inserting it into ``EventRecord``'s unique ``key`` column with
``INSERT ... ON CONFLICT DO NOTHING RETURNING``: the database, not Python, decides which of
several concurrent claimers wins, and one statement claims a whole chunk. A claim and the
record of every call it owes always commit together, so a claim is never left without it:
either a ``pending`` :class:`~spark_decl.models.HandlerOutcome` per matching handler is
written here, or, when the calls run in the claiming transaction too, the claim itself
says they are done (:attr:`~spark_decl.models.EventRecord.done_at_claim`, written by the
same ``INSERT``). That is settled before the transaction commits: a call that fails, or
is not reached, leaves ``done_at_claim`` and gets its outcome row, with its result (see
:meth:`~spark_decl.calls.CallRunner.record_outcomes`). A crash rolls back all of it.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.utils import timezone

from .conf import get_settings
from .context import BATCH_BYTES, dump_context_json
from .exceptions import UnsupportedDatabase
from .registry import registry
from .validation import validate_event

if TYPE_CHECKING:
    from datetime import datetime

    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.utils import CursorWrapper
    from django.db.models import Field, Model

    from .registry import HandlerSpec
    from .types import Event

E = TypeVar("E", bound="Mapping[str, Any]")

logger = logging.getLogger("spark_decl")

MIN_SQLITE = (3, 35, 0)
# Parameters per statement: SQLite's historic floor (999) bounds every supported backend.
MAX_PARAMETERS = 999


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 1.5 us more per claim
class Claim:
    """Proof that this process claimed a key, and the handler calls it owes (never changed
    once made; ``dataclasses.replace`` makes a new one).

    ``outcome_ids[i]`` is the :class:`~spark_decl.models.HandlerOutcome` row of
    ``handlers[i]``, or ``None`` when it has none: the claim was made with ``run_here=True``
    and wrote the call as done (``done_at_claim``); if the call does not succeed in the
    claiming transaction, its row is written there with its result.
    """

    record_id: int
    using: str
    handlers: tuple[HandlerSpec, ...]
    outcome_ids: tuple[int | None, ...]
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
    run_here: bool = False,
    contexts: Mapping[str, str] | None = None,
) -> list[Event[Any]]:
    """Claim the keys of already validated ``events``; return the ones claimed now.

    Every context is converted for storage first, so an unstorable context raises before
    anything is written. Duplicate keys within ``events`` keep their first occurrence.
    The result is in input order; each returned event is a :class:`ClaimedEvent`.
    Inside a transaction the claims belong to it: a rollback takes them back, and an error
    is its owner's. Outside one they get their own, made again a few times if the database
    aborts it for a deadlock or a serialization failure (:func:`claim_again`).
    ``handlers=False`` claims the keys without owing any handler call (``--mark-only``).

    ``run_here=True`` is for a caller that runs the calls in the claiming transaction
    (:func:`~spark_decl.dispatch.claim_and_dispatch` outside a transaction): they are
    written as done in the claim (``done_at_claim``), and no row is written for them here;
    :meth:`~spark_decl.calls.CallRunner.record_outcomes` takes back each one that did not
    succeed before that transaction commits. Background calls, which run elsewhere, get
    their ``pending`` rows here all the same.

    ``contexts`` maps keys to their contexts already converted for storage
    (:func:`~spark_decl.context.dump_context_json`), by a caller that checked them earlier.
    """
    first: dict[str, Event[Any]] = {}
    for event in events:
        first.setdefault(event["key"], event)
    if not first:
        return []
    connection = connections[using]
    check_database(connection)
    created_at = db_datetime(connection, timezone.now())
    # Per group: the handlers owed, those whose pending rows are written here, and the
    # others as done_at_claim's JSON.
    routes: dict[str, _Route] = {}
    for event in first.values():
        group = event["group"]
        if group not in routes:
            owes = registry.handlers_for(group) if handlers else ()
            written = tuple(spec for spec in owes if spec.background or not run_here)
            routes[group] = (
                owes,
                written,
                done_json(spec for spec in owes if spec not in written),
            )
    if contexts is None:
        records = [
            (
                key,
                event["group"],
                dump_context_json(event["context"], key=key),
                created_at,
                routes[event["group"]][2],
            )
            for key, event in first.items()
        ]
    else:
        records = [
            (key, ev["group"], contexts[key], created_at, routes[ev["group"]][2])
            for key, ev in first.items()
        ]
    # The claims and their outcome rows are one unit.
    if connection.in_atomic_block:
        # Inside a transaction an error marks it for rollback, as Model.save() does (a
        # savepoint would cost more than the claim itself). A claim the database aborted
        # (deadlock, serialization failure) cannot be made again there: it aborted the
        # whole transaction, whose owner gets the error.
        with transaction.mark_for_rollback_on_error(using):
            owed, outcome_ids = _insert_claims(connection, first, records, routes, created_at)
    else:
        attempt = 1
        while True:
            try:
                with transaction.atomic(using=using):
                    owed, outcome_ids = _insert_claims(
                        connection, first, records, routes, created_at
                    )
                break
            except DatabaseError as exc:
                if not claim_again(exc, attempt, first.keys()):
                    raise
                attempt += 1
    result: list[Event[Any]] = []
    for claimed_event, record_id, owes in owed:
        ids = (
            tuple(outcome_ids.get((record_id, spec.name)) for spec in owes)
            if outcome_ids
            else (None,) * len(owes)
        )
        claimed_event.spark_claim = Claim(record_id, using, owes, ids)
        result.append(cast("Event[Any]", claimed_event))
    return result


def _insert_claims(
    connection: BaseDatabaseWrapper,
    first: Mapping[str, Event[Any]],
    records: list[tuple[Any, ...]],
    routes: Mapping[str, _Route],
    created_at: Any,
) -> tuple[list[tuple[ClaimedEvent, int, tuple[HandlerSpec, ...]]], dict[tuple[int, str], int]]:
    """Insert the claims (``records``) and the pending rows of the calls they owe; return
    the events claimed now, in input order, each with its record id and the handlers it
    owes, and the ids of the pending rows by (record id, handler name)."""
    from .models import EventRecord, HandlerOutcome

    owed: list[tuple[ClaimedEvent, int, tuple[HandlerSpec, ...]]] = []
    with connection.cursor() as cursor:
        claimed: dict[str, int] = {}
        for statement in _by_context_bytes(records):
            claimed.update(
                insert_rows(
                    cursor,
                    EventRecord,
                    RECORD_FIELDS,
                    statement,
                    returning=("key", "id"),
                    skip_conflicts_on="key",
                )
            )
        if not claimed:
            return owed, {}
        pending: list[tuple[Any, ...]] = []
        status = HandlerOutcome.Status.PENDING.value
        for key, event in first.items():
            record_id = claimed.get(key)
            if record_id is None:
                continue
            route = routes[event["group"]]
            owed.append((ClaimedEvent(event), record_id, route[0]))
            for spec in route[1]:
                pending.append((record_id, spec.name, status, 0, "", "", created_at, None, None))
        outcome_ids = {
            (record_id, handler): pk
            for pk, record_id, handler in insert_rows(
                cursor,
                HandlerOutcome,
                OUTCOME_FIELDS,
                pending,
                returning=OUTCOME_RETURNING,
            )
        }
    return owed, outcome_ids


# SQLSTATEs with which PostgreSQL aborts a transaction only because of what ran alongside
# it, so that running it again can succeed: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
#: How many times a claim is tried in a transaction of spark_decl's own that the database
#: aborts (:func:`is_retryable`) before the error propagates.
CLAIM_ATTEMPTS = 5
# The longest pause before the second attempt, in seconds; it doubles for each next one.
RETRY_PAUSE = 0.025


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error as Django raises it: its ``__cause__`` is the
    driver's error, which names it ``sqlstate`` (psycopg 3) or ``pgcode`` (psycopg2).
    SQLite's errors have none."""
    cause = exc.__cause__
    state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return state if isinstance(state, str) else None


def is_retryable(exc: BaseException) -> bool:
    """Whether the database aborted the transaction with ``exc`` for a deadlock or a
    serialization failure: running the transaction again can succeed. Told by the
    SQLSTATE, never by the message, which follows the server's ``lc_messages``. SQLite has
    no such error: a connection waits its ``timeout`` for the write lock instead."""
    return sqlstate(exc) in RETRYABLE_SQLSTATES


def claim_again(exc: BaseException, attempt: int, keys: Iterable[str]) -> bool:
    """After the ``attempt``-th try of a claim failed with ``exc``, whether to try again.

    For a claim in a transaction of spark_decl's own in which no handler ran yet (running
    one again would repeat what it did outside the database). Yes when the database aborted
    that transaction (:func:`is_retryable`) and attempts are left; then this logs a warning
    and first sleeps a random time, below a bound that doubles with each attempt, so that
    the transactions that collided do not meet again in step.
    """
    if attempt >= CLAIM_ATTEMPTS or not is_retryable(exc):
        return False
    pause = random.uniform(0, RETRY_PAUSE * 2 ** (attempt - 1))
    shown = list(islice(keys, 4))
    logger.warning(
        "The database aborted the claim of %s (SQLSTATE %s: %s); claiming again in %d ms "
        "(attempt %d of %d).",
        ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else ""),
        sqlstate(exc),
        str(exc).partition("\n")[0],
        round(pause * 1000),
        attempt + 1,
        CLAIM_ATTEMPTS,
    )
    time.sleep(pause)
    return True


def _by_context_bytes(records: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    """``records`` in runs whose contexts (JSON text, the third column) total at most
    :data:`~spark_decl.context.BATCH_BYTES`: a chunk of large contexts would otherwise
    exceed what PostgreSQL takes in one statement, on every run."""
    if sum(len(record[2]) for record in records) <= BATCH_BYTES:
        yield records
        return
    run: list[tuple[Any, ...]] = []
    size = 0
    # In key order across the statements too, as insert_rows orders each one's rows: the
    # order in which a claim takes its keys is what keeps concurrent claims from deadlock.
    for record in sorted(records, key=itemgetter(0)):
        if run and size + len(record[2]) > BATCH_BYTES:
            yield run
            run, size = [], 0
        run.append(record)
        size += len(record[2])
    yield run


# A group's routing at claim time: the handlers owed, those with pending rows written at
# the claim, and done_at_claim's JSON (the others).
_Route = tuple[tuple["HandlerSpec", ...], tuple["HandlerSpec", ...], str]

RECORD_FIELDS = ("key", "group", "context", "created_at", "done_at_claim")


def done_json(specs: Iterable[HandlerSpec]) -> str:
    """``done_at_claim``'s value for these handlers: a JSON object keyed by their names
    (``has_key`` finds a name in it on SQLite and PostgreSQL alike)."""
    return json.dumps(dict.fromkeys((spec.name for spec in specs), True))


# Every HandlerOutcome row spark_decl writes (pending at a claim, or with its result after
# the call ran) has these columns, and comes back as (id, record, handler).
OUTCOME_FIELDS = (
    "record",
    "handler",
    "status",
    "attempts",
    "last_error",
    "traceback",
    "created_at",
    "finished_at",
    "next_attempt_at",
)
OUTCOME_RETURNING = ("id", "record", "handler")


def db_datetime(connection: BaseDatabaseWrapper, value: datetime) -> Any:
    """An aware datetime as :func:`insert_rows` takes it: as
    ``DateTimeField.get_db_prep_save`` would store it on SQLite, in ISO 8601 on PostgreSQL
    (where it travels in a JSON document, or as a parameter cast to ``timestamptz``)."""
    if connection.vendor == "postgresql":
        return value.isoformat()
    return connection.ops.adapt_datetimefield_value(value)


def seen_keys(keys: Sequence[str], *, using: str = DEFAULT_DB_ALIAS) -> set[str]:
    """The subset of ``keys`` that were claimed before, with one query however many there
    are: the keys are bound as one JSON array (``json_each`` on SQLite,
    ``json_array_elements_text`` on PostgreSQL), and the unique index on ``key`` is
    probed for each."""
    from .models import EventRecord

    if not keys:
        return set()
    meta = EventRecord._meta
    column = _quote(cast("Field[Any, Any]", meta.get_field("key")).column)
    connection = connections[using]
    if connection.vendor == "postgresql":
        # An array built once (InitPlan): PostgreSQL then scans the index for each key.
        keys_sql = "= ANY(ARRAY(SELECT json_array_elements_text(%s::json)))"
    else:
        keys_sql = 'IN (SELECT "value" FROM json_each(%s))'
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {column} FROM {_quote(meta.db_table)} WHERE {column} {keys_sql}",
            [json.dumps(list(keys))],
        )
        return {key for (key,) in cursor.fetchall()}


def parameter_limit(connection: BaseDatabaseWrapper) -> int:
    """How many parameters one statement may bind on this connection."""
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        limit: int = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return limit
    return 65_535  # PostgreSQL's wire protocol counts parameters in 16 bits


def insert_rows(
    cursor: CursorWrapper,
    model: type[Model],
    fields: tuple[str, ...],
    rows: Sequence[Sequence[Any]],
    *,
    returning: tuple[str, ...] | None = None,
    skip_conflicts_on: str | None = None,
) -> list[tuple[Any, ...]]:
    """``INSERT ... [ON CONFLICT (col) DO NOTHING] [RETURNING ...]`` of many rows; returns
    the inserted rows' ``returning`` columns, in no guaranteed order. With
    ``skip_conflicts_on``, the rows are inserted in the order of that column's values.
    Values must be ready for the database: datetimes through :func:`db_datetime`, a JSON
    column's value as JSON text (:func:`~spark_decl.context.dump_context_json`).

    On SQLite: multi-row ``VALUES``, in as few statements as its parameter limit allows.
    On PostgreSQL: ``VALUES`` (each value cast to its column's type) while psycopg caches
    the statement (at most 50 parameters: a save's claim); beyond, one statement binding
    the rows as one JSON document (``json_array_elements``), each value's text cast to its
    column's type there. Not one parameter per value, because psycopg parses a statement
    with more than 50 placeholders anew every time, nor an array per column, because
    psycopg quotes each element of a text array with a regular expression; and not the
    JSON document for a few rows, which PostgreSQL plans about 0.1 ms slower than
    ``VALUES``.
    """
    if not rows:
        return []
    if skip_conflicts_on is not None:
        # A row whose key another open transaction inserted waits for that transaction,
        # holding the keys inserted before it. If every such statement inserts its rows in
        # one order (Python's order of the keys: any total order that all processes share
        # will do), two of them never wait for each other in a cycle: the one that reaches
        # a common key second waits for the other, which needs nothing it holds. In any
        # other order, two claims of the same keys can deadlock. (PostgreSQL inserts the
        # rows of VALUES and of json_array_elements() in the order they are given.)
        position = fields.index(skip_conflicts_on)
        rows = sorted(rows, key=itemgetter(position))
    connection = cursor.db
    sql = _insert_sql(connection, model, fields, returning, skip_conflicts_on)
    if sql.from_json is not None and len(rows) * len(fields) > CACHED_PARAMETERS:
        cursor.execute(sql.into + sql.from_json + sql.tail, [json.dumps(rows)])
        return cursor.fetchall() if returning is not None else []
    per_statement = max(1, parameter_limit(connection) // len(fields))
    inserted: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), per_statement):
        batch = rows[start : start + per_statement]
        params = [value for row in batch for value in row]
        values = ", ".join([sql.row] * len(batch))
        cursor.execute(f"{sql.into}VALUES {values}{sql.tail}", params)
        if returning is not None:
            inserted.extend(cursor.fetchall())
    return inserted


# psycopg caches how it converts a statement with at most this many parameters, and parses
# a longer one anew every time.
CACHED_PARAMETERS = 50


@dataclass(frozen=True, slots=True)
class InsertSQL:
    """The parts of :func:`insert_rows`' statements for one table, columns and options."""

    into: str  # INSERT INTO table (columns)
    #: Each column's placeholder: %s, cast to the column's type on PostgreSQL.
    placeholders: tuple[str, ...]
    row: str  # one row of VALUES: (placeholders)
    from_json: str | None  # PostgreSQL: the rows as one JSON document
    tail: str  # ON CONFLICT ... RETURNING ...


_STATEMENTS: dict[tuple[Any, ...], InsertSQL] = {}


def _insert_sql(
    connection: BaseDatabaseWrapper,
    model: type[Model],
    fields: tuple[str, ...],
    returning: tuple[str, ...] | None,
    skip_conflicts_on: str | None,
) -> InsertSQL:
    """:func:`insert_rows`' statement parts, built once per vendor and shape. (SQLite and
    PostgreSQL, the databases :func:`check_database` admits, quote identifiers alike.)"""
    key = (connection.vendor, model, fields, returning, skip_conflicts_on)
    if key in _STATEMENTS:
        return _STATEMENTS[key]
    meta = model._meta
    columns = [cast("Field[Any, Any]", meta.get_field(name)) for name in fields]

    def column(name: str) -> str:
        return _quote(cast("Field[Any, Any]", meta.get_field(name)).column)

    into = f"INSERT INTO {_quote(meta.db_table)} ({', '.join(map(column, fields))}) "
    if connection.vendor == "postgresql":
        # Typed: datetimes and JSON arrive as text (ISO 8601, JSON text).
        types = [field.db_type(connection) for field in columns]
        placeholders = tuple(f"%s::{db_type}" for db_type in types)
        # The rows as one JSON array of arrays, each value's text cast to its column's type.
        values = ", ".join(f"(r ->> {index})::{db_type}" for index, db_type in enumerate(types))
        from_json: str | None = f"SELECT {values} FROM json_array_elements(%s::json) AS r"
    else:
        placeholders = ("%s",) * len(fields)
        from_json = None
    tail = ""
    if skip_conflicts_on is not None:
        tail += f" ON CONFLICT ({column(skip_conflicts_on)}) DO NOTHING"
    if returning is not None:
        tail += f" RETURNING {', '.join(map(column, returning))}"
    row = f"({', '.join(placeholders)})"
    _STATEMENTS[key] = InsertSQL(into, placeholders, row, from_json, tail)
    return _STATEMENTS[key]


def update_done_at_claim(cursor: CursorWrapper, values: Mapping[int, str]) -> None:
    """Set ``done_at_claim`` (JSON text, from :func:`done_json`) of each event id in
    ``values``: one prepared statement, executed once per event."""
    from .models import EventRecord

    if not values:
        return
    meta = EventRecord._meta
    column = _quote(cast("Field[Any, Any]", meta.get_field("done_at_claim")).column)
    cast_json = "::jsonb" if cursor.db.vendor == "postgresql" else ""
    cursor.executemany(
        f"UPDATE {_quote(meta.db_table)} SET {column} = %s{cast_json} WHERE "
        f"{_quote(meta.pk.column)} = %s",
        [(done, record_id) for record_id, done in values.items()],
    )


def _quote(name: str) -> str:
    return name if name.startswith('"') and name.endswith('"') else f'"{name}"'


def only_new_events(
    events: Iterable[E],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> Iterator[E]:
    """Yield the events whose keys were never seen before, claiming each as it is yielded.

    Each event is validated (:class:`~spark_decl.exceptions.InvalidEvent` on bad input) and
    only events claimed by this call are yielded, in input order, each key once. Pass the
    result to :func:`process_events`::

        process_events(only_new_events(events_from_challenge(challenge)))

    An event is claimed just before it is handed over, never earlier: a consumer that
    stops, raises or dies leaves every event it did not get new, as django-spark did.
    Claimed events owe their handler calls: those the consumer does not make (it stops
    or dies before) are finished by ``manage.py retry_spark_events``.
    """
    # Before the first read, which is written for SQLite and PostgreSQL only.
    check_database(connections[using])
    chunk_size = get_settings().CHUNK_SIZE
    iterator = iter(events)
    while chunk := list(islice(iterator, chunk_size)):
        first: dict[str, Event[Any]] = {}
        for candidate in chunk:
            valid = validate_event(candidate)
            first.setdefault(valid["key"], valid)
        # One read drops the keys seen before, so they cost no claim; the claims below
        # still decide races with other claimers (a key taken since is not yielded).
        seen = seen_keys(list(first), using=using)
        new = [event for key, event in first.items() if key not in seen]
        # Converted before the chunk's first claim: an unstorable context fails the chunk
        # with nothing of it written.
        contexts = {
            event["key"]: dump_context_json(event["context"], key=event["key"]) for event in new
        }
        for event in new:
            claimed = claim_events([event], using=using, contexts=contexts)
            if claimed:
                # A claimed event is a dict equal to the one passed in, so its static type
                # (and the handler-side context type, e.g. Event[ChallengeContext]) carries
                # over.
                yield cast("E", claimed[0])
