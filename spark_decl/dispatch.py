"""Routing events to handlers, running each call in isolation, and the signals.

Every handler call runs in its own ``transaction.atomic()``: a handler that raises leaves
none of its database writes behind, is logged on the ``spark_decl`` logger, and does not
stop the other handlers or events. For claimed events the call and the update of its
:class:`~spark_decl.models.HandlerOutcome` commit together, which is what makes a handler
whose effects are database writes take effect exactly once.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from inspect import iscoroutinefunction
from itertools import islice
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import F
from django.utils import timezone

from .conf import get_settings
from .registry import registry
from .signals import event_dispatched, handler_failed
from .validation import validate_event

if TYPE_CHECKING:
    from .claims import Claim
    from .registry import HandlerSpec
    from .types import Event

logger = logging.getLogger("spark_decl")


@dataclass
class DispatchResult:
    """Counts of what a dispatch did."""

    events: int = 0
    calls: int = 0
    failed: int = 0
    skipped: int = 0

    def __iadd__(self, other: DispatchResult) -> DispatchResult:
        self.events += other.events
        self.calls += other.calls
        self.failed += other.failed
        self.skipped += other.skipped
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
        dispatch_after_commit(valid, using=using)


def dispatch_after_commit(events: list[Event[Any]], *, using: str) -> DispatchResult | None:
    """Dispatch now when not in a transaction, else once it commits (returns ``None``)."""
    if not events:
        return DispatchResult()
    if transaction.get_connection(using).in_atomic_block:
        transaction.on_commit(partial(dispatch, events), using=using, robust=True)
        return None
    return dispatch(events)


def dispatch(events: Iterable[Event[Any]]) -> DispatchResult:
    """Run the handlers of ``events`` now, then send ``event_dispatched`` for each."""
    result = DispatchResult()
    for event in events:
        result.events += 1
        claim: Claim | None = getattr(event, "spark_claim", None)
        if claim is not None:
            handlers = claim.handlers
            for spec in handlers:
                outcome = run_recorded(spec, event, record_id=claim.record_id, using=claim.using)
                _count(result, outcome)
        else:
            handlers = registry.handlers_for(event["group"])
            for spec in handlers:
                _count(result, run_unrecorded(spec, event))
        send_dispatched(event, handlers)
    return result


def _count(result: DispatchResult, outcome: bool | None) -> None:
    if outcome is None:
        result.skipped += 1
    else:
        result.calls += 1
        result.failed += not outcome


def send_dispatched(event: Event[Any], handlers: Iterable[HandlerSpec]) -> None:
    names = [spec.name for spec in handlers]
    responses = event_dispatched.send_robust(sender=None, event=event, handlers=names)
    for receiver, response in responses:
        if isinstance(response, Exception):
            logger.error(
                "Receiver %r of event_dispatched raised for event %r",
                receiver,
                event["key"],
                exc_info=response,
            )


def call_handler(spec: HandlerSpec, event: Event[Any]) -> None:
    if iscoroutinefunction(spec.function):
        async_to_sync(spec.function)(event)
    else:
        spec.function(event)


def run_unrecorded(spec: HandlerSpec, event: Event[Any]) -> bool:
    """Run one handler call atomically; log failures. Returns whether it succeeded."""
    try:
        with transaction.atomic():
            call_handler(spec, event)
    except Exception as exc:
        _report_failure(spec, event, exc)
        return False
    return True


def run_recorded(
    spec: HandlerSpec,
    event: Event[Any],
    *,
    record_id: int,
    using: str,
    expected_attempts: int | None = None,
) -> bool | None:
    """Run a claimed handler call together with its outcome row.

    The outcome row is switched to ``done`` first, in the same transaction as the handler:
    the conditional UPDATE is the lock that keeps two processes from running the same
    call, and a crash rolls both back, leaving the call pending. Returns ``None`` when the
    call was not runnable (already done, or taken by another process), else success.
    """
    from .models import HandlerOutcome

    runnable = HandlerOutcome.objects.using(using).filter(
        record_id=record_id,
        handler=spec.name,
        status__in=[HandlerOutcome.Status.PENDING, HandlerOutcome.Status.FAILED],
    )
    if expected_attempts is not None:
        runnable = runnable.filter(attempts=expected_attempts)
    failure: Exception | None = None
    with transaction.atomic(using=using):
        now = timezone.now()
        taken = runnable.update(
            status=HandlerOutcome.Status.DONE,
            attempts=F("attempts") + 1,
            finished_at=now,
            next_attempt_at=None,
        )
        if not taken:
            return None
        try:
            with transaction.atomic(using=using):
                call_handler(spec, event)
        except Exception as exc:
            failure = exc
            outcome = HandlerOutcome.objects.using(using).get(
                record_id=record_id, handler=spec.name
            )
            status, next_attempt_at = schedule_after_failure(outcome.attempts, now)
            outcome.status = status
            outcome.next_attempt_at = next_attempt_at
            outcome.finished_at = None
            outcome.last_error = f"{type(exc).__name__}: {exc}"[:10_000]
            outcome.traceback = traceback.format_exc()
            outcome.save(
                update_fields=[
                    "status",
                    "next_attempt_at",
                    "finished_at",
                    "last_error",
                    "traceback",
                ]
            )
    if failure is not None:
        _report_failure(spec, event, failure)
        return False
    return True


def schedule_after_failure(attempts: int, now: datetime) -> tuple[str, datetime | None]:
    """The status and next due time of a call that has now failed ``attempts`` times."""
    from .models import HandlerOutcome

    config = get_settings()
    if attempts >= config.MAX_ATTEMPTS:
        return HandlerOutcome.Status.GIVEN_UP, None
    if attempts <= 1:
        # Someone who fixed the bug and runs retry_spark_events expects it to run now.
        return HandlerOutcome.Status.FAILED, now
    delay = min(config.BACKOFF_SECONDS * 2 ** (attempts - 2), config.BACKOFF_MAX_SECONDS)
    return HandlerOutcome.Status.FAILED, now + timedelta(seconds=delay)


def _report_failure(spec: HandlerSpec, event: Event[Any], exc: Exception) -> None:
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
