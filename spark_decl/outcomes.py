"""The state of every handler call, in one place: one :class:`~spark_decl.models.HandlerOutcome`
row per call an event owes.

A call is ``pending`` (owed: not run yet, or its process died), ``done``, ``failed`` (run
again by ``retry_spark_events`` once its backoff has passed) or ``given_up`` (after
``MAX_ATTEMPTS``). Every writer goes through this module: the claim writes pending rows, or
the rows of calls it ran with their results (:func:`insert`); a process runs a recorded
call only after :func:`take` moved its row to ``done`` in the handler's own transaction
(the lock that keeps two processes from running one call); a failure is stored by
:func:`fail`. The admin, ``spark_inspect``, replay, pruning and retry read the same rows,
so they cannot disagree.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from .conf import get_settings
from .vendors import MAX_PARAMETERS, column_of, quote, vendor_of

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.utils import CursorWrapper
    from django.db.models import Field

    from .models import HandlerOutcome

# The statuses (HandlerOutcome.Status), here as plain strings: this module is imported
# before the app registry is ready, which models are not.
PENDING, DONE, FAILED, GIVEN_UP = "pending", "done", "failed", "given_up"
STATUSES = (PENDING, DONE, FAILED, GIVEN_UP)

# The columns of every row spark_decl inserts, and what comes back: (id, record, handler).
FIELDS = (
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
RETURNING = ("id", "record", "handler")


# A failure's stored text is bounded: a handler's exception can carry any amount of it (a
# 600 KB traceback was seen), and each retry writes it again.
ERROR_MAX_CHARS = 10_000
TRACEBACK_MAX_CHARS = 50_000


# -- writing -------------------------------------------------------------------------------


class NewRows:
    """Builds the outcome rows one statement inserts, all written at one moment (their
    datetimes bound once: binding one costs as much as building the row)."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        self.connection = connection
        self.now = timezone.now()
        self.stamp = vendor_of(connection).parameter(connection, self.now)

    def pending(self, record_id: int, handler: str) -> tuple[Any, ...]:
        """The row of a call owed and not run yet."""
        return (record_id, handler, PENDING, 0, "", "", self.stamp, None, None)

    def result(
        self, record_id: int, handler: str, failure: BaseException | None
    ) -> tuple[Any, ...]:
        """The row of a call run for the first time, in the transaction that claimed its
        event: ``done``, or failed with ``failure``."""
        if failure is None:
            return (record_id, handler, DONE, 1, "", "", self.stamp, self.stamp, None)
        status, next_attempt_at = schedule_after_failure(1, self.now)
        error, trace = describe(failure)
        due = (
            vendor_of(self.connection).parameter(self.connection, next_attempt_at)
            if next_attempt_at is not None
            else None
        )
        return (record_id, handler, status, 1, error, trace, self.stamp, None, due)


def insert(cursor: CursorWrapper, rows: Sequence[Sequence[Any]]) -> None:
    """Insert outcome rows (from :class:`NewRows`)."""
    from .models import HandlerOutcome

    vendor_of(cursor.db).insert_rows(cursor, HandlerOutcome, FIELDS, rows)


def insert_returning_ids(
    cursor: CursorWrapper, rows: Sequence[Sequence[Any]]
) -> dict[tuple[int, str], int]:
    """:func:`insert`, returning the rows' ids by (event id, handler name)."""
    from .models import HandlerOutcome

    inserted = vendor_of(cursor.db).insert_rows(
        cursor, HandlerOutcome, FIELDS, rows, returning=RETURNING
    )
    return {(record_id, handler): pk for pk, record_id, handler in inserted}


