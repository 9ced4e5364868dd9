"""Enqueueing background calls on Django's tasks framework: the saving side.

spark_decl builds no queue: a background call is the task
:func:`spark_decl.tasks.run_background_handler`, enqueued on the backend Django's ``TASKS``
setting names (``SPARK_DECL["TASK_BACKEND"]``, default ``"default"``) with JSON arguments:
the handler's dotted name and the event key. The call's ``pending`` row is written with the
claim; the worker takes it like any other call (``spark_decl.tasks``), so a task
delivered twice runs the handler once.

When a call is enqueued:

* With ``django-tasks-db``'s ``DatabaseBackend`` writing to the database of the claim, the
  task row is written inside the claiming transaction (an outbox): the claim and its tasks
  commit together, or neither does.
* With any other backend, after the claiming transaction commits (at once when there is
  none). A backend that fails then is logged; the call stays ``pending`` and
  ``retry_spark_events --stale-after`` runs it.

How long enqueueing may take: the framework's in-process backends (``ImmediateBackend``,
``DummyBackend``) and django-tasks-db's (an ``INSERT``) enqueue in the calling thread.
Every other backend is taken to talk to a broker (RQ, Celery), whose client may wait for
ever on a broker that accepts connections and never answers: it enqueues in a daemon
thread, and the caller waits at most ``SPARK_DECL["ENQUEUE_TIMEOUT"]``. A call whose task
was not taken by then stays ``pending``; if the thread gets it through later, the task
still runs the call at most once (the outcome row's conditional ``UPDATE``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.utils.module_loading import import_string

from .calls import Call, report_failure
from .conf import get_settings
from .context import dump_context
from .exceptions import BackgroundUnavailable, EnqueueFailed

if TYPE_CHECKING:
    from ._tasks import BaseTaskBackend, Task
    from .types import Event

logger = logging.getLogger("spark_decl")

MISSING_FRAMEWORK = (
    "Django's tasks framework is not installed: it is part of Django >= 6.0; on Django 5.2 "
    "install the django-tasks backport (pip install 'spark-decl[backport]')."
)

# django-tasks-db's backend, named rather than imported (see is_database_backend).
DATABASE_BACKEND = "django_tasks_db.backend.DatabaseBackend"

TaskName = Literal["run_background_handler", "process_source_chunk"]


def framework_available() -> bool:
    """Whether ``django.tasks`` or the ``django-tasks`` backport can be imported."""
    try:
        from . import _tasks  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError:
        return False
    return True


def get_backend() -> BaseTaskBackend:
    """The task backend named by ``SPARK_DECL["TASK_BACKEND"]``."""
    try:
        from ._tasks import InvalidTaskBackend, task_backends
    except ImportError as exc:
        raise BackgroundUnavailable(MISSING_FRAMEWORK) from exc
    alias = get_settings().TASK_BACKEND
    try:
        backend = task_backends[alias]
    except InvalidTaskBackend as exc:
        raise BackgroundUnavailable(
            f"SPARK_DECL['TASK_BACKEND'] is {alias!r}, which the TASKS setting does not "
            f"configure properly: {exc}"
        ) from exc
    if is_database_backend(backend) and not apps.is_installed("django_tasks_db"):
        # Its models cannot even be imported then: say so before a save gets that far.
        raise BackgroundUnavailable(
            f"The task backend {alias!r} is {class_path(backend)}, but 'django_tasks_db' "
            "is not in INSTALLED_APPS: add it, then run manage.py migrate."
        )
    return backend


def class_path(backend: BaseTaskBackend) -> str:
    return f"{type(backend).__module__}.{type(backend).__qualname__}"


def describe_backend(backend: BaseTaskBackend) -> str:
    """How errors name a backend: its alias in ``TASKS`` and its class."""
    return f"task backend {backend.alias!r} ({class_path(backend)})"


def is_database_backend(backend: BaseTaskBackend) -> bool:
    """Whether ``backend`` is django-tasks-db's ``DatabaseBackend`` (or a subclass).

    Decided from the configured backend's class, never by importing django_tasks_db:
    installed is not configured, and its models cannot be imported unless its app is in
    ``INSTALLED_APPS``.
    """
    return any(
        f"{cls.__module__}.{cls.__qualname__}" == DATABASE_BACKEND for cls in type(backend).__mro__
    )


def enqueues_in_process(backend: BaseTaskBackend) -> bool:
    """Whether enqueueing on ``backend`` cannot wait on a broker, so it runs in the calling
    thread: the framework's ``ImmediateBackend`` and ``DummyBackend`` (memory; a test's
    ``DummyBackend`` must see its results in the test's thread) and django-tasks-db's (an
    ``INSERT``, which must join the claiming transaction). Any other backend may talk to a
    broker over the network, and is given at most ``SPARK_DECL["ENQUEUE_TIMEOUT"]``."""
    from ._tasks import DummyBackend, ImmediateBackend

    return isinstance(backend, ImmediateBackend | DummyBackend) or is_database_backend(backend)


def get_task(name: TaskName) -> Task[..., Any]:
    """One of ``spark_decl.tasks``, on the configured backend and queue.

    Raises :class:`~spark_decl.exceptions.BackgroundUnavailable` if the backend cannot
    take it (no tasks framework, unknown backend, a queue the backend does not serve).
    """
    get_backend()
    from ._tasks import InvalidTask, InvalidTaskBackend

    config = get_settings()
    try:
        # Found by its dotted path, as a worker finds it: spark_decl.tasks is an entry
        # point, above this module (and defining a task needs the settings).
        task: Task[..., Any] = import_string(f"spark_decl.tasks.{name}")
        if task.backend != config.TASK_BACKEND or task.queue_name != config.TASK_QUEUE:
            task = task.using(backend=config.TASK_BACKEND, queue_name=config.TASK_QUEUE)
    except (InvalidTask, InvalidTaskBackend) as exc:
        raise BackgroundUnavailable(
            f"The task backend {config.TASK_BACKEND!r} cannot run spark_decl's tasks in the "
            f"queue {config.TASK_QUEUE!r} (SPARK_DECL['TASK_BACKEND'] / ['TASK_QUEUE']): {exc}"
        ) from exc
    return task


def enqueues_with_claims(using: str) -> bool:
    """Whether the task backend stores tasks in the database ``using`` (django-tasks-db),
    so that tasks can be written in the claiming transaction."""
    if not is_database_backend(get_backend()):
        return False
    from django_tasks_db.models import DBTaskResult

    return router.db_for_write(DBTaskResult) == using


def enqueue_within_bound(backend: BaseTaskBackend, work: Callable[[], object]) -> None:
    """Run ``work``, which enqueues on ``backend``: here for a backend that enqueues in
    process, else in a daemon thread waited for at most ``SPARK_DECL["ENQUEUE_TIMEOUT"]``.

    Raises :class:`~spark_decl.exceptions.EnqueueFailed`, naming the backend, if ``work``
    raised or did not finish in time (it then goes on in its thread: a broker that answers
    late still gets the task). A daemon thread never keeps the process from exiting.
    """
    if enqueues_in_process(backend):
        try:
            work()
        except Exception as exc:
            raise EnqueueFailed(
                f"The {describe_backend(backend)} could not enqueue: {type(exc).__name__}: {exc}"
            ) from exc
        return
    timeout = get_settings().ENQUEUE_TIMEOUT
    raised: list[Exception] = []

    def run() -> None:
        try:
            work()
        except Exception as exc:
            raised.append(exc)
        finally:
            # A backend that used the database did it on this thread's own connection.
            connections.close_all()

    thread = threading.Thread(
        target=run, name=f"spark_decl enqueue on {backend.alias}", daemon=True
    )
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise EnqueueFailed(
            f"The {describe_backend(backend)} did not enqueue within {timeout:g} s "
            "(SPARK_DECL['ENQUEUE_TIMEOUT']): its broker does not answer."
        )
    if raised:
        error = raised[0]
        raise EnqueueFailed(
            f"The {describe_backend(backend)} could not enqueue: {type(error).__name__}: {error}"
        ) from error


# -- the saving side ---------------------------------------------------------------------------


def submit(calls: Sequence[Call], *, using: str) -> int:
    """Enqueue background ``calls``: in the open transaction when the backend writes to
    the same database (outbox), else once it commits (at once outside a transaction).

    Returns how many calls were enqueued or scheduled for enqueueing. A missing or
    misconfigured tasks framework raises
    :class:`~spark_decl.exceptions.BackgroundUnavailable` here, before anything is
    enqueued (inside a transaction, that rolls back the claims with it).
    """
    if not calls:
        return 0
    task = get_task("run_background_handler")
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:
        return _enqueue(task, calls, using=using, robust=True)
    if enqueues_with_claims(using):
        return _enqueue(task, calls, using=using, robust=False)
    transaction.on_commit(partial(_enqueue, task, calls, using=using, robust=True), using=using)
    return len(calls)


def _enqueue(task: Task[..., Any], calls: Sequence[Call], *, using: str, robust: bool) -> int:
    """Enqueue each call. ``robust``: a call that cannot be enqueued is logged (a recorded
    one stays pending for ``retry_spark_events``) and the others still are. All of them
    together wait at most ``SPARK_DECL["ENQUEUE_TIMEOUT"]`` for a broker."""
    backend = task.get_backend()
    # Built here: a thread given up on must not be left reading the events' contexts.
    arguments = [_task_kwargs(call, using) for call in calls]
    # One entry per call, in order, as each is settled: None once enqueued, else why not.
    settled: list[Exception | None] = []

    def enqueue_each() -> None:
        for kwargs in arguments:
            try:
                task.enqueue(**kwargs)
            except Exception as exc:
                if not robust:
                    raise
                settled.append(exc)
            else:
                settled.append(None)

    if not robust:
        # The outbox: an error belongs to the claiming transaction, which it rolls back.
        enqueue_each()
        return len(calls)
    unsettled: EnqueueFailed | None = None
    try:
        enqueue_within_bound(backend, enqueue_each)
    except EnqueueFailed as exc:  # only a timeout: enqueue_each keeps what raised
        unsettled = exc
    outcomes = settled[:]  # the thread may still be appending to the original
    enqueued = 0
    for index, call in enumerate(calls):
        error = outcomes[index] if index < len(outcomes) else unsettled
        if error is None:
            enqueued += 1
        elif call.record_id is None:
            report_failure(call.spec, call.event, error)
        else:
            logger.error(
                "Could not enqueue %s for event %r on the %s; the call stays pending and "
                "retry_spark_events --stale-after runs it.",
                call.spec.name,
                call.event["key"],
                describe_backend(backend),
                exc_info=error,
            )
    return enqueued


def _task_kwargs(call: Call, using: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"handler": call.spec.name, "key": call.event["key"]}
    if call.record_id is None:
        # Not claimed, so not stored: the worker gets the event itself.
        kwargs["event"] = {
            "group": call.event["group"],
            "context": dump_context(call.event["context"], key=call.event["key"]),
        }
    if using != DEFAULT_DB_ALIAS:
        kwargs["database"] = using
    return kwargs


def check_enqueueable(event: Event[Any]) -> None:
    """Refuse, now, an unclaimed event whose background handlers could not get its
    context (it must be storable as JSON; model instances travel as references)."""
    dump_context(event["context"], key=event["key"])
