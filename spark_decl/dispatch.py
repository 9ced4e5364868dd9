"""Routing events to handlers, when they run, and the ``event_dispatched`` signal.

Handlers run after the transaction that claimed their events commits. Outside a
transaction, the claim and the first handler calls share one transaction (one commit), and
the outcome rows of those calls are written once, with their results, instead of
``pending`` and then ``done``.

The events of saves made inside a transaction are claimed when it commits, all together:
a transaction of 2,000 saves costs one claim statement and one dispatch after its commit,
not a claim per save inside it (see :func:`claim_after_save`). Claims made inside a
caller's transaction otherwise (:func:`~spark_decl.only_new_events`,
:func:`~spark_decl.process_queryset`) are collected per connection and dispatched together
once it commits.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction

from .background import check_enqueueable, enqueues_with_claims, submit
from .calls import Call, CallRunner
from .claims import MAX_PARAMETERS, claim_again, claim_events
from .conf import get_settings
from .context import dump_context_json
from .registry import registry
from .signals import event_dispatched
from .validation import validate_event

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .claims import Claim, ClaimedEvent
    from .types import Event

logger = logging.getLogger("spark_decl")

# Switched on, process-wide, by spark_decl.testing.capture_events(run_handlers=False): events
# are still claimed and event_dispatched is still sent, but no handler call is built, so
# none is run or enqueued (claimed calls stay pending).
handlers_suppressed = False


@dataclass
class DispatchResult:
    """Counts of what a dispatch did."""

    events: int = 0
    calls: int = 0
    failed: int = 0
    skipped: int = 0
    #: Background calls enqueued (or to be enqueued when the transaction commits).
    enqueued: int = 0

    def __iadd__(self, other: DispatchResult) -> DispatchResult:
        self.events += other.events
        self.calls += other.calls
        self.failed += other.failed
        self.skipped += other.skipped
        self.enqueued += other.enqueued
        return self


def process_events(
    events: Iterable[Event[Any]] | Iterable[Mapping[str, Any]],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """Send each event to every handler whose pattern matches its group.

    Does *not* dedupe: wrap the events in :func:`only_new_events` for that. Inside a
    transaction the handlers run after it commits (and never, if it rolls back); otherwise
    at once. Each handler call is isolated and atomic; ``event_dispatched`` is sent once per
    event after its handlers ran.
    """
    chunk_size = get_settings().CHUNK_SIZE
    iterator = iter(events)
    while chunk := list(islice(iterator, chunk_size)):
        valid = [validate_event(candidate) for candidate in chunk]
        for event in valid:
            # An unclaimed event travels to background handlers in the task: refuse an
            # unstorable context now, not in the worker. (A claim checked it already.)
            if _claim_of(event) is None and any(
                spec.background for spec in registry.handlers_for(event["group"])
            ):
                check_enqueueable(event)
        schedule(valid, using=using)


def schedule(events: list[Event[Any]], *, using: str) -> DispatchResult | None:
    """Dispatch now when not in a transaction, else once it commits (returns ``None``)."""
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:
        return dispatch(events, using=using)
    claimed = [event for event in events if _claim_of(event) is not None]
    if claimed:
        _dispatch_on_commit(claimed, connection, using=using)
    if len(claimed) < len(events):
        unclaimed = _Pending([event for event in events if _claim_of(event) is None], using)
        transaction.on_commit(unclaimed, using=using, robust=True)
    return None


def claim_and_dispatch(
    events: Sequence[Event[Any]],
    *,
    using: str,
    contexts: Mapping[str, str] | None = None,
) -> tuple[int, DispatchResult]:
    """Claim ``events`` and run the handlers of those claimed now; return (new, result).

    Inside a transaction the handlers are scheduled for its commit (the result is empty);
    otherwise the claim and the first handler calls commit together, and that transaction
    is run again if the database aborts it (deadlock, serialization failure) before any
    handler ran (:func:`~spark_decl.claims.claim_again`). ``contexts``: as
    :func:`~spark_decl.claims.claim_events` takes them.
    """
    connection = transaction.get_connection(using)
    if connection.in_atomic_block:
        claimed = claim_events(events, using=using, contexts=contexts)
        if claimed:
            _dispatch_on_commit(claimed, connection, using=using)
        return len(claimed), DispatchResult()
    runner = CallRunner(using)
    attempt = 1
    while True:
        try:
            with transaction.atomic(using=using):
                claimed = claim_events(events, using=using, run_here=True, contexts=contexts)
                calls, enqueued = _submit_background(_calls(claimed), using=using)
                done = runner.run_segment(calls)
                runner.record_outcomes(_unrecorded(claimed, calls))
        except DatabaseError as exc:
            # Not once a handler ran: running it again would repeat whatever it did
            # outside the database (a mail).
            if runner.called or not claim_again(exc, attempt, (e["key"] for e in events)):
                raise
            attempt += 1
        else:
            return len(claimed), _finish(runner, claimed, calls, done, enqueued)


def claim_after_save(events: Sequence[Event[Any]], *, using: str) -> None:
    """Claim and handle the events of a save: at once in autocommit mode (the row is
    committed already), else when the saving transaction commits.

    Inside a transaction each context is converted for storage now, so an unstorable one
    fails the save, and the events wait in an ``on_commit()`` callback (a rollback of the
    transaction, or of a savepoint around the save, discards them with it). Consecutive
    saves share one callback, so the transaction's events are claimed together after the
    commit, one statement per ``CHUNK_SIZE`` events, and nothing is written per save
    inside it. A crash between the commit and that claim leaves the events to the next
    ``process_spark_sources``, as in autocommit mode.
    """
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:
        claim_and_dispatch(events, using=using)
        return
    contexts = [dump_context_json(event["context"], key=event["key"]) for event in events]
    _SavedEvents.collect(connection, using).add(events, contexts)


class _SavedEvents:
    """An ``on_commit`` callback holding the events of saves made inside a transaction,
    keyed (first occurrence first) by key, with their contexts converted for storage.

    A save adds its events to the newest of these callbacks when that is not run yet and
    waits on no savepoint the save is not also inside (a rollback would discard both
    alike), even if other code registered callbacks after it (those then run after these
    events are handled, as with any claim made inside a transaction); else it registers a
    new one. Savepoints such as ``update_or_create()``'s put each save in a callback of
    its own: once they are released, a callback is merged into the one before it, so a
    loop of them still ends in one or two claims.

    In a ``TestCase``, whose transaction never commits, each save keeps a callback of its
    own: ``captureOnCommitCallbacks()`` runs only the callbacks registered inside its block.
    """

    __slots__ = ("contexts", "done", "events", "using")
    __qualname__ = "spark_decl.dispatch._SavedEvents"

    def __init__(self, using: str) -> None:
        self.events: dict[str, Event[Any]] = {}
        self.contexts: dict[str, str] = {}
        self.using = using
        self.done = False

    @classmethod
    def collect(cls, connection: BaseDatabaseWrapper, using: str) -> _SavedEvents:
        """The callback to add a save's events to, registered if need be."""
        # Django's entries are (savepoint ids, callback, robust); django-stubs knows two.
        hooks = cast("list[tuple[set[str], object, bool]]", connection.run_on_commit)
        if hooks and not _in_test_case(connection):
            open_savepoints = connection.savepoint_ids
            found = cls._newest(connection, hooks, using)
            if found is not None and hooks[found][0].issuperset(open_savepoints):
                return cast("_SavedEvents", hooks[found][1])
            sids, newest = hooks[-1][:2]
            if (
                isinstance(newest, cls)
                and newest.accepts(using)
                and len(hooks) > 1
                and sids.isdisjoint(open_savepoints)
            ):
                # Still registered, so its savepoints were released: it is as sure to run
                # as the transaction. If the one before it is too, merge them.
                earlier_sids, earlier = hooks[-2][:2]
                if (
                    isinstance(earlier, cls)
                    and earlier.accepts(using)
                    and earlier_sids.isdisjoint(open_savepoints)
                ):
                    earlier.merge(newest)
                    hooks.pop()
        callback = cls(using)
        connection.on_commit(callback, robust=True)
        _NEWEST[connection] = (id(connection.run_on_commit), len(connection.run_on_commit) - 1)
        return callback

    @classmethod
    def _newest(
        cls,
        connection: BaseDatabaseWrapper,
        hooks: list[tuple[set[str], object, bool]],
        using: str,
    ) -> int | None:
        """The index in ``hooks`` of the newest of these callbacks, if it can still take
        events: where the last one registered went, as long as the list is the same
        (Django replaces it when a savepoint rolls back), else searched for among the last
        few entries (other code may have registered callbacks of its own since). Whatever
        it finds is checked, and is in ``hooks``, so it will run."""
        last = len(hooks) - 1
        remembered = None if isinstance(hooks[last][1], cls) else _NEWEST.get(connection)
        if remembered is None or remembered[0] != id(hooks) or remembered[1] > last:
            # The last entry first: usually the save before registered it.
            candidates = range(last, max(last - LOOK_BACK, -1), -1)
            index = next((i for i in candidates if isinstance(hooks[i][1], cls)), -1)
        else:
            index = remembered[1]
        if index < 0:
            return None
        callback = hooks[index][1]
        if not isinstance(callback, cls) or not callback.accepts(using):
            return None
        return index

    def accepts(self, using: str) -> bool:
        return not self.done and self.using == using

    def add(self, events: Iterable[Event[Any]], contexts: Iterable[str]) -> None:
        known = self.events
        for event, context in zip(events, contexts, strict=True):
            key = event["key"]
            if key not in known:
                known[key] = event
                self.contexts[key] = context

    def merge(self, later: _SavedEvents) -> None:
        self.add(later.events.values(), later.contexts.values())

    def __call__(self) -> None:
        if self.done:  # captureOnCommitCallbacks(execute=True) ran it before the commit
            return
        self.done = True
        events = list(self.events.values())
        chunk_size = get_settings().CHUNK_SIZE
        for start in range(0, len(events), chunk_size):
            chunk = events[start : start + chunk_size]
            try:
                claim_and_dispatch(chunk, using=self.using, contexts=self.contexts)
            except Exception:
                # Logged here, not by Django's on_commit(), which on Django 5.2 needs the
                # callback's __qualname__; the chunks after this one are still claimed.
                keys = ", ".join(event["key"] for event in chunk[:3])
                logger.exception(
                    "Could not claim the events of a committed transaction's saves (%s%s); "
                    "the next process_spark_sources run produces them again.",
                    keys,
                    ", ..." if len(chunk) > 3 else "",
                )


