"""Re-running handler calls that failed, or that a dead process left pending, and replaying
old events to a handler registered after they were claimed.

Every path here ends in :func:`retry_outcomes`: outcome rows are turned back into calls with
their stored context rebuilt, and run by :class:`~spark_decl.calls.CallRunner`, which takes
each row with a conditional ``UPDATE`` before running it. That is what makes it safe to run
``retry_spark_events`` (and the admin's retry action) from several processes at once: a
call seen by two of them runs in the one that takes it first; the other counts it as
skipped.

Group filters are regular expressions applied with :func:`re.search` in Python, to the
distinct group values, exactly as ``@handles`` patterns are: the same expression selects
the same groups on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Count, Func, Min, Q, TextField
from django.db.models.functions import Cast, Length
from django.utils import timezone

from . import outbox, outcomes
from .calls import Call, CallRunner
from .claims import claim_events, retrying
from .conf import get_settings
from .context import BATCH_BYTES, load_stored_context
from .exceptions import ContextUnavailable
from .outcomes import PENDING
from .registry import compile_pattern, registry, resolve_handler
from .sources import iterate_chunks
from .vendors import MAX_PARAMETERS

if TYPE_CHECKING:
    from django.db.models import QuerySet

    from .models import EventRecord, HandlerOutcome
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
    #: Events claimed from the outbox, where a process that died after its transaction
    #: committed left them (their calls are among the others).
    recovered: int = 0

    def __iadd__(self, other: RetryResult) -> RetryResult:
        for name in ("due", "succeeded", "failed", "skipped", "unknown_handler", "recovered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


@dataclass(frozen=True)
class WaitingCalls:
    """The failed calls that are not due yet: ``count`` of them, the first due at
    ``next_due_at`` (``None`` when there are none)."""

    count: int
    next_due_at: datetime | None


@dataclass
class ReplayResult:
    """What :func:`replay_events` did.

    ``groups`` are the groups replayed; ``unrouted_groups`` matched the group expression
    but not the handler's own patterns, so they were left alone. ``created`` counts the
    outcome rows created (one per event); ``run`` what running them did.
    """

    handler: str
    groups: list[str] = field(default_factory=list)
    unrouted_groups: list[str] = field(default_factory=list)
    created: int = 0
    run: RetryResult = field(default_factory=RetryResult)


def matching_groups(pattern: str, *, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """The stored groups that ``re.search(pattern, group)`` matches, sorted.

    An invalid expression raises :class:`~spark_decl.exceptions.InvalidPattern`.
    """
    from .models import EventRecord

    compiled = compile_pattern(pattern, where="the group filter")
    groups = (
        EventRecord.objects.using(using)
        .order_by("group")
        .values_list("group", flat=True)
        .distinct()
    )
    return [group for group in groups if compiled.search(group)]


def due_outcomes(
    *,
    stale_after: float | None = DEFAULT_STALE_AFTER,
    ignore_schedule: bool = False,
    include_given_up: bool = False,
    group: str | None = None,
    handler: str | None = None,
    records: QuerySet[EventRecord] | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> QuerySet[HandlerOutcome]:
    """The outcome rows a retry run should re-run now, oldest first.

    Failed calls whose backoff has passed (every failed call with ``ignore_schedule``),
    given-up calls too with ``include_given_up``, and calls left pending for at least
    ``stale_after`` seconds (none if it is ``None``). ``group`` (a regular expression),
    ``handler`` (a dotted name) and ``records`` narrow the selection; ``handler`` is not
    checked against the registry here (see :func:`resolve_handler`).
    """
    from .models import HandlerOutcome

    now = timezone.now()
    # Each alternative restates the condition of spark_decl_due_idx, the partial index of
    # the unfinished calls: SQLite uses it for an alternative of an OR only when that
    # alternative has the index's condition among its own terms.
    unfinished = ~Q(status=HandlerOutcome.Status.DONE)
    failed = unfinished & Q(status=HandlerOutcome.Status.FAILED)
    if not ignore_schedule:
        failed &= Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)
    due = failed
    if include_given_up:
        due |= unfinished & Q(status=HandlerOutcome.Status.GIVEN_UP)
    if stale_after is not None:
        due |= unfinished & Q(
            status=HandlerOutcome.Status.PENDING,
            created_at__lte=now - timedelta(seconds=stale_after),
        )
    queryset = HandlerOutcome.objects.using(using).filter(due)
    if handler is not None:
        queryset = queryset.filter(handler=handler)
    if group is not None:
        queryset = queryset.filter(record__group__in=matching_groups(group, using=using))
    if records is not None:
        queryset = queryset.filter(record__in=records.order_by().values("pk"))
    # The contexts are read by retry_outcomes, a bounded number of bytes at a time.
    return queryset.select_related("record").defer("record__context").order_by("pk")


def waiting_calls(
    *, group: str | None = None, handler: str | None = None, using: str = DEFAULT_DB_ALIAS
) -> WaitingCalls:
    """The failed calls that wait out their backoff (a retry without ``ignore_schedule``
    leaves them alone), among those ``group`` and ``handler`` select as in
    :func:`due_outcomes`."""
    from .models import HandlerOutcome

    # The condition of spark_decl_due_idx first, as in due_outcomes.
    waiting = HandlerOutcome.objects.using(using).filter(
        ~Q(status=HandlerOutcome.Status.DONE),
        status=HandlerOutcome.Status.FAILED,
        next_attempt_at__gt=timezone.now(),
    )
    if handler is not None:
        waiting = waiting.filter(handler=handler)
    if group is not None:
        waiting = waiting.filter(record__group__in=matching_groups(group, using=using))
    found = waiting.order_by().aggregate(count=Count("pk"), next_due_at=Min("next_attempt_at"))
    return WaitingCalls(count=found["count"], next_due_at=found["next_due_at"])


def retry_outcomes(
    outcomes: Iterable[HandlerOutcome], *, using: str = DEFAULT_DB_ALIAS
) -> RetryResult:
    """Re-run each outcome's handler with its stored context, rebuilt (model instances
    fetched again), a chunk at a time.

    The contexts are read separately, at most :data:`~spark_decl.context.BATCH_BYTES` of
    them at a time, so large contexts never pile up in memory; a context that cannot be
    rebuilt fails its own call (recorded like any failure) and the others go on.
    """
    result = RetryResult()
    iterator = iter(outcomes)
    while chunk := list(islice(iterator, get_settings().CHUNK_SIZE)):
        for part, texts in _with_contexts(chunk, using=using):
            calls: list[Call] = []
            for outcome in part:
                result.due += 1
                call = _call_for(outcome, texts.get(outcome.record.pk), result, using=using)
                if call is not None:
                    calls.append(call)
            run = CallRunner(using).run(calls)
            run.report()
            result.succeeded += run.succeeded
            result.failed += run.failed
            result.skipped += run.skipped
    return result


def _with_contexts(
    outcomes: list[HandlerOutcome], *, using: str
) -> Iterator[tuple[list[HandlerOutcome], dict[int, str]]]:
    """``outcomes``, in order, in runs whose stored contexts total at most
    ``BATCH_BYTES``, each with those contexts' JSON text by event id (text, parsed per
    call, so that one that cannot be parsed fails alone)."""
    from .models import EventRecord

    text = Cast("context", output_field=TextField())

    def read(ids: list[int], value: Func) -> dict[int, Any]:
        found: dict[int, Any] = {}
        for start in range(0, len(ids), MAX_PARAMETERS):
            found.update(
                EventRecord.objects.using(using)
                .filter(pk__in=ids[start : start + MAX_PARAMETERS])
                .annotate(value=value)
                .values_list("pk", "value")
            )
        return found

    sizes = read(list({outcome.record.pk: None for outcome in outcomes}), Length(text))
    run: list[HandlerOutcome] = []
    in_run: dict[int, None] = {}
    size = 0
    for outcome in outcomes:
        pk = outcome.record.pk
        if pk not in in_run:
            if run and size + sizes.get(pk, 0) > BATCH_BYTES:
                yield run, read(list(in_run), text)
                run, in_run, size = [], {}, 0
            in_run[pk] = None
            size += sizes.get(pk, 0)
        run.append(outcome)
    if run:
        yield run, read(list(in_run), text)


def _call_for(
    outcome: HandlerOutcome, text: str | None, result: RetryResult, *, using: str
) -> Call | None:
    spec = registry.get_handler(outcome.handler)
    if spec is None:
        result.unknown_handler += 1
        logger.warning(
            "Cannot retry %s for event %r: no handler of that name is registered.",
            outcome.handler,
            outcome.record.key,
        )
        return None
    if text is None:  # pruned since the outcome was read: nothing is owed any more
        result.skipped += 1
        return None
    try:
        context = load_stored_context(text)
    except ContextUnavailable as exc:
        fail_unavailable(outcome, exc, using=using)
        result.failed += 1
        return None
    event: Event[Any] = {
        "group": outcome.record.group,
        "key": outcome.record.key,
        "context": context,
    }
    call = Call(spec, event, record_id=outcome.record.pk, outcome_id=outcome.pk)
    if outcome.status != PENDING:
        call.expected = (outcome.status, outcome.attempts)
    return call


def retry_events(
    *,
    stale_after: float | None = DEFAULT_STALE_AFTER,
    ignore_schedule: bool = False,
    include_given_up: bool = False,
    group: str | None = None,
    handler: str | None = None,
    records: QuerySet[EventRecord] | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> RetryResult:
    """Re-run every due failed call and every call left pending for ``stale_after`` seconds.

    What ``manage.py retry_spark_events`` runs; the arguments are those of
    :func:`due_outcomes`. An invalid ``group`` expression raises
    :class:`~spark_decl.exceptions.InvalidPattern` and an unregistered ``handler``
    :class:`~spark_decl.exceptions.UnknownHandler`, before anything runs. Safe to run from
    several processes at once: each call runs in at most one of them.
    """
    if handler is not None:
        resolve_handler(handler)
    outcomes = due_outcomes(
        stale_after=stale_after,
        ignore_schedule=ignore_schedule,
        include_given_up=include_given_up,
        group=group,
        handler=handler,
        records=records,
        using=using,
    )
    pages = iterate_chunks(outcomes, get_settings().CHUNK_SIZE)
    result = retry_outcomes(chain.from_iterable(pages), using=using)
    if stale_after is not None and group is None and handler is None and records is None:
        from .models import HandlerOutcome

        keys = claim_outbox(stale_after=stale_after, using=using)
        if keys:
            result.recovered += len(keys)
            result += retry_outcomes(
                HandlerOutcome.objects.using(using)
                .filter(record__key__in=keys, status=PENDING)
                .select_related("record")
                .defer("record__context")
                .order_by("pk"),
                using=using,
            )
    return result


def claim_outbox(*, stale_after: float, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Claim the events a process left in the outbox (:mod:`spark_decl.outbox`) when it
    died between its transaction's commit and their claim: those written at least
    ``stale_after`` seconds ago. Returns the keys claimed now; their calls are pending.
    Safe alongside the live claims: an outbox row is taken once."""
    claimed: list[str] = []
    for rows in outbox.stale(stale_after, chunk_size=get_settings().CHUNK_SIZE, using=using):
        contexts: dict[str, str] = {}
        for _, key, _, text in rows:
            contexts.setdefault(key, text)

        def take_and_claim(
            rows: list[tuple[int, str, str, str]] = rows, contexts: dict[str, str] = contexts
        ) -> list[Event[Any]]:
            taken = outbox.take(connections[using], {pk: key for pk, key, _, _ in rows})
            # The context is the stored text: nothing needs to be rebuilt to claim.
            events: list[Event[Any]] = [
                {"group": group, "key": key, "context": {}}
                for pk, key, group, _ in rows
                if pk in taken
            ]
            return claim_events(events, using=using, contexts=contexts)

        keys = [key for _, key, _, _ in rows]
        claimed += [event["key"] for event in retrying(take_and_claim, using=using, keys=keys)]
    return claimed


