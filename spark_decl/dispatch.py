"""Dispatch: claiming events and running their handlers, and the ``event_dispatched`` signal.

Two ways in:

* :func:`claim_and_run`, for the events of a save and of a batch chunk. Inside a
  transaction the claims are written in it, with a ``pending`` row for every call they
  owe (an outbox): they commit or roll back with it, and the handlers run once it commits,
  for all its claims together (:func:`~spark_decl.transactions.after_commit`). Outside one,
  the claim and the first handler calls share a transaction of their own, and each call's
  row is written once, with its result.
* :func:`process_events`, for events the caller made: a claimed one (from
  :func:`~spark_decl.only_new_events`) has its pending calls run, any other just its
  handlers; inside a transaction, once it commits.

Both end in :func:`run_events`, which takes each call's pending row, runs the handler
(:mod:`spark_decl.calls`) and sends ``event_dispatched``. Background handlers are enqueued
instead (:mod:`spark_decl.enqueue`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, transaction

from . import outbox, outcomes
from .calls import Call, CallRunner, RunResult
from .claims import claim_events, record_id_of, retrying
from .conf import get_settings
from .context import dump_context_json
from .enqueue import check_enqueueable, submit
from .registry import registry
from .signals import event_dispatched
from .transactions import after_commit
from .types import DispatchResult
from .validation import validate_event

if TYPE_CHECKING:
    from .types import Event

logger = logging.getLogger("spark_decl")


def process_events(
    events: Iterable[Event[Any]] | Iterable[Mapping[str, Any]],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """Send each event to every handler whose pattern matches its group.

    Does *not* dedupe: wrap the events in :func:`only_new_events` for that (its events then
    have their claimed calls run). Inside a transaction the handlers run after it commits
    (and never, if it rolls back); otherwise at once. Each handler call is isolated and
    atomic; ``event_dispatched`` is sent once per event after its handlers ran.
    """
    chunk_size = get_settings().CHUNK_SIZE
    iterator = iter(events)
    while chunk := list(islice(iterator, chunk_size)):
        valid = [validate_event(candidate) for candidate in chunk]
        claimed = [event for event in valid if record_id_of(event) is not None]
        unclaimed = [event for event in valid if record_id_of(event) is None]
        for event in unclaimed:
            # Its background handlers get the event in their task: refuse an unstorable
            # context now, not in the worker. (A claim checked it already.)
            if any(spec.background for spec in registry.handlers_for(event["group"])):
                check_enqueueable(event)
        if not transaction.get_connection(using).in_atomic_block:
            run_events(valid, using=using)
            continue
        if claimed:
            after_commit(claimed, RunAfterCommit(using), using=using)
        if unclaimed:
            # Not merged with other work after the commit: nothing in the database says
            # whether its savepoint rolled back, so it keeps a callback of its own.
            callback = partial(RunAfterCommit(using), unclaimed)
            transaction.on_commit(callback, using=using, robust=True)


def claim_and_run(
    events: Sequence[Event[Any]],
    *,
    using: str,
    contexts: Mapping[str, str] | None = None,
    outbox_rows: Sequence[int] | None = None,
) -> tuple[int, DispatchResult]:
    """Claim ``events`` and run the handlers of those claimed now; return (new, result).

    Inside a transaction the events go to the outbox, to be claimed and handled once it
    commits (the count is of the events written there; the result counts nothing yet).
    Otherwise the claim and the first handler calls commit together, in a transaction run
    again if the database aborts it before a handler ran. ``contexts``: the contexts
    converted for storage, by key (else converted here); ``outbox_rows``: each event's
    outbox row, taken in the claiming transaction (only events whose row is still there
    are claimed).
    """
    if contexts is None:
        contexts = {
            event["key"]: dump_context_json(event["context"], key=event["key"]) for event in events
        }
    # The outbox's own rows, their transaction committed, are claimed at once, even where
    # on_commit() callbacks run inside a transaction (captureOnCommitCallbacks() in a test).
    if transaction.get_connection(using).in_atomic_block and outbox_rows is None:
        unique: dict[str, Event[Any]] = {}
        for event in events:
            unique.setdefault(event["key"], event)
        first = list(unique.values())
        written = outbox.write(first, contexts, using=using)
        entries = [(written[event["key"]], event, contexts[event["key"]]) for event in first]
        after_commit(entries, ClaimAfterCommit(using), using=using)
        return len(first), DispatchResult()

    run = get_settings().RUN_HANDLERS
    runner = CallRunner(using)

    def claim_and_start() -> tuple[list[Event[Any]], list[Call], int, int]:
        to_claim = events
        if outbox_rows is not None:
            rows = dict(zip(outbox_rows, events, strict=True))
            connection = transaction.get_connection(using)
            taken = outbox.take(connection, {pk: event["key"] for pk, event in rows.items()})
            to_claim = [event for pk, event in rows.items() if pk in taken]
        claimed = claim_events(to_claim, using=using, contexts=contexts, run_here=run)
        if not run:  # every call stays pending
            return claimed, [], 0, 0
        calls, background = _calls(claimed)
        # Enqueued in this transaction if the task backend writes to this database, else
        # once it commits.
        enqueued = submit(background, using=using)
        return claimed, calls, runner.run_claimed(calls), enqueued

    # Made again if the database aborts it (a deadlock), as long as no handler ran: one
    # run again would repeat what it did outside the database.
    claimed, calls, reached, enqueued = retrying(
        claim_and_start,
        using=using,
        keys=[event["key"] for event in events],
        may_retry=lambda: not runner.called,
    )
    result = runner.run(calls[reached:])
    return len(claimed), _finish(result, claimed, enqueued)


@dataclass(frozen=True)
class ClaimAfterCommit:
    """Claims and handles, once a transaction commits, the events its saves wrote to the
    outbox, a chunk at a time (equal instances share a callback: see
    :func:`~spark_decl.transactions.after_commit`)."""

    using: str

    def __call__(self, entries: list[tuple[int, Event[Any], str]]) -> None:
        # The last entry of an outbox id stands for it: an earlier one rolled back with
        # its savepoint (SQLite hands its id out again).
        by_id = {pk: (event, context) for pk, event, context in entries}
        ordered = sorted(by_id.items())
        chunk_size = get_settings().CHUNK_SIZE
        for start in range(0, len(ordered), chunk_size):
            chunk = ordered[start : start + chunk_size]
            events = [event for _, (event, _) in chunk]
            contexts: dict[str, str] = {}
            for _, (event, context) in chunk:
                contexts.setdefault(event["key"], context)
            try:
                claim_and_run(
                    events,
                    using=self.using,
                    contexts=contexts,
                    outbox_rows=[pk for pk, _ in chunk],
                )
            except Exception:
                logger.exception(
                    "Could not claim the events of a committed transaction (%s); they stay "
                    "in the outbox, and retry_spark_events --stale-after claims them.",
                    ", ".join(event["key"] for event in events[:3])
                    + (", ..." if len(events) > 3 else ""),
                )


def _calls(claimed: Iterable[Event[Any]]) -> tuple[list[Call], list[Call]]:
    """The calls ``claimed`` owe, which have no row yet (the caller runs them) and, apart,
    those of background handlers, whose pending rows the claim wrote."""
    here: list[Call] = []
    background: list[Call] = []
    for event in claimed:
        record_id = record_id_of(event)
        for spec in registry.handlers_for(event["group"]):
            (background if spec.background else here).append(Call(spec, event, record_id))
    return here, background


def run_events(events: Sequence[Event[Any]], *, using: str) -> DispatchResult:
    """Run the handlers of ``events`` now, in transactions of their own (background ones
    enqueued), and send ``event_dispatched`` for each. A claimed event's calls are its
    ``pending`` rows (a claim that rolled back with its savepoint has none, and is not
    dispatched); any other event's are its handlers now."""
    # The last claim of an (id, key) stands for it: an earlier one with the same id and key
    # rolled back with its savepoint (SQLite reuses the ids of both rows), since a key
    # claimed and kept cannot be claimed again.
    last = {
        (record_id, event["key"]): index
        for index, event in enumerate(events)
        if (record_id := record_id_of(event)) is not None
    }
    owed = outcomes.owed_by(transaction.get_connection(using), last) if last else {}
    run = get_settings().RUN_HANDLERS
    dispatched: list[Event[Any]] = []
    calls: list[Call] = []
    for index, event in enumerate(events):
        pending: dict[str, int] | None = None
        record_id = record_id_of(event)
        if record_id is not None:
            claim = (record_id, event["key"])
            pending = owed.get(claim)
            if pending is None or last[claim] != index:
                continue
        dispatched.append(event)
        if not run:
            continue
        for spec in registry.handlers_for(event["group"]):
            if pending is None:
                calls.append(Call(spec, event))
            elif spec.name in pending:  # else done already, or routed there since the claim
                calls.append(Call(spec, event, record_id, outcome_id=pending[spec.name]))
    enqueued = submit([call for call in calls if call.spec.background], using=using)
    result = CallRunner(using).run([call for call in calls if not call.spec.background])
    return _finish(result, dispatched, enqueued)


