"""Running handler calls: each call atomic and isolated, many calls per transaction.

A call runs in a savepoint of its own (:class:`~spark_decl.transactions.CallSavepoint`):
a handler that raises leaves none of its writes behind, and the calls around it go on.
Calls share transactions that last about ``SPARK_DECL["TRANSACTION_SECONDS"]``: fast
handlers share one commit (one fsync on SQLite), slow ones (mail, webhooks) commit about
that often, which bounds how long a write lock is held and how much a crash rolls back.

A call has a :class:`~spark_decl.models.HandlerOutcome` row, or gets one in the
transaction it runs in (:mod:`spark_decl.outcomes` holds the states):

* A call with a row is *taken* first (:func:`~spark_decl.outcomes.take` moves the row to
  ``done``) in the handler's transaction: the lock that keeps two processes from running
  one call. A failure is stored on the row; a crash rolls back both, leaving it pending.
* A call whose event was claimed in the open transaction has no row yet, and needs no
  lock: no other process can see the claim before it commits. :meth:`CallRunner.run_claimed`
  runs it there and writes its row with its result (one statement for all of them), and
  a ``pending`` row for each call the time budget leaves for later transactions.
* A call of an event that was not claimed (:func:`~spark_decl.process_events` without
  :func:`~spark_decl.only_new_events`) has no row at all: its failure is only reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from asgiref.sync import async_to_sync
from django.db import connections, transaction

from . import outcomes
from .conf import get_settings
from .signals import call_finished, handler_failed
from .transactions import CallSavepoint, call_savepoints

if TYPE_CHECKING:
    from .registry import HandlerSpec
    from .types import Event

logger = logging.getLogger("spark_decl")

# Recorded calls are taken a batch at a time (one UPDATE); a transaction ends only between
# batches. The bound keeps the UPDATE's parameters under SQLite's historic 999.
MAX_BATCH = 900


@dataclass(slots=True)
class Call:
    """One handler to run for one event.

    ``record_id`` is the event's row when it was claimed; ``outcome_id`` the call's own row
    once it has one. A retry of a failed call sets ``expected``: the row is taken only if
    it still has that (status, attempts), that is, if no other process ran it since.
    """

    spec: HandlerSpec
    event: Event[Any]
    record_id: int | None = None
    outcome_id: int | None = None
    expected: tuple[str, int] | None = None


@dataclass(slots=True)
class Finished:
    """A call that ran, as ``call_finished`` reports it."""

    call: Call
    status: str
    attempt: int
    duration: float


@dataclass
class RunResult:
    """What running calls did; the failures (and, when ``call_finished`` has receivers,
    every call that ran) are reported once the transaction is over."""

    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # taken by another process first
    failures: list[tuple[Call, Exception]] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)

    def report(self) -> None:
        """Log each failure and send ``handler_failed``, then send ``call_finished`` for
        each call that ran."""
        for call, exc in self.failures:
            report_failure(call.spec, call.event, exc)
        self.failures = []
        for done in self.finished:
            event = done.call.event
            call_finished.send_robust(
                sender=None,
                event=event,
                group=event["group"],
                handler=done.call.spec.name,
                status=done.status,
                attempt=done.attempt,
                duration=done.duration,
                background=done.call.spec.background,
            )
        self.finished = []


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
        #: Whether a handler was called: from then on the transaction it ran in must not
        #: be run again (its effects outside the database would repeat).
        self.called = False
        self._budget = get_settings().TRANSACTION_SECONDS
        #: Whether calls are timed for ``call_finished``: only when it has receivers (read
        #: once: a receiver connected meanwhile sees the calls of the next run).
        self._timed = bool(call_finished.receivers)

    def run(self, calls: Sequence[Call]) -> RunResult:
        """Run ``calls`` (with rows, or of unclaimed events) in order, in transactions of
        about ``TRANSACTION_SECONDS`` each."""
        index = 0
        while index < len(calls):
            with transaction.atomic(using=self.using):
                index = self._segment(calls, index)
        return self.result

    def run_claimed(self, calls: Sequence[Call]) -> int:
        """Inside the open transaction that claimed their events, run ``calls`` (no rows
        yet) until the time budget is spent, then write every one's row: its result, or
        ``pending`` for the calls not reached, which get their ``outcome_id`` for
        :meth:`run` to take them in later transactions. Returns how many ran."""
        reached = self._segment(calls, 0)
        new_rows = outcomes.NewRows(self.connection)
        failed = {id(call): exc for call, exc in self.result.failures}
        results = [
            new_rows.result(cast("int", call.record_id), call.spec.name, failed.get(id(call)))
            for call in calls[:reached]
        ]
        later = [
            new_rows.pending(cast("int", call.record_id), call.spec.name)
            for call in calls[reached:]
        ]
        with self.connection.cursor() as cursor:
            outcomes.insert(cursor, results)
            ids = outcomes.insert_returning_ids(cursor, later)
        for call in calls[reached:]:
            call.outcome_id = ids[cast("int", call.record_id), call.spec.name]
        return reached

    def _segment(self, calls: Sequence[Call], index: int) -> int:
        """Inside an open transaction, run calls from ``index`` until the time budget is
        spent; return the index of the first call not run.

        Calls with rows are taken a batch at a time. The first batch is one call; the next
        is sized from the time per call so far to fill what is left of the budget, so fast
        handlers cost a few statements per chunk and slow ones still commit on time.
        """
        started = time.monotonic()
        size = 1
        with call_savepoints(self.connection) as savepoint:
            while index < len(calls):
                batch = calls[index : index + size]
                taken = self._take(batch)
                batch_started = time.monotonic()
                for call in batch:
                    self._run_one(call, taken, savepoint)
                index += len(batch)
                now = time.monotonic()
                left = self._budget - (now - started)
                if left <= 0:
                    break
                per_call = max((now - batch_started) / len(batch), 1e-6)
                size = max(1, min(MAX_BATCH, int(left / per_call)))
        return index

    def _take(self, batch: Sequence[Call]) -> dict[int, int]:
        """Take the batch's calls that have rows; return ``{outcome id: attempts}`` of
        those taken. Pending calls in one statement, retries one at a time (each only if
        its row is as the retry saw it)."""
        pending = [c.outcome_id for c in batch if c.outcome_id is not None and not c.expected]
        taken = outcomes.take(self.connection, pending)
        for call in batch:
            if call.outcome_id is not None and call.expected is not None:
                status, attempts = call.expected
                taken.update(
                    outcomes.take(
                        self.connection, [call.outcome_id], status=status, attempts=attempts
                    )
                )
        return taken

    def _run_one(self, call: Call, taken: dict[int, int], savepoint: CallSavepoint) -> None:
        attempts = 1
        if call.outcome_id is not None:
            if call.outcome_id not in taken:
                self.result.skipped += 1
                return
            attempts = taken[call.outcome_id]
        self.called = True
        timed = self._timed
        started = time.perf_counter() if timed else 0.0
        try:
            with savepoint:
                call_handler(call.spec, call.event)
        except Exception as exc:
            duration = time.perf_counter() - started if timed else 0.0
            self.result.failed += 1
            self.result.failures.append((call, exc))
            if call.outcome_id is not None:
                outcomes.fail(self.connection, call.outcome_id, exc, attempts=attempts)
            if timed:
                # A call of an unclaimed event has no row to give up on: it stays "failed".
                recorded = call.record_id is not None or call.outcome_id is not None
                status = outcomes.status_after_failure(attempts) if recorded else outcomes.FAILED
                self.result.finished.append(Finished(call, status, attempts, duration))
        else:
            self.result.succeeded += 1
            if timed:
                duration = time.perf_counter() - started
                self.result.finished.append(Finished(call, outcomes.DONE, attempts, duration))


def report_failure(spec: HandlerSpec, event: Event[Any], exc: Exception) -> None:
    """Log a failed call on ``spark_decl`` and send ``handler_failed`` (whose receivers'
    own failures Django's ``send_robust()`` logs)."""
    logger.error(
        "Handler %s failed for event %r (group %r)",
        spec.name,
        event["key"],
        event["group"],
        exc_info=exc,
    )
    handler_failed.send_robust(sender=None, event=event, handler=spec.name, exception=exc)