# How many newer on_commit() callbacks of other code a save looks past for one of ours,
# when it does not know where the newest is.
LOOK_BACK = 8
# Per connection: (id() of its run_on_commit list, the index in it of the newest
# _SavedEvents), a hint for _SavedEvents.collect().
_NEWEST: weakref.WeakKeyDictionary[BaseDatabaseWrapper, tuple[int, int]] = (
    weakref.WeakKeyDictionary()
)


def _in_test_case(connection: BaseDatabaseWrapper) -> bool:
    """Whether the open transaction is a ``django.test.TestCase``'s (it never commits)."""
    blocks = connection.atomic_blocks
    return bool(blocks) and getattr(blocks[0], "_from_testcase", False) is True


def _dispatch_on_commit(
    claimed: list[Event[Any]], connection: BaseDatabaseWrapper, *, using: str
) -> None:
    """Dispatch events claimed in the open transaction once it commits."""
    _enqueue_with_claims(claimed, using=using)
    pending = _Pending(claimed, using)
    _queue(connection).append(pending)
    connection.on_commit(pending, robust=True)


def dispatch(events: Sequence[Event[Any]], *, using: str = DEFAULT_DB_ALIAS) -> DispatchResult:
    """Run the handlers of ``events`` now (enqueue the background ones), then send
    ``event_dispatched`` for each."""
    runner = CallRunner(using)
    calls, enqueued = _submit_background(_calls(events), using=using)
    return _finish(runner, events, calls, 0, enqueued)


