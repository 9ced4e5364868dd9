"""Background handlers and enqueued batches run by real ``manage.py db_worker`` processes
(django-tasks-db), on the test database (SQLite file or PostgreSQL).

The saving side runs in the test process with django-tasks-db's ``DatabaseBackend``; the
workers are separate Python processes (tests/workers.py) that register the same source and
handlers and run ``db_worker``. Every ``HandlerLog`` row records the process that wrote it.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from django_tasks_db.models import DBTaskResult

from spark_decl.enqueue import get_task
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from spark_decl.registry import Registry
from tests import workers
from tests.testapp.models import Challenge, HandlerLog
from tests.workers import Workers, assert_all_handled_once, key

DATABASE_TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
DB_WORKER = ("command", "db_worker", "--batch", "--no-startup-delay", "--no-reload")


@pytest.fixture
def database_tasks() -> Iterator[None]:
    with override_settings(TASKS=DATABASE_TASKS):
        yield


def register(registry: Registry, *, background: bool) -> None:
    registry.clear()
    workers.register(Challenge, workers.HANDLERS, background=background)


@pytest.fixture
def background_pool(
    tmp_path: Path, transactional_db: None, isolated_registry: Registry, database_tasks: None
) -> Iterator[Workers]:
    """db_worker processes with tests/workers.py's handlers as background handlers; the
    test process registers the same."""
    register(isolated_registry, background=True)
    pool = Workers(tmp_path, background=True, tasks="database")
    yield pool
    pool.stop_all()
    workers.PLAN.with_instance = False


def task_statuses() -> Counter[str]:
    return Counter(DBTaskResult.objects.values_list("status", flat=True))


def test_background_handlers_run_in_the_worker_once_with_fresh_instances(
    background_pool: Workers,
) -> None:
    saved = [Challenge.objects.create(title=f"saved {n}") for n in range(10)]
    pks = [challenge.pk for challenge in saved]
    # Saved, claimed, enqueued: nothing ran in this process.
    assert DBTaskResult.objects.count() == 2 * len(pks)
    assert not HandlerLog.objects.exists()
    assert set(HandlerOutcome.objects.values_list("status", flat=True)) == {"pending"}
    for pk in pks:
        Challenge.objects.filter(pk=pk).update(title=f"fresh {pk}")

    worker = background_pool.start(*DB_WORKER)
    worker.succeed()

    assert_all_handled_once(pks)
    logs = HandlerLog.objects.all()
    assert {log.pid for log in logs} == {worker.process.pid}
    assert worker.process.pid != os.getpid()
    assert {(log.key, log.detail) for log in logs} == {(key(pk), f"fresh {pk}") for pk in pks}
    assert task_statuses() == {"SUCCESSFUL": 2 * len(pks)}
    assert set(DBTaskResult.objects.values_list("return_value", flat=True)) == {"done"}

    # The same tasks delivered again: the calls are done, nothing runs twice.
    task = get_task("run_background_handler")
    for pk in pks:
        for handler in ("first", "second"):
            task.enqueue(handler=f"tests.workers.{handler}", key=key(pk))
    background_pool.start(*DB_WORKER).succeed()
    assert_all_handled_once(pks)
    skipped = DBTaskResult.objects.filter(return_value="skipped")
    assert skipped.count() == 2 * len(pks)


def test_a_worker_killed_mid_task_is_recovered_by_retry(background_pool: Workers) -> None:
    pks = [Challenge.objects.create(title=f"c{n}").pk for n in range(3)]
    # Killed inside the second handler call, after the handler's write, before commit.
    worker = background_pool.start(*DB_WORKER, pause_at=["handler:2"])
    worker.wait_paused()
    worker.kill()
    # django-tasks-db leaves the task RUNNING for ever; the call is still pending.
    assert task_statuses() == {"SUCCESSFUL": 1, "RUNNING": 1, "READY": 4}
    statuses = Counter(HandlerOutcome.objects.values_list("status", flat=True))
    assert statuses == {"done": 1, "pending": 5}
    assert HandlerLog.objects.count() == 1

    call_command("retry_spark_events", "--stale-after", "0", verbosity=0)
    assert_all_handled_once(pks)
    # The tasks still queued find their calls done.
    background_pool.start(*DB_WORKER).succeed()
    assert_all_handled_once(pks)
    assert DBTaskResult.objects.filter(return_value="skipped").count() == 4


def test_three_workers_process_an_enqueued_batch_each_key_once(
    tmp_path: Path, transactional_db: None, isolated_registry: Registry, database_tasks: None
) -> None:
    register(isolated_registry, background=False)
    rows = 5000
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(rows))
    pks = list(Challenge.objects.order_by("pk").values_list("pk", flat=True))
    call_command("process_spark_sources", "--enqueue", "--chunk-size", "250", verbosity=0)
    assert task_statuses() == {"READY": rows // 250}

    pool = Workers(tmp_path, tasks="database")
    try:
        running = [pool.start(*DB_WORKER) for _ in range(3)]
        for worker in running:
            worker.succeed()
    finally:
        pool.stop_all()

    assert_all_handled_once(pks)
    assert task_statuses() == {"SUCCESSFUL": rows // 250}
    results = [
        cast("dict[str, int]", result)
        for result in DBTaskResult.objects.values_list("return_value", flat=True)
    ]
    assert sum(result["rows"] for result in results) == rows
    assert sum(result["new"] for result in results) == rows
    assert sum(result["handled"] for result in results) == 2 * rows
    worker_pids = {worker.process.pid for worker in running}
    assert set(HandlerLog.objects.values_list("pid", flat=True)) <= worker_pids


# -- django-tasks-db installed, its app not ----------------------------------------------------


def without_tasks_db_app() -> dict[str, list[str]]:
    """The test settings' INSTALLED_APPS less django_tasks_db, for ``Workers``: a project
    that has the package (the dev extra installs it) and uses another backend."""
    assert importlib.util.find_spec("django_tasks_db") is not None
    return {"INSTALLED_APPS": [app for app in settings.INSTALLED_APPS if app != "django_tasks_db"]}


def test_background_handlers_and_enqueue_need_no_tasks_db_app_for_another_backend(
    tmp_path: Path, transactional_db: None
) -> None:
    # A process of its own: in this one django_tasks_db's models were imported long ago.
    pool = Workers(tmp_path, background=True, django_settings=without_tasks_db_app())
    try:
        # Saved, claimed, and run after commit by the ImmediateBackend.
        pool.run("create", "3")
        saved = list(Challenge.objects.values_list("pk", flat=True))
        assert_all_handled_once(saved)
        # bulk_create saves without signals: only the batch sees these (7 rows, 4 chunks).
        Challenge.objects.bulk_create(Challenge(title=f"batch {n}") for n in range(4))
        out = pool.batch("--enqueue", "--chunk-size", "2")
        assert "Enqueued 4 chunk task(s) on task backend 'default'" in out
    finally:
        pool.stop_all()
    assert_all_handled_once(list(Challenge.objects.values_list("pk", flat=True)))


def test_the_database_backend_without_its_app_is_a_clear_error(
    tmp_path: Path, transactional_db: None
) -> None:
    pool = Workers(
        tmp_path, background=True, tasks="database", django_settings=without_tasks_db_app()
    )
    try:
        check = pool.start("command", "check")
        assert check.finish() != 0
        # spark_decl's check for the background handlers (next to django-tasks-db's own,
        # which Django 6 runs only if something imported django.tasks before the checks).
        assert "spark_decl.E010" in check.stderr
        assert "'django_tasks_db' is not in INSTALLED_APPS: add it" in check.stderr
        # Saved in a transaction: claimed at its commit, where the error is logged.
        save = pool.start("create", "1")
        assert save.finish() == 0
    finally:
        pool.stop_all()
    assert "Could not claim the events of a committed transaction" in save.stderr
    assert "BackgroundUnavailable: The task backend 'default' is " in save.stderr
    assert "but 'django_tasks_db' is not in INSTALLED_APPS: add it" in save.stderr
    # Refused before anything was claimed: the event waits in the outbox.
    assert Challenge.objects.count() == 1
    assert not EventRecord.objects.exists()
    assert OutboxEvent.objects.count() == 1
