"""Retention: shrinking, or forgetting, old events whose handler calls are all done.

By default an old event keeps its row, so its key stays claimed and the event never fires
again; only what was kept for retries and for reading is dropped: the stored context (set
to ``{}``) and each outcome's ``last_error`` and ``traceback``. The outcome rows themselves
stay, small as they are, because they record which handlers received the event:
``retry_spark_events --replay-to`` relies on them to never send an event to a handler
twice.

``delete_keys=True`` deletes the events and their outcomes instead. Their keys are then
unknown, and a source that still yields one of those events makes it fire again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from .conf import get_settings
from .outcomes import unfinished

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from .models import EventRecord


@dataclass
class PruneResult:
    """What :func:`prune_events` did (or, with ``dry_run``, would do).

    ``events`` counts the events cleared (or deleted), ``outcomes`` their outcome rows
    cleared, or deleted with them.
    """

    cutoff: datetime
    events: int = 0
    outcomes: int = 0
    deleted: bool = False
    dry_run: bool = False


def prunable_events(
    cutoff: datetime, *, delete_keys: bool = False, using: str = DEFAULT_DB_ALIAS
) -> QuerySet[EventRecord]:
    """Events created before ``cutoff`` whose outcomes are all ``done`` (or that have none).

    ``created_at`` has no index: this reads the events in id order (oldest first) and
    filters them.

    Without ``delete_keys``, events with nothing left to clear are left out, so that a
    second run reports (and writes) nothing.
    """
    from .models import EventRecord, HandlerOutcome

    queryset = EventRecord.objects.using(using).filter(~unfinished(), created_at__lt=cutoff)
    if not delete_keys:
        details = HandlerOutcome.objects.filter(record=OuterRef("pk")).exclude(
            last_error="", traceback=""
        )
        queryset = queryset.filter(~Q(context={}) | Exists(details))
    return queryset


def prune_events(
    older_than: timedelta,
    *,
    delete_keys: bool = False,
    dry_run: bool = False,
    chunk_size: int | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> PruneResult:
    """Clear (or with ``delete_keys``, delete) completed events older than ``older_than``.

    Works ``chunk_size`` events at a time (``CHUNK_SIZE`` by default), one transaction per
    chunk, so memory stays bounded and a large table is never locked for long. An event
    with a pending, failed or given-up call is never touched. ::

        prune_events(timedelta(days=90))  # what manage.py prune_spark_events --older-than 90 does
    """
    from .models import EventRecord, HandlerOutcome

    result = PruneResult(cutoff=timezone.now() - older_than, deleted=delete_keys, dry_run=dry_run)
    candidates = prunable_events(result.cutoff, delete_keys=delete_keys, using=using)
    if dry_run:
        result.events = candidates.count()
        result.outcomes = (
            HandlerOutcome.objects.using(using)
            .filter(record__in=candidates.order_by().values("pk"))
            .count()
        )
        return result

    size = chunk_size or get_settings().CHUNK_SIZE
    ids = candidates.order_by("pk").values_list("pk", flat=True)
    last = 0
    while chunk := list(ids.filter(pk__gt=last)[:size]):
        last = chunk[-1]
        # The "all done" condition is checked again in the writing statements: a replay
        # may have given one of these events a pending call since the chunk was read.
        records = EventRecord.objects.using(using).filter(~unfinished(), pk__in=chunk)
        outcomes = HandlerOutcome.objects.using(using).filter(
            record__in=records.order_by().values("pk")
        )
        with transaction.atomic(using=using):
            if delete_keys:
                result.outcomes += outcomes.delete()[0]
                # only("pk"): the contexts about to be deleted need not be read first.
                deleted = records.only("pk").delete()[1]
                result.events += deleted.get(EventRecord._meta.label, 0)
            else:
                result.outcomes += outcomes.update(last_error="", traceback="")
                result.events += records.update(context={})
    return result