def take(
    connection: BaseDatabaseWrapper,
    ids: Sequence[int],
    *,
    status: str = PENDING,
    attempts: int | None = None,
) -> dict[int, int]:
    """Move the rows ``ids`` that still have ``status`` (and ``attempts``) to ``done``, in
    the open transaction; return ``{id: attempts}`` of those taken. A row taken here is
    the caller's to run: no other process can take it until this transaction ends, and a
    rollback gives it back."""
    from .models import HandlerOutcome

    if not ids:
        return {}
    column = {
        name: column_of(HandlerOutcome, name)
        for name in ("id", "status", "attempts", "finished_at", "next_attempt_at")
    }
    finished = cast("Field[Any, Any]", HandlerOutcome._meta.get_field("finished_at"))
    now = finished.get_db_prep_save(timezone.now(), connection)
    sql = (
        f"UPDATE {quote(HandlerOutcome._meta.db_table)} SET {column['status']} = %s, "
        f"{column['attempts']} = {column['attempts']} + 1, {column['finished_at']} = %s, "
        f"{column['next_attempt_at']} = NULL "
        f"WHERE {column['id']} IN ({', '.join(['%s'] * len(ids))}) AND {column['status']} = %s"
    )
    params: list[Any] = [DONE, now, *ids, status]
    if attempts is not None:
        sql += f" AND {column['attempts']} = %s"
        params.append(attempts)
    sql += f" RETURNING {column['id']}, {column['attempts']}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return dict(cursor.fetchall())


def fail(
    connection: BaseDatabaseWrapper,
    outcome_id: int,
    exc: BaseException,
    *,
    attempts: int,
    if_attempts: int | None = None,
) -> None:
    """Store that the call of row ``outcome_id`` failed at its ``attempts``-th attempt
    (only if the row still counts ``if_attempts``, when given: another process may have
    run it meanwhile)."""
    from .models import HandlerOutcome

    status, next_attempt_at = schedule_after_failure(attempts, timezone.now())
    error, trace = describe(exc)
    rows = HandlerOutcome.objects.using(connection.alias).filter(pk=outcome_id)
    if if_attempts is not None:
        rows = rows.filter(attempts=if_attempts)
    rows.update(
        status=status,
        attempts=attempts,
        next_attempt_at=next_attempt_at,
        finished_at=None,
        last_error=error,
        traceback=trace,
    )


def fail_unrun(
    connection: BaseDatabaseWrapper, outcome: HandlerOutcome, exc: BaseException
) -> None:
    """Count a failed attempt for ``outcome``'s call, which could not even be run (its
    stored context cannot be rebuilt), unless another process ran it meanwhile."""
    fail(
        connection,
        outcome.pk,
        exc,
        attempts=outcome.attempts + 1,
        if_attempts=outcome.attempts,
    )


def status_after_failure(attempts: int) -> str:
    """The status of a call that has now failed ``attempts`` times: ``failed``, or
    ``given_up`` after ``MAX_ATTEMPTS``."""
    return GIVEN_UP if attempts >= get_settings().MAX_ATTEMPTS else FAILED


def schedule_after_failure(attempts: int, now: datetime) -> tuple[str, datetime | None]:
    """The status and next due time of a call that has now failed ``attempts`` times."""
    config = get_settings()
    if status_after_failure(attempts) == GIVEN_UP:
        return GIVEN_UP, None
    if attempts <= 1:
        # Someone who fixed the bug and runs retry_spark_events expects it to run now.
        return FAILED, now
    delay = min(config.BACKOFF_SECONDS * 2 ** (attempts - 2), config.BACKOFF_MAX_SECONDS)
    return FAILED, now + timedelta(seconds=delay)


# -- reading -------------------------------------------------------------------------------


