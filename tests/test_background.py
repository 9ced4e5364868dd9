"""Background handlers on Django's tasks framework, in one process.

The backends used here are the framework's own: ``ImmediateBackend`` (the default; runs a
task the moment it is enqueued), ``DummyBackend`` (keeps what was enqueued, runs nothing,
so a test runs each task itself, as a worker would) and django-tasks-db's
``DatabaseBackend`` (a task is a row in the database). Real ``db_worker`` processes are in
tests/test_background_workers.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import suppress
from typing import Any
from unittest.mock import patch

import django
import pytest
from django.core.checks import run_checks
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import override_settings
from django_tasks_db.models import DBTaskResult

from spark_decl import Event, event, event_source, handles, process_events
from spark_decl._tasks import DummyBackend, TaskResult, task_backends
from spark_decl.exceptions import (
    BackgroundUnavailable,
    InvalidContext,
    SourceErrors,
    UnknownHandler,
)
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from spark_decl.registry import Registry, function_name
from spark_decl.signals import handler_failed
from spark_decl.tasks import run_chunk
from tests.conftest import CHALLENGE_HANDLER
from tests.testapp.models import Challenge, HandlerLog

TASKS_PACKAGE = "django.tasks" if django.VERSION >= (6, 0) else "django_tasks"
DUMMY = {"default": {"BACKEND": f"{TASKS_PACKAGE}.backends.dummy.DummyBackend"}}
DATABASE = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
WELCOME = "tests.test_background.send_welcome"
TASK_PATH = "spark_decl.tasks.run_background_handler"


# Module-level handlers, as users write them in spark.py: the task names them.
def send_welcome(event: Event[Any]) -> None:
    challenge = event["context"].get("challenge")
    HandlerLog.objects.create(
        handler="send_welcome",
        key=event["key"],
        detail=challenge.title if challenge is not None else "",
    )


class Rollback(Exception):
    pass


class WebhookDown(Exception):
    pass


def failing_webhook(event: Event[Any]) -> None:
    HandlerLog.objects.create(handler="failing_webhook", key=event["key"])
    raise WebhookDown(f"no answer for {event['key']}")


class BrokenBackend(DummyBackend):
    """A queue that is down."""

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        raise ConnectionError("the broker is down")


@pytest.fixture
def welcome(isolated_registry: Registry) -> Registry:
    """``send_welcome`` as a background handler of new challenges."""
    handles(r"^challenge_created$", background=True)(send_welcome)
    return isolated_registry


@pytest.fixture
def dummy() -> Iterator[DummyBackend]:
    with override_settings(TASKS=DUMMY):
        backend = task_backends["default"]
        assert isinstance(backend, DummyBackend)
        yield backend


def enqueued(backend: DummyBackend, path: str = TASK_PATH) -> list[TaskResult[Any]]:
    return [result for result in backend.results if result.task.module_path == path]


def run(result: TaskResult[Any]) -> Any:
    """What a worker does with an enqueued task (the arguments as JSON carried them)."""
    args = json.loads(json.dumps(result.args))
    kwargs = json.loads(json.dumps(result.kwargs))
    return result.task.call(*args, **kwargs)


def welcomed() -> list[tuple[str, str]]:
    return list(
        HandlerLog.objects.filter(handler="send_welcome")
        .order_by("pk")
        .values_list("key", "detail")
    )


def outcome(key: str, handler: str = WELCOME) -> HandlerOutcome:
    return HandlerOutcome.objects.get(record__key=key, handler=handler)


# -- when calls are enqueued ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_the_default_immediate_backend_runs_the_call_after_commit() -> None:
    with transaction.atomic():
        challenge = Challenge.objects.create(title="Run")
        assert welcomed() == []
    key = f"challenge_created_{challenge.pk}"
    assert welcomed() == [(key, "Run")]
    assert outcome(key).status == "done"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_call_is_enqueued_as_json_naming_handler_and_key(dummy: DummyBackend) -> None:
    challenge = Challenge.objects.create(title="Run")
    key = f"challenge_created_{challenge.pk}"
    [result] = enqueued(dummy)
    assert result.args == []
    assert result.kwargs == {"handler": WELCOME, "key": key}
    # Nothing ran in the saving process; the call is owed.
    assert welcomed() == []
    assert outcome(key).status == "pending"
    # The in-process handler of the test app ran as usual, in the claiming transaction:
    # it is done on the event, while the background call has its pending row.
    assert HandlerLog.objects.filter(handler="log_challenge_event", key=key).count() == 1
    record = EventRecord.objects.get(key=key)
    assert record.handler_statuses() == {CHALLENGE_HANDLER: "done", WELCOME: "pending"}

    assert run(result) == "done"
    assert welcomed() == [(key, "Run")]
    assert outcome(key).status == "done"
    assert outcome(key).attempts == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_task_delivered_twice_runs_the_handler_once(dummy: DummyBackend) -> None:
    challenge = Challenge.objects.create(title="Twice")
    [result] = enqueued(dummy)
    assert run(result) == "done"
    assert run(result) == "skipped"
    assert welcomed() == [(f"challenge_created_{challenge.pk}", "Twice")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_with_another_backend_calls_are_enqueued_after_commit(dummy: DummyBackend) -> None:
    with transaction.atomic():
        Challenge.objects.create(title="Later")
        assert enqueued(dummy) == []
    assert len(enqueued(dummy)) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_rolled_back_save_enqueues_nothing(dummy: DummyBackend) -> None:
    with suppress(Rollback), transaction.atomic():
        Challenge.objects.create(title="Never")
        raise Rollback
    assert enqueued(dummy) == []
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_django_tasks_db_enqueues_in_the_claiming_transaction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with override_settings(TASKS=DATABASE):
        with transaction.atomic():
            challenge = Challenge.objects.create(title="Outbox")
            # A transaction's saves are claimed when it commits: nothing yet.
            assert not DBTaskResult.objects.exists()
        # Claimed after the commit, with the task row in the claim's transaction, and
        # enqueued once.
        [task] = DBTaskResult.objects.all()
        assert task.task_path == TASK_PATH
        assert task.args_kwargs == {
            "args": [],
            "kwargs": {"handler": WELCOME, "key": f"challenge_created_{challenge.pk}"},
        }
        assert EventRecord.objects.filter(key=f"challenge_created_{challenge.pk}").exists()

        with suppress(Rollback), transaction.atomic():
            Challenge.objects.create(title="Rolled back")
            raise Rollback
        assert DBTaskResult.objects.count() == 1
        assert EventRecord.objects.count() == 1

        # The claim and its task commit together: a claim that fails takes its task.
        with (
            patch(
                "spark_decl.dispatch.CallRunner.run_claimed",
                side_effect=RuntimeError("the claim's transaction fails"),
            ),
            transaction.atomic(),
        ):
            failing = Challenge.objects.create(title="Claim fails")
        assert DBTaskResult.objects.count() == 1
        assert EventRecord.objects.count() == 1
        # The save committed; the error is logged, and the event waits in the outbox.
        assert Challenge.objects.filter(pk=failing.pk).exists()
        assert OutboxEvent.objects.get().key == f"challenge_created_{failing.pk}"
        [record] = [r for r in caplog.records if r.name == "spark_decl"]
        assert record.levelname == "ERROR"
        assert f"challenge_created_{failing.pk}" in record.getMessage()
        assert "retry_spark_events --stale-after" in record.getMessage()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_django_tasks_db_in_autocommit_writes_claim_and_task_together() -> None:
    with override_settings(TASKS=DATABASE):
        challenge = Challenge.objects.create(title="Autocommit")
    [task] = DBTaskResult.objects.all()
    assert task.args_kwargs["kwargs"]["key"] == f"challenge_created_{challenge.pk}"
    assert welcomed() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_the_worker_gets_fresh_model_instances(dummy: DummyBackend) -> None:
    challenge = Challenge.objects.create(title="As saved")
    Challenge.objects.filter(pk=challenge.pk).update(title="As changed since")
    [result] = enqueued(dummy)
    run(result)
    assert welcomed() == [(f"challenge_created_{challenge.pk}", "As changed since")]


@pytest.mark.django_db(transaction=True)
def test_events_dispatched_without_a_claim_travel_with_their_context(
    isolated_registry: Registry, dummy: DummyBackend
) -> None:
    handles(r"^greeting$", background=True)(send_welcome)
    challenge = Challenge.objects.create(title="Greeted")
    process_events([event("greeting", 7, {"challenge": challenge, "n": 7})])
    [result] = enqueued(dummy)
    assert result.kwargs["key"] == "greeting_7"
    assert result.kwargs["event"]["group"] == "greeting"
    Challenge.objects.filter(pk=challenge.pk).update(title="Greeted, fresh")
    assert run(result) == "done"
    assert welcomed() == [("greeting_7", "Greeted, fresh")]
    # Not claimed, so nothing was recorded.
    assert not HandlerOutcome.objects.filter(handler=WELCOME).exists()


@pytest.mark.django_db(transaction=True)
def test_an_unstorable_context_is_refused_before_anything_is_enqueued(
    isolated_registry: Registry, dummy: DummyBackend
) -> None:
    handles(r"^greeting$", background=True)(send_welcome)
    seen: list[str] = []

    @handles(r"^local$")
    def local(event: Event[Any]) -> None:
        seen.append(event["key"])

    with pytest.raises(InvalidContext, match=r"greeting_1.*context\['blob'\]"):
        process_events([event("local", 1), event("greeting", 1, {"blob": object()})])
    assert enqueued(dummy) == []
    assert seen == []
    # In-process handlers take any context, as before.
    process_events([event("local", 2, {"blob": object()})])
    assert seen == ["local_2"]


# -- failures -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_failing_call_is_recorded_and_fails_the_task(
    isolated_registry: Registry, dummy: DummyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    handles(r"^challenge_created$", background=True)(failing_webhook)
    reported: list[tuple[str, str]] = []

    def on_failure(*, event: Event[Any], handler: str, exception: Exception, **kw: Any) -> None:
        reported.append((event["key"], handler))

    handler_failed.connect(on_failure)
    try:
        challenge = Challenge.objects.create(title="Hook")
        [result] = enqueued(dummy)
        with pytest.raises(WebhookDown, match="no answer"):
            run(result)
    finally:
        handler_failed.disconnect(on_failure)
    key = f"challenge_created_{challenge.pk}"
    failed = outcome(key, "tests.test_background.failing_webhook")
    assert failed.status == "failed"
    assert failed.attempts == 1
    assert "WebhookDown: no answer" in failed.last_error
    assert "failing_webhook" in failed.traceback
    # The handler's write was rolled back with the call.
    assert not HandlerLog.objects.filter(handler="failing_webhook").exists()
    assert reported == [(key, "tests.test_background.failing_webhook")]
    assert "failing_webhook failed" in caplog.text
    # A second delivery leaves the failed call to retry_spark_events.
    assert run(result) == "skipped"
    assert outcome(key, "tests.test_background.failing_webhook").attempts == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_backend_failing_after_commit_leaves_the_call_for_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = {"default": {"BACKEND": "tests.test_background.BrokenBackend"}}
    with override_settings(TASKS=broken), caplog.at_level(logging.ERROR, "spark_decl"):
        challenge = Challenge.objects.create(title="Queue down")
    key = f"challenge_created_{challenge.pk}"
    assert "Could not enqueue tests.test_background.send_welcome" in caplog.text
    assert "the broker is down" in caplog.text
    assert outcome(key).status == "pending"
    # What the operations page prescribes: the retry command finishes it (in-process).
    call_command("retry_spark_events", "--stale-after", "0", verbosity=0)
    assert outcome(key).status == "done"
    assert welcomed() == [(key, "Queue down")]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"TASK_BACKEND": "mail"}, r"TASK_BACKEND'\] is 'mail'"),
        ({"TASK_QUEUE": "mail"}, r"queue 'mail'"),
    ],
)
def test_a_misconfigured_backend_is_a_clear_error_and_claims_nothing(
    settings: dict[str, str], message: str
) -> None:
    with (
        override_settings(SPARK_DECL=settings),
        pytest.raises(BackgroundUnavailable, match=message),
    ):
        Challenge.objects.create(title="Misconfigured")
    assert not EventRecord.objects.exists()
    assert not HandlerLog.objects.exists()
    # Once configured, the batch picks the challenge up.
    call_command("process_spark_sources", verbosity=0)
    assert len(welcomed()) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_spark_decl_can_use_another_backend_and_queue(dummy: DummyBackend) -> None:
    tasks = {**DUMMY, "mail": {**DUMMY["default"], "QUEUES": ["mail"]}}
    with override_settings(TASKS=tasks, SPARK_DECL={"TASK_BACKEND": "mail", "TASK_QUEUE": "mail"}):
        Challenge.objects.create(title="Routed")
        backend = task_backends["mail"]
        assert isinstance(backend, DummyBackend)
        [result] = enqueued(backend)
        assert result.task.queue_name == "mail"
        assert result.backend == "mail"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_task_for_an_unknown_handler_fails_clearly(dummy: DummyBackend) -> None:
    Challenge.objects.create(title="Renamed")
    [result] = enqueued(dummy)
    with pytest.raises(UnknownHandler, match=r"tests\.test_background\.send_welcom'"):
        result.task.call(handler="tests.test_background.send_welcom", key=result.kwargs["key"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_task_whose_event_was_pruned_is_skipped(
    dummy: DummyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    Challenge.objects.create(title="Pruned")
    [result] = enqueued(dummy)
    EventRecord.objects.all().delete()
    assert run(result) == "skipped"
    assert "no such call is recorded" in caplog.text
    assert welcomed() == []


# -- process_spark_sources --enqueue -------------------------------------------------------------


CHUNK_PATH = "spark_decl.tasks.process_source_chunk"


@pytest.fixture
def challenges(transactional_db: None) -> list[int]:
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(23))
    return list(Challenge.objects.order_by("pk").values_list("pk", flat=True))


def test_enqueue_splits_the_rows_into_chunk_tasks(
    challenges: list[int], dummy: DummyBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    call_command(
        "process_spark_sources", "--enqueue", "--chunk-size", "5", "--model", "testapp.Challenge"
    )
    out = capsys.readouterr().out
    assert "testapp.Challenge: 5 chunk task(s) of up to 5 rows" in out
    assert "Enqueued 5 chunk task(s) on task backend 'default', queue 'default'" in out
    # Nothing processed yet.
    assert not EventRecord.objects.exists()
    chunks = enqueued(dummy, CHUNK_PATH)
    assert len(chunks) == 5
    bounds = [(chunk.kwargs["after"], chunk.kwargs["upto"]) for chunk in chunks]
    assert bounds == [
        (None, challenges[4]),
        (challenges[4], challenges[9]),
        (challenges[9], challenges[14]),
        (challenges[14], challenges[19]),
        (challenges[19], None),
    ]
    totals: dict[str, int] = {}
    for chunk in chunks:
        for name, count in run(chunk).items():
            totals[name] = totals.get(name, 0) + count
    assert totals["rows"] == 23
    assert totals["new"] == 23  # challenge_created for each; the deadlines are in the past
    assert totals["failed"] == 0
    keys = {f"challenge_created_{pk}" for pk in challenges}
    assert set(EventRecord.objects.values_list("key", flat=True)) >= keys
    logged = HandlerLog.objects.filter(handler="log_challenge_event")
    assert sorted(logged.values_list("key", flat=True)) == sorted(
        EventRecord.objects.values_list("key", flat=True)
    )
    # Running the chunks again (a redelivery, another worker) handles nothing twice.
    for chunk in chunks:
        assert run(chunk)["new"] == 0
    assert logged.count() == EventRecord.objects.count()


def test_enqueue_with_mark_only_claims_without_handling(
    challenges: list[int], dummy: DummyBackend
) -> None:
    call_command(
        "process_spark_sources", "--enqueue", "--mark-only", "--chunk-size", "10", verbosity=0
    )
    chunks = enqueued(dummy, CHUNK_PATH)
    assert {chunk.kwargs["mode"] for chunk in chunks} == {"mark_only"}
    for chunk in chunks:
        run(chunk)
    assert EventRecord.objects.filter(group="challenge_created").count() == 23
    assert not HandlerLog.objects.exists()
    assert not HandlerOutcome.objects.exists()


def test_enqueue_respects_queryset_restrictions(
    isolated_registry: Registry, challenges: list[int], dummy: DummyBackend
) -> None:
    isolated_registry.clear()
    Challenge.objects.filter(pk__in=challenges[:20]).update(is_active=False)

    @event_source(Challenge, queryset=lambda: Challenge.objects.filter(is_active=True))
    def active(challenge: Challenge) -> Iterator[Event[dict[str, int]]]:
        yield event("active", challenge.pk, {"n": challenge.pk})

    call_command("process_spark_sources", "--enqueue", "--chunk-size", "2", verbosity=0)
    chunks = enqueued(dummy, CHUNK_PATH)
    assert [(c.kwargs["after"], c.kwargs["upto"]) for c in chunks] == [
        (None, challenges[21]),
        (challenges[21], None),
    ]
    assert sum(run(chunk)["rows"] for chunk in chunks) == 3
    assert sorted(EventRecord.objects.values_list("key", flat=True)) == sorted(
        f"active_{pk}" for pk in challenges[20:]
    )


def test_a_chunk_whose_sources_are_not_registered_fails_clearly(challenges: list[int]) -> None:
    with pytest.raises(Exception, match=r"are not registered \(together\) in this process"):
        run_chunk("testapp.Challenge", ["elsewhere.source"], after=None, upto=None)


def test_a_chunk_with_failing_sources_processes_the_rest_then_fails(
    isolated_registry: Registry, challenges: list[int]
) -> None:
    isolated_registry.clear()

    @event_source(Challenge)
    def picky(challenge: Challenge) -> Iterator[Event[dict[str, int]]]:
        if challenge.pk == challenges[3]:
            raise ValueError("not this one")
        yield event("picky", challenge.pk, {})

    name = function_name(picky)
    with pytest.raises(
        SourceErrors, match=rf"1 instance\(s\) skipped.*pk={challenges[3]}: not this one"
    ):
        run_chunk("testapp.Challenge", [name], after=None, upto=challenges[9])
    assert EventRecord.objects.count() == 9


@pytest.mark.django_db
def test_enqueue_refuses_dry_run() -> None:
    with pytest.raises(CommandError, match="--enqueue cannot be combined with --dry-run"):
        call_command("process_spark_sources", "--enqueue", "--dry-run")


@pytest.mark.django_db
def test_enqueue_without_a_usable_backend_is_a_command_error() -> None:
    with (
        override_settings(SPARK_DECL={"TASK_BACKEND": "nope"}),
        pytest.raises(CommandError, match="TASK_BACKEND'] is 'nope'"),
    ):
        call_command("process_spark_sources", "--enqueue")


# -- system checks ----------------------------------------------------------------------------


def check_ids() -> list[str]:
    return [
        message.id
        for message in run_checks()
        if message.id in ("spark_decl.E010", "spark_decl.W010")
    ]


@pytest.mark.usefixtures("welcome")
def test_e010_background_handlers_without_a_usable_backend() -> None:
    assert check_ids() == []
    with override_settings(SPARK_DECL={"TASK_BACKEND": "missing"}):
        [error] = [m for m in run_checks() if m.id == "spark_decl.E010"]
    assert (
        "1 handler(s) have background=True, e.g. tests.test_background.send_welcome" in error.msg
    )
    assert "'missing'" in error.msg


@pytest.mark.usefixtures("welcome")
def test_w010_background_handlers_on_a_dummy_backend(dummy: DummyBackend) -> None:
    [warning] = [m for m in run_checks() if m.id == "spark_decl.W010"]
    assert "never run" in warning.msg


def test_no_background_check_without_background_handlers(isolated_registry: Registry) -> None:
    with override_settings(SPARK_DECL={"TASK_BACKEND": "missing"}):
        assert check_ids() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("welcome")
def test_a_claim_made_while_handlers_are_suppressed_is_enqueued_at_its_commit() -> None:
    from spark_decl.testing import capture_events

    with override_settings(TASKS=DATABASE), transaction.atomic():
        with capture_events(run_handlers=False):
            challenge = Challenge.objects.create(title="Outlived the capture")
        # Handlers off when claimed: not enqueued with the claim...
        assert not DBTaskResult.objects.exists()
    # ...but they are on when it commits, so it is enqueued then.
    [task] = DBTaskResult.objects.all()
    assert task.args_kwargs["kwargs"]["key"] == f"challenge_created_{challenge.pk}"