def _finish(
    runner: CallRunner,
    events: Sequence[Event[Any]],
    calls: Sequence[Call],
    start: int,
    enqueued: int,
) -> DispatchResult:
    outcome = runner.run(calls, start)
    outcome.report()
    for event in events:
        send_dispatched(event)
    return DispatchResult(
        events=len(events),
        calls=outcome.succeeded + outcome.failed,
        failed=outcome.failed,
        skipped=outcome.skipped,
        enqueued=enqueued,
    )


def _submit_background(calls: list[Call], *, using: str) -> tuple[list[Call], int]:
    """Hand the background calls to the tasks framework; return the others and how many
    were handed over."""
    if not any(call.spec.background for call in calls):
        return calls, 0
    background = [call for call in calls if call.spec.background]
    return [call for call in calls if not call.spec.background], submit(background, using=using)


def _enqueue_with_claims(claimed: list[Event[Any]], *, using: str) -> None:
    """Inside the claiming transaction, enqueue the background calls of ``claimed`` now if
    the task backend writes to this database (an outbox: they commit with the claims).
    Their claims are marked, so the dispatch after commit does not enqueue them again."""
    if handlers_suppressed:  # capture_events(run_handlers=False): nothing is enqueued
        return
    owing = [
        event
        for event in claimed
        if any(spec.background for spec in cast("Claim", _claim_of(event)).handlers)
    ]
    if not owing or not enqueues_with_claims(using):
        return
    submit([call for call in _calls(owing) if call.spec.background], using=using)
    for event in owing:
        claimed_event = cast("ClaimedEvent", event)
        claimed_event.spark_claim = replace(claimed_event.spark_claim, enqueued=True)


