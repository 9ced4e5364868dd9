"""Running event sources: on save, and in batches over a queryset."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS

from .claims import claim_events
from .conf import get_settings
from .dispatch import DispatchResult, dispatch_after_commit
from .registry import registry
from .validation import validate_event

if TYPE_CHECKING:
    from django.db.models import Model, QuerySet

    from .registry import SourceSpec
    from .types import Event


def events_from(instance: Model, sources: Iterable[SourceSpec]) -> list[Event[Any]]:
    """Run ``instance`` through ``sources`` and return the validated events."""
    events: list[Event[Any]] = []
    for spec in sources:
        produced = spec.function(instance)
        if produced is None:
            continue
        events.extend(validate_event(candidate, source=spec.name) for candidate in produced)
    return events


def on_post_save(
    sender: type[Model],
    instance: Model,
    raw: bool = False,
    using: str = DEFAULT_DB_ALIAS,
    **kwargs: object,
) -> None:
    """``post_save`` receiver: claim the instance's new events inside the saving transaction.

    The handlers run once that transaction commits; a rollback takes the claims with it.
    Fixture loading (``raw=True``) is skipped: run :func:`process_queryset` afterwards.
    """
    if raw:
        return
    sources = registry.save_sources(sender)
    if not sources:
        return
    claimed = claim_events(events_from(instance, sources), using=using)
    if claimed:
        dispatch_after_commit(claimed, using=using)


@dataclass
class BatchResult:
    """What a batch run over one or more querysets did."""

    rows: int = 0
    events: int = 0
    new: int = 0
    dispatch: DispatchResult = field(default_factory=DispatchResult)

    def __iadd__(self, other: BatchResult) -> BatchResult:
        self.rows += other.rows
        self.events += other.events
        self.new += other.new
        self.dispatch += other.dispatch
        return self


def iterate_chunks(queryset: QuerySet[Any], chunk_size: int) -> Iterator[list[Any]]:
    """Yield the rows of ``queryset`` in primary-key order, ``chunk_size`` at a time.

    Keyset pagination (``pk > last``) keeps memory bounded by the chunk and holds no cursor
    open while events are claimed and handled.
    """
    queryset = queryset.order_by("pk")
    last: Any = None
    while True:
        page = queryset if last is None else queryset.filter(pk__gt=last)
        rows = list(page[:chunk_size])
        if not rows:
            return
        yield rows
        if len(rows) < chunk_size:
            return
        last = rows[-1].pk


def process_queryset(
    queryset: QuerySet[Any],
    *,
    sources: Sequence[SourceSpec] | None = None,
    chunk_size: int | None = None,
) -> BatchResult:
    """Run every instance of ``queryset`` through its model's sources, claim, handle.

    For code paths that bypass ``post_save`` (``bulk_create``, ``QuerySet.update``,
    ``loaddata``)::

        Challenge.objects.filter(pk__in=pks).update(end_date=today)
        process_queryset(Challenge.objects.filter(pk__in=pks))

    Every source of the model runs, including ``on_save=False`` ones. Inside a transaction
    the handlers run after it commits.
    """
    if sources is None:
        sources = registry.sources(queryset.model)
    size = chunk_size or get_settings().CHUNK_SIZE
    using = queryset.db
    result = BatchResult()
    if not sources:
        return result
    for rows in iterate_chunks(queryset, size):
        events = [event for row in rows for event in events_from(row, sources)]
        result.rows += len(rows)
        result.events += len(events)
        claimed = claim_events(events, using=using)
        result.new += len(claimed)
        if claimed:
            dispatched = dispatch_after_commit(claimed, using=using)
            if dispatched is not None:
                result.dispatch += dispatched
    return result


def process_model(model: type[Model], *, chunk_size: int | None = None) -> BatchResult:
    """Run the batch for one registered model, source by source with its own queryset."""
    result = BatchResult()
    by_queryset: dict[Any, list[SourceSpec]] = {}
    for spec in registry.sources(model):
        by_queryset.setdefault(spec.queryset, []).append(spec)
    for factory, specs in by_queryset.items():
        queryset = factory() if factory is not None else model._default_manager.all()
        result += process_queryset(queryset, sources=specs, chunk_size=chunk_size)
    return result
