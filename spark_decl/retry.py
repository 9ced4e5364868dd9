"""Re-running handler calls that failed, or that a dead process left pending."""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

from django.db.models import Q
from django.utils import timezone

from .calls import PENDING, Call, CallRunner, schedule_after_failure
from .conf import get_settings
from .context import ContextUnavailable, load_context
from .registry import registry
from .sources import iterate_chunks

if TYPE_CHECKING:
    from .models import HandlerOutcome
    from .types import Event

logger = logging.getLogger("spark_decl")

DEFAULT_STALE_AFTER = 300


@dataclass
class RetryResult:
    """Counts of what a retry run did."""

    due: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    unknown_handler: int = 0


def due_outcomes(
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
    ignore_schedule: bool = False,
    group: str | None = None,
    handler: str | None = None,
    using: str = "default",
) -> Any:
    """The outcome rows a retry run should re-run now, oldest first."""
    from .models import HandlerOutcome

    now = timezone.now()
    failed = Q(status=HandlerOutcome.Status.FAILED)
    if not ignore_schedule:
        failed &= Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    stale = Q(
        status=HandlerOutcome.Status.PENDING, created_at__lte=now - timedelta(seconds=stale_after)
    )
    queryset = HandlerOutcome.objects.using(using).filter(failed | stale)
    if handler is not None:
        queryset = queryset.filter(handler=handler)
    if group is not None:
        queryset = queryset.filter(record__group__regex=group)
    return queryset.select_related("record").order_by("pk")


def retry_outcomes(outcomes: Iterable[HandlerOutcome], *, using: str = "default") -> RetryResult:
    """Re-run each outcome's handler with its stored context, rebuilt (model instances
    fetched again), a chunk at a time."""
    result = RetryResult()
    iterator = iter(outcomes)
    while chunk := list(islice(iterator, get_settings().CHUNK_SIZE)):
        calls: list[Call] = []
        for outcome in chunk:
            result.due += 1
            call = _call_for(outcome, result, using=using)
            if call is not None:
                calls.append(call)
        run = CallRunner(using).run(calls)
        run.report()
        result.succeeded += run.succeeded
        result.failed += run.failed
        result.skipped += run.skipped
    return result


def _call_for(outcome: HandlerOutcome, result: RetryResult, *, using: str) -> Call | None:
    spec = registry.get_handler(outcome.handler)
    if spec is None:
        result.unknown_handler += 1
        logger.warning(
            "Cannot retry %s for event %r: no handler of that name is registered.",
            outcome.handler,
            outcome.record.key,
        )
        return None
    try:
        context = load_context(outcome.record.context)
    except ContextUnavailable as exc:
        _record_unavailable(outcome, exc, using=using)
        result.failed += 1
        return None
    event: Event[Any] = {
        "group": outcome.record.group,
        "key": outcome.record.key,
        "context": context,
    }
    if outcome.status == PENDING:
        return Call(spec, event, outcome.pk)
    return Call(spec, event, outcome.pk, status=outcome.status, attempts=outcome.attempts)


def retry_events(
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
    ignore_schedule: bool = False,
    group: str | None = None,
    handler: str | None = None,
    using: str = "default",
) -> RetryResult:
    """Re-run every due failed call and every call left pending for ``stale_after`` seconds."""
    if group is not None:
        re.compile(group)
    outcomes = due_outcomes(
        stale_after=stale_after,
        ignore_schedule=ignore_schedule,
        group=group,
        handler=handler,
        using=using,
    )
    pages = iterate_chunks(outcomes, get_settings().CHUNK_SIZE)
    return retry_outcomes(chain.from_iterable(pages), using=using)


def _record_unavailable(outcome: HandlerOutcome, exc: Exception, *, using: str) -> None:
    """A call whose context cannot be rebuilt counts as a failed attempt."""
    from .models import HandlerOutcome

    now = timezone.now()
    attempts = outcome.attempts + 1
    status, next_attempt_at = schedule_after_failure(attempts, now)
    HandlerOutcome.objects.using(using).filter(pk=outcome.pk, attempts=outcome.attempts).update(
        status=status,
        attempts=attempts,
        next_attempt_at=next_attempt_at,
        last_error=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_exception(exc)),
    )
    logger.error("Cannot retry %s for event %r: %s", outcome.handler, outcome.record.key, exc)
