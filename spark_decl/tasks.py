"""The tasks spark_decl enqueues on Django's tasks framework, and what they do in a worker.

Both take JSON arguments only (names, keys, primary keys), never pickled objects, so they
work with every backend. They are defined on the backend and queue named by
``SPARK_DECL["TASK_BACKEND"]`` and ``["TASK_QUEUE"]``; :func:`spark_decl.enqueue.get_task`
re-targets them if those settings change. Defining a task needs settings, so this module
is imported on first use, not by ``import spark_decl``.

A worker that dies mid-task leaves the call ``pending`` (its transaction rolled back), so
``retry_spark_events --stale-after`` finishes it, in the retrying process; a call that was
done is never run again.
"""

from __future__ import annotations

import logging
from typing import Any

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections

from . import outcomes
from ._tasks import task
from .calls import Call, CallRunner
from .conf import get_settings
from .context import load_context, rebuild_context
from .exceptions import ContextUnavailable, SourceErrors, SparkError
from .registry import registry, resolve_handler
from .sources import SkippedInstances, process_queryset, source_querysets
from .types import Mode

logger = logging.getLogger("spark_decl")

_settings = get_settings()


@task(backend=_settings.TASK_BACKEND, queue_name=_settings.TASK_QUEUE)
def run_background_handler(
    handler: str,
    key: str,
    event: dict[str, Any] | None = None,
    database: str = DEFAULT_DB_ALIAS,
) -> str:
    """Run the background handler ``handler`` (its dotted name) for the event ``key``.

    ``event`` (group and stored context) is given only for events that were dispatched
    without being claimed (:func:`spark_decl.process_events` without
    :func:`spark_decl.only_new_events`). Returns ``"done"``, or ``"skipped"`` when the call
    had already run, or was never owed; a handler that raises fails the task, after its
    failure was recorded for ``retry_spark_events``.
    """
    return run_call(handler, key, event=event, using=database)


@task(backend=_settings.TASK_BACKEND, queue_name=_settings.TASK_QUEUE)
def process_source_chunk(
    model: str,
    sources: list[str],
    after: Any,
    upto: Any,
    mode: str = "handle",
    database: str = DEFAULT_DB_ALIAS,
) -> dict[str, int]:
    """Run the rows of ``model`` with ``after < pk <= upto`` (``None``: unbounded) through
    ``sources`` (dotted names); what ``process_spark_sources --enqueue`` enqueues. Returns
    the chunk's counts."""
    return run_chunk(model, sources, after=after, upto=upto, mode=mode, using=database)


# -- a background call ------------------------------------------------------------------------


def run_call(
    handler: str,
    key: str,
    *,
    event: dict[str, Any] | None = None,
    using: str = DEFAULT_DB_ALIAS,
) -> str:
    """Run one background call in this process: take its ``pending`` row and run the
    handler, like every other call. What :func:`run_background_handler` does."""
    from .models import HandlerOutcome

    spec = resolve_handler(handler)
    if event is not None:
        context = load_context(event["context"])
        call = Call(spec, {"group": event["group"], "key": key, "context": context})
    else:
        outcome = (
            HandlerOutcome.objects.using(using)
            .select_related("record")
            .filter(record__key=key, handler=spec.name)
            .first()
        )
        if outcome is None:
            logger.warning(
                "Background call of %s for event %r skipped: no such call is recorded "
                "(the event was pruned, or never routed to this handler).",
                spec.name,
                key,
            )
            return "skipped"
        if outcome.status != outcomes.PENDING:
            # Done already (a task delivered twice, or retry_spark_events was first), or
            # failed: retries belong to retry_spark_events.
            return "skipped"
        record = outcome.record
        try:
            context = rebuild_context(record.context)
        except ContextUnavailable as exc:
            outcomes.fail_unrun(connections[using], outcome, exc)
            raise
        call = Call(
            spec,
            {"group": record.group, "key": key, "context": context},
            record_id=record.pk,
            outcome_id=outcome.pk,
        )
    result = CallRunner(using).run([call])
    failures = [exc for _, exc in result.failures]
    result.report()
    if failures:
        # Recorded (and reported) already: fail the task too, so the backend shows it.
        raise failures[0]
    return "skipped" if result.skipped else "done"


# -- a chunk of the batch ----------------------------------------------------------------------


def run_chunk(
    model: str,
    sources: list[str],
    *,
    after: Any,
    upto: Any,
    mode: str = "handle",
    using: str = DEFAULT_DB_ALIAS,
) -> dict[str, int]:
    """Process one enqueued chunk; what :func:`process_source_chunk` does."""
    model_class = apps.get_model(model)
    wanted = set(sources)
    groups = [
        (queryset, specs)
        for queryset, specs in source_querysets(model_class)
        if {spec.name for spec in specs} == wanted
    ]
    if not groups:
        known = sorted(spec.name for spec in registry.sources(model_class))
        raise SparkError(
            f"The sources {sorted(wanted)} of {model} are not registered (together) in this "
            f"process; registered: {known}. Do workers run the same code as the enqueuer?"
        )
    queryset, specs = groups[0]
    queryset = queryset.using(using)
    pk = model_class._meta.pk
    assert pk is not None
    if after is not None:
        queryset = queryset.filter(pk__gt=pk.to_python(after))
    if upto is not None:
        queryset = queryset.filter(pk__lte=pk.to_python(upto))
    skipped = SkippedInstances()
    result = process_queryset(queryset, sources=specs, mode=Mode(mode), on_source_error=skipped)
    if skipped.messages:
        raise SourceErrors(skipped.summary())
    return {
        "rows": result.rows,
        "events": result.events,
        "new": result.new,
        "handled": result.dispatch.calls,
        "failed": result.dispatch.failed,
        "enqueued": result.dispatch.enqueued,
    }