def _finish(result: RunResult, events: Sequence[Event[Any]], enqueued: int) -> DispatchResult:
    """Report the failures of a dispatch that is over, then send ``event_dispatched``."""
    result.report()
    for event in events:
        send_dispatched(event)
    return DispatchResult(
        events=len(events),
        calls=result.succeeded + result.failed,
        failed=result.failed,
        skipped=result.skipped,
        enqueued=enqueued,
    )


@dataclass(frozen=True)
class RunAfterCommit:
    """:func:`run_events` once a transaction commits (equal instances share a callback:
    see :func:`~spark_decl.transactions.after_commit`)."""

    using: str

    def __call__(self, events: list[Event[Any]]) -> None:
        try:
            run_events(events, using=self.using)
        except Exception:
            logger.exception(
                "Could not run the handlers of the events of a committed transaction; "
                "their calls stay pending and retry_spark_events --stale-after runs them."
            )


def send_dispatched(event: Event[Any]) -> None:
    """Send ``event_dispatched`` for ``event`` (Django's ``send_robust()`` logs a receiver
    that raises)."""
    if not event_dispatched.receivers:
        return
    handlers = [spec.name for spec in registry.handlers_for(event["group"])]
    event_dispatched.send_robust(sender=None, event=event, handlers=handlers)
