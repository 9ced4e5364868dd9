"""Running handler calls: each call atomic and isolated, many calls per transaction.

A call runs inside a savepoint, so a handler that raises leaves none of its writes behind
and the calls around it are unaffected. Calls are grouped into transactions that last
about ``SPARK_DECL["TRANSACTION_SECONDS"]``: fast handlers share one commit (one fsync on
SQLite) instead of paying one each, while slow ones (mail, webhooks) commit about that
often, which bounds both how long a write lock is held and how much work a crash can
roll back.

A recorded call (one with a :class:`~spark_decl.models.HandlerOutcome` row) is *taken*
first: a conditional ``UPDATE`` moves its row from ``pending`` (or ``failed``) to ``done``
in the same transaction as the handler. That update is the lock that keeps two processes
from running one call, and a crash rolls it back with the handler's writes, leaving the
call pending for ``retry_spark_events``.

A call whose event was claimed in the same, still open, transaction has no row to take,
and needs no lock: no other process can see the claim before it commits. The claim wrote
it as done (``EventRecord.done_at_claim``), so a call that succeeds costs no statement at
all. After the segment, each call that failed leaves ``done_at_claim`` for a ``failed``
row with its error, and each call the segment did not reach for a ``pending`` row, taken
like any recorded call by the segments that follow. Either way a call's record commits
with the handler's writes, or rolls back with them.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from asgiref.sync import async_to_sync
from django.db import connections, transaction
from django.db.transaction import Atomic, TransactionManagementError
from django.utils import timezone

from .claims import (
    OUTCOME_FIELDS,
    OUTCOME_RETURNING,
    db_datetime,
    insert_rows,
    update_done_at_claim,
)
from .conf import get_settings
from .signals import handler_failed

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import Field

    from .claims import ClaimedEvent
    from .registry import HandlerSpec
    from .types import Event

logger = logging.getLogger("spark_decl")

PENDING, DONE, FAILED, GIVEN_UP = "pending", "done", "failed", "given_up"
# Calls are taken a group at a time (one UPDATE); a transaction ends only between groups.
MAX_GROUP_SIZE = 900  # parameters stay under SQLite's historic 999


@dataclass(slots=True)
class Call:
    """One handler to run for one event; ``outcome_id`` is ``None`` for unrecorded calls.

    ``record_id`` is the event's claim, set by the dispatch of claimed events. A call with a
    ``record_id`` and no ``outcome_id`` was claimed in the open transaction and its row is
    not written yet: :meth:`CallRunner.record_outcomes` writes it.
    """

    spec: HandlerSpec
    event: Event[Any]
    outcome_id: int | None = None
    # For retries: the call is only taken if its row still has this status and attempts.
    status: str = PENDING
    attempts: int | None = None
    record_id: int | None = None
    #: What a call without a row yet came to, until :meth:`CallRunner.record_outcomes`
    #: writes it: (status, attempts, error, traceback, next attempt ready for the database).
    result: tuple[str, int, str, str, Any] | None = None


@dataclass
class Failure:
    call: Call
    exception: Exception


@dataclass
class RunResult:
    """What running a list of calls did, plus the failures to report after commit."""

    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)

    def report(self) -> None:
        """Log each failure and send ``handler_failed``; call once the transaction is over."""
        for failure in self.failures:
            report_failure(failure.call.spec, failure.call.event, failure.exception)
        self.failures = []


def call_handler(spec: HandlerSpec, event: Event[Any]) -> None:
    if spec.is_async:
        async_to_sync(cast("Callable[[Event[Any]], Awaitable[object]]", spec.function))(event)
    else:
        spec.function(event)


class CallRunner:
    """Runs calls on one database alias, a transaction at a time."""

    def __init__(self, using: str) -> None:
        self.using = using
        self.connection = connections[using]
        self.result = RunResult()
        #: Whether a handler was called: from then on, the transaction it ran in is not run
        #: again (see :func:`~spark_decl.dispatch.claim_and_dispatch`).
        self.called = False
        self._budget = get_settings().TRANSACTION_SECONDS
        self._block = transaction.Atomic(using, savepoint=True, durable=False)

    def run(self, calls: Sequence[Call], start: int = 0) -> RunResult:
        """Run ``calls[start:]`` in order, committing about every ``TRANSACTION_SECONDS``."""
        index = start
        while index < len(calls):
            with transaction.atomic(using=self.using):
                index = self.run_segment(calls, index)
        return self.result

    def run_segment(self, calls: Sequence[Call], index: int = 0) -> int:
        """Inside an open transaction, run calls from ``index`` until the time budget is
        spent; return the index of the first call not run.

        Recorded calls are taken a group at a time. The first group is one call; the next
        is sized from the time per call so far to fill what is left of the budget, so fast
        handlers are taken with a few statements per chunk and slow ones still commit on
        time.
        """
        started = time.monotonic()
        group_size = 1
        cursor = self.connection.connection.cursor()
        guard = CallSavepoint(self.connection, cursor, self._block)
        try:
            with self.connection.execute_wrapper(guard):
                while index < len(calls):
                    group = calls[index : index + group_size]
                    taken = self._take(group)
                    group_started = time.monotonic()
                    for call in group:
                        self._run_one(call, taken, guard)
                    index += len(group)
                    now = time.monotonic()
                    left = self._budget - (now - started)
                    if left <= 0:
                        break
                    per_call = max((now - group_started) / len(group), 1e-6)
                    group_size = max(1, min(MAX_GROUP_SIZE, int(left / per_call)))
        finally:
            cursor.close()
        return index

    def record_outcomes(self, calls: Sequence[Call]) -> None:
        """Inside the transaction that claimed their events, settle ``calls`` (the calls
        their claims wrote as done, ``done_at_claim``): a call that succeeded stays so; a
        call that failed leaves ``done_at_claim`` for a row with its result, and a call not
        run for a ``pending`` row, whose ``outcome_id`` it gets, so that a later segment
        takes it like any recorded call.

        All succeeded, as is usual, this writes nothing.
        """
        from .models import HandlerOutcome

        now: Any = None
        failed: list[tuple[Any, ...]] = []
        pending: list[Call] = []
        taken_back: dict[int, set[str]] = {}
        for call in calls:
            result = call.result
            if result is SUCCEEDED:
                continue
            record_id = cast("int", call.record_id)
            taken_back.setdefault(record_id, set()).add(call.spec.name)
            if now is None:
                now = db_datetime(self.connection, timezone.now())
            if result is None:
                pending.append(call)
            else:
                status, attempts, error, trace, next_attempt_at = result
                row = (record_id, call.spec.name, status, attempts, error, trace)
                failed.append((*row, now, None, next_attempt_at))
        if not taken_back:
            return
        new_rows = [
            (call.record_id, call.spec.name, PENDING, 0, "", "", now, None, None)
            for call in pending
        ]
        with self.connection.cursor() as cursor:
            update_done_at_claim(cursor, _still_done(calls, taken_back))
            insert_rows(cursor, HandlerOutcome, OUTCOME_FIELDS, failed)
            inserted = insert_rows(
                cursor, HandlerOutcome, OUTCOME_FIELDS, new_rows, returning=OUTCOME_RETURNING
            )
        ids = {(record_id, handler): pk for pk, record_id, handler in inserted}
        for call in pending:
            call.outcome_id = ids[call.record_id, call.spec.name]

    def _run_one(self, call: Call, taken: dict[int, int], guard: CallSavepoint) -> None:
        attempts = 1
        if call.outcome_id is not None:
            if call.outcome_id not in taken:
                self.result.skipped += 1
                return
            attempts = taken[call.outcome_id]
        self.called = True
        try:
            with guard:
                call_handler(call.spec, call.event)
        except Exception as exc:
            self.result.failed += 1
            self.result.failures.append(Failure(call, exc))
            if call.outcome_id is not None:
                record_failure(call.outcome_id, attempts, exc, using=self.using)
            elif call.record_id is not None:
                status, next_attempt_at = schedule_after_failure(attempts, timezone.now())
                error, trace = describe(exc)
                if next_attempt_at is not None:
                    next_attempt_at = db_datetime(self.connection, next_attempt_at)
                call.result = (status, attempts, error, trace, next_attempt_at)
        else:
            self.result.succeeded += 1
            if call.outcome_id is None and call.record_id is not None:
                call.result = SUCCEEDED

    def _take(self, group: Sequence[Call]) -> dict[int, int]:
        """Mark the group's recorded calls done (if still runnable); return id -> attempts.

        Calls left pending are taken with one statement; retries of failed calls one at a
        time, each only if its attempts are still what the caller saw.
        """
        pending = [c.outcome_id for c in group if c.outcome_id is not None and c.attempts is None]
        taken = take_outcomes(self.connection, pending, status=PENDING) if pending else {}
        for call in group:
            if call.outcome_id is not None and call.attempts is not None:
                taken.update(
                    take_outcomes(
                        self.connection,
                        [call.outcome_id],
                        status=call.status,
                        attempts=call.attempts,
                    )
                )
        return taken


SUCCEEDED = (DONE, 1, "", "", None)  # a first attempt, done


def _still_done(calls: Sequence[Call], taken_back: dict[int, set[str]]) -> dict[int, str]:
    """``done_at_claim``'s new JSON for each event in ``taken_back``: its claim's, without
    the handlers taken back."""
    from .claims import done_json

    still: dict[int, str] = {}
    for call in calls:
        record_id = cast("int", call.record_id)
        if record_id in still or record_id not in taken_back:
            continue
        claim = cast("ClaimedEvent", call.event).spark_claim
        gone = taken_back[record_id]
        still[record_id] = done_json(
            spec
            for spec, outcome_id in zip(claim.handlers, claim.outcome_ids, strict=True)
            if outcome_id is None and spec.name not in gone
        )
    return still


SAVEPOINT = "SAVEPOINT spark_decl_call"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT spark_decl_call"
RELEASE = "RELEASE SAVEPOINT spark_decl_call"


class CallSavepoint:
    """``transaction.atomic()`` for one handler call at a time, inside an open transaction.

    Use it as ``connection.execute_wrapper(guard)`` around a segment, and ``with guard:``
    around each call. It keeps Django's bookkeeping exactly as a nested ``Atomic`` does:
    ``savepoint_ids`` (so ``on_commit`` callbacks registered by a failing handler are
    dropped), ``atomic_blocks`` and ``needs_rollback``. What it saves:

    * The SAVEPOINT is sent lazily, just before the handler's first query (the execute
      wrapper sees every query made through Django's cursors): a handler that never
      touches the database (a mail, a webhook, a no-op) costs no statement at all.
    * The statements go to one DB-API cursor reused for the whole segment, not through a
      new Django cursor wrapper each, and always under the same name, so the driver's
      statement cache serves them (savepoints may share a name; ROLLBACK TO and RELEASE
      act on the newest). The id in ``savepoint_ids`` stays unique, since Django files
      ``on_commit`` callbacks under it.

    Writes made through a raw DB-API cursor (``connection.connection.cursor()``) bypass the
    wrapper and are not covered.
    """

    def __init__(self, connection: BaseDatabaseWrapper, cursor: Any, block: Atomic) -> None:
        self.connection = connection
        self.cursor = cursor
        self.block = block  # stands for the call in connection.atomic_blocks
        self.active = False
        self.opened = False
        self.sid = ""

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if self.active and not self.opened:
            self.opened = True
            self.cursor.execute(SAVEPOINT)
        return execute(sql, params, many, context)

    def __enter__(self) -> None:
        connection = self.connection
        if connection.needs_rollback:
            raise TransactionManagementError(
                "spark_decl: the transaction is marked for rollback; cannot run a handler."
            )
        connection.savepoint_state += 1
        self.sid = f"spark_decl_{connection.savepoint_state}"
        connection.savepoint_ids.append(self.sid)
        connection.atomic_blocks.append(self.block)
        self.opened = False
        self.active = True

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.active = False
        connection = self.connection
        connection.atomic_blocks.pop()
        connection.savepoint_ids.pop()
        if exc_type is not None:
            self._roll_back()
            return
        if connection.needs_rollback:
            # The handler swallowed a database error (or called set_rollback(True)):
            # its writes cannot be trusted, so the call counts as failed.
            self._roll_back()
            raise TransactionManagementError(
                "The handler left the transaction marked for rollback (it caught a "
                "database error or called transaction.set_rollback(True)); its writes "
                "were rolled back."
            )
        if self.opened:
            self.cursor.execute(RELEASE)

    def _roll_back(self) -> None:
        connection = self.connection
        connection.needs_rollback = False
        if self.opened:
            self.cursor.execute(ROLLBACK_TO)
            self.cursor.execute(RELEASE)
        sid = self.sid
        if connection.run_on_commit:
            connection.run_on_commit = [
                entry for entry in connection.run_on_commit if sid not in entry[0]
            ]


def take_outcomes(
    connection: BaseDatabaseWrapper,
    ids: Sequence[int],
    *,
    status: str,
    attempts: int | None = None,
) -> dict[int, int]:
    """Move runnable outcome rows to ``done``; return ``{id: attempts}`` of those taken."""
    from .models import HandlerOutcome

    meta = HandlerOutcome._meta
    quote = connection.ops.quote_name
    fields = {
        name: cast("Field[Any, Any]", meta.get_field(name))
        for name in ("id", "status", "attempts", "finished_at", "next_attempt_at")
    }
    column = {name: quote(field.column) for name, field in fields.items()}
    now = fields["finished_at"].get_db_prep_save(timezone.now(), connection)
    placeholders = ", ".join(["%s"] * len(ids))
    sql = (
        f"UPDATE {quote(meta.db_table)} SET {column['status']} = %s, "
        f"{column['attempts']} = {column['attempts']} + 1, {column['finished_at']} = %s, "
        f"{column['next_attempt_at']} = NULL "
        f"WHERE {column['id']} IN ({placeholders}) AND {column['status']} = %s"
    )
    params: list[Any] = [DONE, now, *ids, status]
    if attempts is not None:
        sql += f" AND {column['attempts']} = %s"
        params.append(attempts)
    sql += f" RETURNING {column['id']}, {column['attempts']}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return dict(cursor.fetchall())


def record_failure(outcome_id: int, attempts: int, exc: Exception, *, using: str) -> None:
    """Store a failed call: status, error, traceback and when it is due again."""
    from .models import HandlerOutcome

    status, next_attempt_at = schedule_after_failure(attempts, timezone.now())
    error, trace = describe(exc)
    HandlerOutcome.objects.using(using).filter(pk=outcome_id).update(
        status=status,
        next_attempt_at=next_attempt_at,
        finished_at=None,
        last_error=error,
        traceback=trace,
    )


# A failure's stored text is bounded: a handler's exception can carry any amount of it (a
# 600 KB traceback was seen), and each retry writes it again.
ERROR_MAX_CHARS = 10_000
TRACEBACK_MAX_CHARS = 50_000


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


def schedule_after_failure(attempts: int, now: datetime) -> tuple[str, datetime | None]:
    """The status and next due time of a call that has now failed ``attempts`` times."""
    config = get_settings()
    if attempts >= config.MAX_ATTEMPTS:
        return GIVEN_UP, None
    if attempts <= 1:
        # Someone who fixed the bug and runs retry_spark_events expects it to run now.
        return FAILED, now
    delay = min(config.BACKOFF_SECONDS * 2 ** (attempts - 2), config.BACKOFF_MAX_SECONDS)
    return FAILED, now + timedelta(seconds=delay)


def report_failure(spec: HandlerSpec, event: Event[Any], exc: Exception) -> None:
    logger.error(
        "Handler %s failed for event %r (group %r)",
        spec.name,
        event["key"],
        event["group"],
        exc_info=exc,
    )
    for receiver, response in handler_failed.send_robust(
        sender=None, event=event, handler=spec.name, exception=exc
    ):
        if isinstance(response, Exception):
            logger.error("Receiver %r of handler_failed raised", receiver, exc_info=response)