def owed_by(
    connection: BaseDatabaseWrapper, claims: Iterable[tuple[int, str]]
) -> dict[tuple[int, str], dict[str, int]]:
    """For each claim (event id, key) that exists, its pending calls: ``{(event id, key):
    {handler: outcome id}}`` (empty when it owes none). A claim whose savepoint rolled back
    is absent, even if SQLite gave its id to a later claim: the key must match too."""
    from .models import EventRecord, HandlerOutcome

    event = {name: column_of(EventRecord, name) for name in ("id", "key")}
    call = {
        name: column_of(HandlerOutcome, name) for name in ("id", "record", "handler", "status")
    }
    sql = (
        f"SELECT e.{event['id']}, e.{event['key']}, o.{call['handler']}, o.{call['id']} "
        f"FROM {quote(EventRecord._meta.db_table)} e "
        f"LEFT JOIN {quote(HandlerOutcome._meta.db_table)} o "
        f"ON o.{call['record']} = e.{event['id']} AND o.{call['status']} = %s "
        f"WHERE e.{event['id']} IN "
    )
    wanted = set(claims)
    ids = sorted({record_id for record_id, _ in wanted})
    owed: dict[tuple[int, str], dict[str, int]] = {}
    with connection.cursor() as cursor:
        for start in range(0, len(ids), MAX_PARAMETERS):
            batch = ids[start : start + MAX_PARAMETERS]
            cursor.execute(f"{sql}({', '.join(['%s'] * len(batch))})", [PENDING, *batch])
            for record_id, key, handler, outcome_id in cursor.fetchall():
                if (record_id, key) not in wanted:
                    continue
                calls = owed.setdefault((record_id, key), {})
                if handler is not None:
                    calls[handler] = outcome_id
    return owed


def reached(handler: str) -> Exists:
    """Events that have a call of ``handler``, whatever its status (replay never sends an
    event to a handler twice)."""
    from .models import HandlerOutcome

    return Exists(HandlerOutcome.objects.filter(record=OuterRef("pk"), handler=handler))


def unfinished() -> Exists:
    """Events with a call that is not ``done`` (pending, failed or given up)."""
    from .models import HandlerOutcome

    return Exists(HandlerOutcome.objects.filter(record=OuterRef("pk")).exclude(status=DONE))


def not_done() -> Q:
    """Outcome rows whose call is not done: the condition of ``spark_decl_due_idx``."""
    return ~Q(status=DONE)


# -- what a failure stores -------------------------------------------------------------------


def describe(exc: BaseException) -> tuple[str, str]:
    """A failed call's error message and traceback, as they are stored.

    Never raises, and both can be stored in any text column, whatever the exception holds:
    the message names the exception's type even when ``str(exc)`` raises (``<unprintable
    ValueError: str() raised KeyError: 'x'>``), and both pass through :func:`storable`.
    """
    error = storable(exception_text(exc), ERROR_MAX_CHARS)
    try:
        trace = "".join(traceback.format_exception(exc))
    except Exception as failure:
        # format_exception() copes with str() raising; this is for whatever else a
        # strange exception object can do to it.
        trace = (
            f"<the traceback of {exception_text(exc)} could not be formatted: "
            f"{exception_text(failure)}>"
        )
    return error, storable(trace, TRACEBACK_MAX_CHARS)


def exception_text(exc: BaseException) -> str:
    """``"Type: message"``, or, when ``str(exc)`` raises, what stands for it."""
    kind = type(exc).__name__
    try:
        return f"{kind}: {exc}"
    except Exception as failure:
        try:
            reason = f"{type(failure).__name__}: {failure}"
        except Exception:
            reason = type(failure).__name__
        return f"<unprintable {kind}: str() raised {reason}>"


def storable(text: str, max_chars: int) -> str:
    """``text`` as every database can store it, in at most ``max_chars`` characters.

    NUL becomes ``\\x00`` (PostgreSQL refuses it in text) and a lone surrogate its
    ``\\udcXX`` escape (what :func:`os.fsdecode` makes of undecodable bytes: no driver can
    encode it to UTF-8); then :func:`clip` bounds it.
    """
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return clip(text, max_chars)


def clip(text: str, max_chars: int) -> str:
    """``text``, or, if it is longer than ``max_chars``, its head and its tail (where a
    traceback's first and last exceptions are) around a line saying how much was cut."""
    if len(text) <= max_chars:
        return text
    marker = "\n\n[... {:,} characters cut ...]\n\n"
    # What is cut is less than the whole text, so its count is no longer than this one.
    room = max_chars - len(marker.format(len(text)))
    head = room // 2
    tail = room - head
    return text[:head] + marker.format(len(text) - room) + text[len(text) - tail :]
