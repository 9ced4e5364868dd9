"""The tasks spark_decl enqueues on Django's tasks framework.

Both take JSON arguments only (names, keys, primary keys), never pickled objects, so they
work with every backend. They are defined on the backend and queue named by
``SPARK_DECL["TASK_BACKEND"]`` and ``["TASK_QUEUE"]``; :mod:`spark_decl.background`
re-targets them if those settings change. Defining a task needs settings, so this module is
imported on first use, not by ``import spark_decl``.
"""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS

from ._tasks import task
from .conf import get_settings

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
    from .background import run_call

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
    from .background import run_chunk

    return run_chunk(model, sources, after=after, upto=upto, mode=mode, using=database)
