"""Re-running handler calls that failed, or that a dead process left pending."""

from __future__ import annotations

import logging
import re
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from django.db.models import Q
from django.utils import timezone

from .context import ContextUnavailable, load_context
from .dispatch import run_recorded
from .registry import registry

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


def retry_outcomes(outcomes: Any, *, using: str = "default") -> RetryResult:
    """Re-run each outcome's handler with the stored (rebuilt) context."""
    result = RetryResult()
    for outcome in cast("list[HandlerOutcome]", list(outcomes)):
        result.due += 1
        spec = registry.get_handler(outcome.handler)
        if spec is None:
            result.unknown_handler += 1
            logger.warning(
                "Cannot retry %s for event %r: no handler of that name is registered.",
                outcome.handler,
                outcome.record.key,
            )
            continue
        try:
            context = load_context(outcome.record.context)
        except ContextUnavailable as exc:
            _record_unavailable(outcome, exc, using=using)
            result.failed += 1
            continue
        event: Event[Any] = {
            "group": outcome.record.group,
            "key": outcome.record.key,
            "context": context,
        }
        ran = run_recorded(
            spec,
            event,
            record_id=outcome.record_id,
            using=using,
            expected_attempts=outcome.attempts,
        )
        if ran is None:
            result.skipped += 1
        elif ran:
            result.succeeded += 1
        else:
            result.failed += 1
    return result


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
    return retry_outcomes(outcomes, using=using)


def _record_unavailable(outcome: HandlerOutcome, exc: Exception, *, using: str) -> None:
    """A call whose context cannot be rebuilt counts as a failed attempt."""
    from .dispatch import schedule_after_failure
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