def _calls(events: Iterable[Event[Any]]) -> list[Call]:
    if handlers_suppressed:
        return []
    calls: list[Call] = []
    append = calls.append  # this runs for every event of a batch
    for event in events:
        claim = _claim_of(event)
        if claim is None:
            calls.extend(Call(spec, event) for spec in registry.handlers_for(event["group"]))
            continue
        record_id = claim.record_id
        for spec, outcome_id in zip(claim.handlers, claim.outcome_ids, strict=True):
            if not (claim.enqueued and spec.background):
                append(Call(spec, event, outcome_id, record_id=record_id))
    return calls


def _unrecorded(claimed: Sequence[Event[Any]], calls: Sequence[Call]) -> list[Call]:
    """The calls owed by ``claimed`` whose outcome rows are not written yet: those among
    ``calls`` or, if no call was built (handlers suppressed), one per owed handler, to
    stay pending."""
    if calls:
        return [call for call in calls if call.outcome_id is None]
    unrecorded: list[Call] = []
    for event in claimed:
        claim = cast("Claim", _claim_of(event))
        unrecorded.extend(
            Call(spec, event, record_id=claim.record_id)
            for spec, outcome_id in zip(claim.handlers, claim.outcome_ids, strict=True)
            if outcome_id is None
        )
    return unrecorded


def _claim_of(event: Event[Any]) -> Claim | None:
    claim: Claim | None = getattr(event, "spark_claim", None)
    return claim


def send_dispatched(event: Event[Any]) -> None:
    if not event_dispatched.receivers:
        return
    claim = _claim_of(event)
    handlers = claim.handlers if claim is not None else registry.handlers_for(event["group"])
    responses = event_dispatched.send_robust(
        sender=None, event=event, handlers=[spec.name for spec in handlers]
    )
    for receiver, response in responses:
        if isinstance(response, Exception):
            logger.error(
                "Receiver %r of event_dispatched raised for event %r",
                receiver,
                event["key"],
                exc_info=response,
            )


# -- events claimed inside a caller's transaction ---------------------------------------------


class _Pending:
    """An ``on_commit`` callback holding the events one claim made inside a transaction.

    Each claim registers its own callback, so Django drops it if the claim's savepoint
    rolls back. The first callback to run after a commit also takes the events of every
    callback registered after it (they belong to the same transaction) and dispatches them
    all at once: one dispatch per transaction instead of one per save. Those later events
    are checked against the database first, since their savepoint may have rolled back.
    """

    __slots__ = ("done", "events", "using")
    __qualname__ = "spark_decl.dispatch._Pending"

    def __init__(self, events: list[Event[Any]], using: str) -> None:
        self.events = events
        self.using = using
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        queue = _queue(connections[self.using])
        try:
            index = next(i for i, entry in enumerate(queue) if entry is self)
        except StopIteration:
            batch = [self]
        else:
            # Entries before this one never ran (rolled back, or a test captured them
            # without running them): drop them.
            batch = queue[index:]
            del queue[:]
        for entry in batch:
            entry.done = True
        events = self.events
        try:
            if len(batch) > 1:
                events = events + _committed(
                    [event for entry in batch[1:] for event in entry.events], using=self.using
                )
            dispatch(events, using=self.using)
        except Exception:
            # Not left to Django's on_commit() logging, which on Django 5.2 needs the
            # callback's __qualname__.
            logger.exception(
                "Could not dispatch the events claimed in a committed transaction; their "
                "calls stay pending and retry_spark_events --stale-after runs them."
            )


# Per connection (connections are per thread): the callbacks not yet run, in order.
_QUEUES: weakref.WeakKeyDictionary[BaseDatabaseWrapper, list[_Pending]] = (
    weakref.WeakKeyDictionary()
)


def _queue(connection: BaseDatabaseWrapper) -> list[_Pending]:
    try:
        return _QUEUES[connection]
    except KeyError:
        return _QUEUES.setdefault(connection, [])


def _committed(events: list[Event[Any]], *, using: str) -> list[Event[Any]]:
    """The events whose claims exist: a rolled-back claim is absent, or (SQLite reuses
    row ids) its id now belongs to another key. The last event per claim wins."""
    from .models import EventRecord

    by_record: dict[int, Event[Any]] = {}
    for event in events:
        claim = _claim_of(event)
        assert claim is not None
        by_record[claim.record_id] = event
    ids = list(by_record)
    keys: dict[int, str] = {}
    for start in range(0, len(ids), MAX_PARAMETERS):
        keys.update(
            EventRecord.objects.using(using)
            .filter(pk__in=ids[start : start + MAX_PARAMETERS])
            .values_list("pk", "key")
        )
    return [event for pk, event in by_record.items() if keys.get(pk) == event["key"]]