def retry_records(records: QuerySet[EventRecord], *, using: str = DEFAULT_DB_ALIAS) -> RetryResult:
    """Re-run, now, every failed or given-up handler call of ``records``.

    The admin's "Retry failed handlers" action. The backoff schedule is ignored (a person
    asked for it), and a given-up call gets one more attempt: if it fails again it is given
    up again. Pending calls are left to ``retry_spark_events --stale-after``.
    """
    return retry_events(
        stale_after=None,
        ignore_schedule=True,
        include_given_up=True,
        records=records,
        using=using,
    )


def replay_events(handler: str, *, group: str, using: str = DEFAULT_DB_ALIAS) -> ReplayResult:
    """Send events claimed before ``handler`` existed to it: the explicit way to do that.

    For every :class:`~spark_decl.models.EventRecord` whose group matches ``group``
    (``re.search``) *and* one of the handler's own patterns, and that has no outcome for
    ``handler`` yet (no row, and not done when it was claimed), a pending outcome row is
    created and run like a retry (the stored context rebuilt; ``event_dispatched`` is not
    sent). A chunk of events at a time.

    Idempotent: every replayed event now has an outcome for the handler, so a second
    replay creates nothing; concurrent replays run each call once. Calls a crash
    interrupted stay pending and are finished by ``retry_spark_events --stale-after``. ::

        replay_events("challenges.spark.send_challenge_mails", group=r"^challenge_")
    """
    from .models import EventRecord, HandlerOutcome

    spec = resolve_handler(handler)
    result = ReplayResult(handler=spec.name)
    for name in matching_groups(group, using=using):
        (result.groups if spec.matches(name) else result.unrouted_groups).append(name)
    if not result.groups:
        return result
    candidates = EventRecord.objects.using(using).filter(
        ~outcomes.reached(spec.name), group__in=result.groups
    )
    # The contexts are read by retry_outcomes, a bounded number of bytes at a time.
    for records in iterate_chunks(candidates.defer("context"), get_settings().CHUNK_SIZE):
        now = timezone.now()
        with transaction.atomic(using=using):
            # A replay running at the same time may have created some of these rows.
            HandlerOutcome.objects.using(using).bulk_create(
                [
                    HandlerOutcome(record=record, handler=spec.name, created_at=now)
                    for record in records
                ],
                ignore_conflicts=True,
            )
        by_pk = {record.pk: record for record in records}
        created = list(
            HandlerOutcome.objects.using(using).filter(
                record__in=list(by_pk), handler=spec.name, status=PENDING, attempts=0
            )
        )
        for outcome in created:
            # record_id is made by Django; only django-stubs' mypy plugin declares it.
            outcome.record = by_pk[outcome.record_id]  # pyright: ignore[reportAttributeAccessIssue]
        result.created += len(created)
        result.run += retry_outcomes(created, using=using)
    return result


def fail_unavailable(outcome: HandlerOutcome, exc: Exception, *, using: str) -> None:
    """A call whose context cannot be rebuilt counts as a failed attempt (unless another
    process ran it meanwhile)."""
    outcomes.fail_unrun(connections[using], outcome, exc)
    logger.error("Cannot retry %s for event %r: %s", outcome.handler, outcome.record.key, exc)
