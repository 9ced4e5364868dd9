"""Running event sources: on save, and in batches over a queryset."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, transaction

from .claims import claim_events, seen_keys
from .conf import get_settings
from .context import dump_context_json
from .dispatch import claim_and_run
from .enqueue import enqueue_within_bound, enqueues_with_claims, get_task
from .exceptions import InvalidContext, RegistrationError
from .outcomes import exception_text
from .registry import registry
from .types import BatchResult, Mode
from .validation import validate_event

if TYPE_CHECKING:
    from django.db.models import Model, QuerySet

    from .registry import SourceSpec
    from .types import Event


logger = logging.getLogger("spark_decl")


def events_by_source(
    instance: Model, sources: Iterable[SourceSpec]
) -> list[tuple[SourceSpec, list[Event[Any]]]]:
    """Run ``instance`` through ``sources``; return each source that produced events, with
    its validated events.

    An exception from a source carries the source as ``exc.spark_source``.
    """
    produced: list[tuple[SourceSpec, list[Event[Any]]]] = []
    for spec in sources:
        try:
            candidates = spec.function(instance)
            if candidates is None:
                continue
            events = [validate_event(candidate, source=spec.name) for candidate in candidates]
        except Exception as exc:
            exc.spark_source = spec  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]
            raise
        if events:
            produced.append((spec, events))
    return produced


def events_from(instance: Model, sources: Iterable[SourceSpec]) -> list[Event[Any]]:
    """Run ``instance`` through ``sources`` and return the validated events."""
    return [event for _, events in events_by_source(instance, sources) for event in events]


def on_post_save(
    sender: type[Model],
    instance: Model,
    raw: bool = False,
    using: str = DEFAULT_DB_ALIAS,
    **kwargs: object,
) -> None:
    """``post_save`` receiver: run the instance's sources and claim their new events, in
    the saving transaction (in autocommit mode the row is committed already: in one of
    their own); their handlers run once it commits, and never if it rolls back.
    Fixture loading (``raw=True``) is skipped: run :func:`process_queryset` afterwards.
    """
    if raw:
        return
    sources = registry.save_sources(sender)
    if not sources:
        return
    events = events_from(instance, sources)
    if events:
        claim_and_run(events, using=using)


SourceErrorHandler = Callable[["Model", "SourceSpec", Exception], None]


class SkippedInstances:
    """An ``on_source_error`` for batches that go on past a failing source: logs each
    failure on ``spark_decl`` (with its traceback) and keeps a line per skipped instance,
    for the error the batch reports at the end."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, instance: Model, source: SourceSpec, exc: Exception) -> None:
        try:
            reason = str(exc)
        except Exception:  # an exception whose str() raises must not end the batch
            reason = exception_text(exc)
        message = f"{source.name} failed for {instance._meta.label} pk={instance.pk}: {reason}"
        self.messages.append(message)
        logger.error("Source %s", message, exc_info=exc)

    def summary(self) -> str:
        """What to report once the batch is over (only when something was skipped)."""
        return (
            f"{len(self.messages)} instance(s) skipped because a source raised; the first: "
            f"{self.messages[0]}"
        )


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
    chunk_size: int | None = None,
    mode: Mode = Mode.HANDLE,
    sources: Sequence[SourceSpec] | None = None,
    on_source_error: SourceErrorHandler | None = None,
    on_chunk: Callable[[BatchResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchResult:
    """Run every instance of ``queryset`` through its model's sources, claim, handle.

    For code paths that bypass ``post_save`` (``bulk_create``, ``QuerySet.update``,
    ``loaddata``)::

        Challenge.objects.filter(pk__in=pks).update(end_date=today)
        process_queryset(Challenge.objects.filter(pk__in=pks))

    Every source of the model runs, including ``on_save=False`` ones. Rows are read
    ``chunk_size`` at a time in primary-key order (memory stays bounded by the chunk) and
    each chunk's events are claimed with a few statements. Inside a transaction the
    handlers run after it commits.

    A source that raises (including :class:`~spark_decl.exceptions.InvalidEvent`), or
    whose event's context cannot be stored (:class:`~spark_decl.exceptions.InvalidContext`),
    stops the run before that chunk is claimed, unless ``on_source_error`` is given: then
    it is called with the instance, the source and the exception, none of that instance's
    events is claimed, and the rest of the chunk and the run go on.
    ``on_chunk`` is called with the running totals after each chunk.

    ``should_stop`` is asked after each chunk, once its handlers have run and their
    outcomes are recorded; when it returns true the run ends there, leaving the rest of
    the rows for the next run (``process_spark_sources`` stops this way on SIGTERM).
    """
    if sources is None:
        sources = registry.sources(queryset.model)
    size = chunk_size or get_settings().CHUNK_SIZE
    using = queryset.db
    result = BatchResult()
    if not sources:
        return result

    def skip(instance: Model, source: SourceSpec, exc: Exception) -> None:
        if on_source_error is None:
            raise exc
        result.source_errors += 1
        on_source_error(instance, source, exc)

    read_first = True  # cron's usual run finds most keys seen
    for rows in iterate_chunks(queryset, size):
        produced: list[_Produced] = []
        for row in rows:
            try:
                produced.append((row, events_by_source(row, sources)))
            except Exception as exc:
                skip(row, _failing_source(exc, sources), exc)
        # Events whose keys were claimed before are dropped with one read, so a re-run
        # costs a SELECT per chunk instead of conversions and conflicting INSERTs; the
        # INSERT ... ON CONFLICT still decides races with other workers. Once a chunk
        # turns out mostly new (a first pass), that read would be wasted: the next chunk
        # goes straight to the claim, and is read first again if it was mostly seen.
        seen = _seen(produced, using) if read_first or mode is Mode.DRY_RUN else None
        chunk = _storable(produced, seen)
        if chunk.refused and seen is None:
            # Perhaps the context of a key claimed before, which the read drops: a run
            # must not fail or pass depending on what the chunk before it held.
            chunk = _storable(produced, _seen(produced, using))
        for row, source, refusal in chunk.refused:
            skip(row, source, refusal)
        result.rows += len(rows)
        result.events += chunk.produced
        if mode is Mode.DRY_RUN:
            new = len(chunk.contexts)
        elif mode is Mode.MARK_ONLY:
            new = len(
                claim_events(chunk.events, using=using, handlers=False, contexts=chunk.contexts)
            )
        else:
            new, dispatched = claim_and_run(chunk.events, using=using, contexts=chunk.contexts)
            result.dispatch += dispatched
        result.new += new
        read_first = new * 2 < chunk.produced
        if on_chunk is not None:
            on_chunk(result)
        if should_stop is not None and should_stop():
            break
    return result


# A row of a batch and, per source that produced events for it, those events.
_Produced = tuple["Model", list[tuple["SourceSpec", list["Event[Any]"]]]]


@dataclass(slots=True)
class _Chunk:
    """What a chunk of rows hands to the claim: each new key's first event, in order, and
    its context converted for storage; and the rows refused for an unstorable context."""

    events: list[Event[Any]] = field(default_factory=list)
    contexts: dict[str, str] = field(default_factory=dict)
    refused: list[tuple[Model, SourceSpec, InvalidContext]] = field(default_factory=list)
    produced: int = 0  # the events of the rows not refused


def _seen(produced: list[_Produced], using: str) -> set[str]:
    return seen_keys(
        [event["key"] for _, by_source in produced for _, events in by_source for event in events],
        using=using,
    )


def _storable(produced: list[_Produced], seen: set[str] | None) -> _Chunk:
    """Convert the contexts of the keys not ``seen`` (all if ``None``), a row at a time: a
    row with an unstorable context is refused whole, as if its source had raised, and the
    other rows of the chunk go on."""
    chunk = _Chunk()
    contexts = chunk.contexts
    for row, by_source in produced:
        converted: dict[str, str] = {}
        refused: tuple[Model, SourceSpec, InvalidContext] | None = None
        for source, events in by_source:
            try:
                for event in events:
                    key = event["key"]
                    if key in contexts or key in converted or (seen and key in seen):
                        continue
                    converted[key] = dump_context_json(event["context"], key=key)
            except InvalidContext as exc:
                refused = (row, source, exc)
                break
        if refused is not None:
            chunk.refused.append(refused)
            continue
        contexts.update(converted)
        for _, events in by_source:
            chunk.produced += len(events)
            chunk.events.extend(event for event in events if event["key"] in converted)
    return chunk


def _failing_source(exc: Exception, sources: Sequence[SourceSpec]) -> SourceSpec:
    source: SourceSpec | None = getattr(exc, "spark_source", None)
    return source if source is not None else sources[0]


def process_model(
    model: type[Model],
    *,
    chunk_size: int | None = None,
    mode: Mode = Mode.HANDLE,
    on_source_error: SourceErrorHandler | None = None,
    on_chunk: Callable[[BatchResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchResult:
    """Run the batch for one registered model: each group of sources sharing a
    ``queryset=`` restriction scans that queryset (default: the default manager).
    ``should_stop`` is asked after each chunk and before each queryset, as in
    :func:`process_queryset`."""
    result = BatchResult()
    groups = source_querysets(model)
    for queryset, specs in groups:
        if should_stop is not None and should_stop():
            break
        before = result.copy()

        def progress(totals: BatchResult, before: BatchResult = before) -> None:
            assert on_chunk is not None
            combined = before.copy()
            combined += totals
            on_chunk(combined)

        result += process_queryset(
            queryset,
            chunk_size=chunk_size,
            mode=mode,
            sources=specs,
            on_source_error=on_source_error,
            on_chunk=progress if on_chunk is not None else None,
            should_stop=should_stop,
        )
    return result


def source_querysets(model: type[Model]) -> list[tuple[QuerySet[Any], list[SourceSpec]]]:
    """The querysets the batch scans for ``model``, each with the sources that share it:
    one per ``queryset=`` restriction, the default manager for unrestricted sources.

    Every restriction is evaluated and checked before any row is processed: a
    misconfigured source must not leave a batch half done.
    """
    from django.db.models import QuerySet

    by_queryset: dict[Any, list[SourceSpec]] = {}
    for spec in registry.sources(model):
        by_queryset.setdefault(spec.queryset, []).append(spec)
    groups: list[tuple[QuerySet[Any], list[SourceSpec]]] = []
    for factory, specs in by_queryset.items():
        queryset = factory() if factory is not None else model._default_manager.all()
        if not isinstance(queryset, QuerySet):
            raise RegistrationError(
                f"queryset= of {specs[0].name} must return a QuerySet of "
                f"{model._meta.label}, got {type(queryset).__name__}."
            )
        if queryset.model is not model:
            raise RegistrationError(
                f"queryset= of {specs[0].name} returned a queryset of "
                f"{queryset.model._meta.label}, not of {model._meta.label}."
            )
        groups.append((queryset, specs))
    return groups


# -- the batch split into tasks --------------------------------------------------------------


def enqueue_chunks(
    model: type[Model],
    *,
    chunk_size: int,
    mode: str = "handle",
    using: str = DEFAULT_DB_ALIAS,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Split the rows each group of ``model``'s sources scans into ranges of
    ``chunk_size`` primary keys and enqueue one
    :func:`~spark_decl.tasks.process_source_chunk` per range; returns the number of
    tasks. The last range is open-ended, so rows created meanwhile are included. Reads
    one primary key per chunk.

    Raises :class:`~spark_decl.exceptions.EnqueueFailed` if the backend refuses a task or
    does not take it within ``SPARK_DECL["ENQUEUE_TIMEOUT"]``."""
    chunk_task = get_task("process_source_chunk")
    backend = chunk_task.get_backend()
    outbox = enqueues_with_claims(using)
    enqueued = 0
    for queryset, specs in source_querysets(model):
        names = [spec.name for spec in specs]
        pks = queryset.using(using).order_by("pk").values_list("pk", flat=True)
        # With an outbox backend, all of a model's chunk tasks commit together.
        with transaction.atomic(using=using) if outbox else nullcontext():
            after: Any = None
            while True:
                page = pks if after is None else pks.filter(pk__gt=after)
                boundary = list(page[chunk_size - 1 : chunk_size])
                upto = boundary[0] if boundary else None
                if upto is None and not page.exists():
                    break
                kwargs: dict[str, Any] = {
                    "model": model._meta.label,
                    "sources": names,
                    "after": _json_pk(after),
                    "upto": _json_pk(upto),
                    "mode": mode,
                }
                if using != DEFAULT_DB_ALIAS:
                    kwargs["database"] = using
                enqueue_within_bound(backend, partial(chunk_task.enqueue, **kwargs))
                enqueued += 1
                if on_chunk is not None:
                    on_chunk(enqueued)
                if upto is None:
                    break
                after = upto
    return enqueued


def _json_pk(value: object) -> Any:
    return value if value is None or type(value) in (int, str) else str(value)
