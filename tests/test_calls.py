"""spark_decl.calls: each handler call atomic and isolated, many calls per transaction."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.transaction import Atomic
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pytest_django import Settings

from spark_decl import Event, handles
from spark_decl.models import EventRecord, HandlerOutcome
from tests.conftest import FailStatements, all_calls, logged_keys
from tests.testapp.models import Challenge, HandlerLog


@pytest.fixture
def recorder(isolated_registry: object) -> Callable[[Callable[[Event[object]], None]], None]:
    def register(function: Callable[[Event[object]], None]) -> None:
        handles(r"^challenge_created$")(function)

    return register


@pytest.mark.django_db(transaction=True)
def test_on_commit_callbacks_of_a_failing_handler_are_dropped(
    recorder: Callable[[Callable[[Event[object]], None]], None],
) -> None:
    ran: list[str] = []

    def schedules_then_fails(event: Event[object]) -> None:
        transaction.on_commit(lambda: ran.append("failing"))
        raise RuntimeError("boom")

    def schedules(event: Event[object]) -> None:
        transaction.on_commit(lambda: ran.append("succeeding"))

    recorder(schedules_then_fails)
    recorder(schedules)
    Challenge.objects.create(title="Run")
    assert ran == ["succeeding"]


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_swallows_a_database_error_fails_and_keeps_no_writes(
    recorder: Callable[[Callable[[Event[object]], None]], None],
) -> None:
    def swallows(event: Event[object]) -> None:
        HandlerLog.objects.create(handler="swallows", key=event["key"])
        try:
            with transaction.atomic(savepoint=False):
                EventRecord.objects.create(
                    key=event["key"], group="dup", created_at=timezone.now()
                )
        except IntegrityError:
            pass

    recorder(swallows)
    Challenge.objects.create(title="Run")
    outcome = HandlerOutcome.objects.get(handler__endswith="swallows")
    assert outcome.status == HandlerOutcome.Status.FAILED
    assert "marked for rollback" in outcome.last_error
    assert not HandlerLog.objects.filter(handler="swallows").exists()
    assert logged_keys() != []  # the other handler (testapp's) was not affected


@pytest.mark.django_db(transaction=True)
def test_nested_atomic_blocks_inside_handlers_work(
    recorder: Callable[[Callable[[Event[object]], None]], None],
) -> None:
    def nested(event: Event[object]) -> None:
        with transaction.atomic():
            HandlerLog.objects.create(handler="outer", key=event["key"])
            try:
                with transaction.atomic():
                    HandlerLog.objects.create(handler="inner", key=event["key"])
                    raise RuntimeError
            except RuntimeError:
                pass

    recorder(nested)
    Challenge.objects.create(title="Run")
    assert list(
        HandlerLog.objects.exclude(handler="log_challenge_event").values_list("handler", flat=True)
    ) == ["outer"]
    assert list(all_calls().values()) == ["done", "done"]


@pytest.mark.django_db(transaction=True)
def test_calls_commit_once_the_transaction_budget_is_spent(
    recorder: Callable[[Callable[[Event[object]], None]], None],
    settings: object,
) -> None:
    transactions: list[Atomic] = []

    def remember_transaction(event: Event[object]) -> None:
        transactions.append(connection.atomic_blocks[0])

    recorder(remember_transaction)
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(5))
    setattr(settings, "SPARK_DECL", {"TRANSACTION_SECONDS": 0})  # noqa: B010
    call_command("process_spark_sources", stdout=StringIO())
    assert len({id(block) for block in transactions}) == 5

    transactions.clear()
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(5))
    setattr(settings, "SPARK_DECL", {"TRANSACTION_SECONDS": 60})  # noqa: B010
    call_command("process_spark_sources", stdout=StringIO())
    assert len(transactions) == 5
    assert len({id(block) for block in transactions}) == 1


@pytest.mark.django_db(transaction=True)
def test_calls_the_time_budget_leaves_for_later_get_pending_rows_with_their_claims(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 0}  # a commit after every call
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(3))
    with CaptureQueriesContext(connection) as context:
        call_command("process_spark_sources", "--model", "testapp.Challenge", stdout=StringIO())
    assert len(logged_keys()) == 3
    # The first call ran in the claiming transaction, its row written done; the two others
    # got pending rows there, each then taken in a transaction of its own.
    takes = [q for q in context.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(takes) == 2
    assert sorted(HandlerOutcome.objects.values_list("status", "attempts")) == [("done", 1)] * 3
    assert set(all_calls().values()) == {"done"}


@pytest.mark.django_db(transaction=True)
def test_a_claiming_transaction_failing_after_a_handler_ran_is_not_run_again(
    recorder: Callable[[Callable[[Event[object]], None]], None],
) -> None:
    """Running the transaction again would call its handlers again: a mail sent twice.
    The failure is the save's (autocommit mode), as any database error after the claim;
    the handlers' writes and the claim roll back, and the next batch makes the event."""
    ran: list[str] = []

    def fails(event: Event[object]) -> None:
        ran.append(event["key"])
        raise RuntimeError("boom")

    recorder(fails)
    # A failed call is recorded in the claiming transaction, after the handlers ran.
    failing = FailStatements('INSERT INTO "spark_decl_handleroutcome"', times=100)
    with pytest.raises(OperationalError), connection.execute_wrapper(failing):
        Challenge.objects.create(title="Run")
    assert failing.seen == 1
    assert ran == [f"challenge_created_{Challenge.objects.get().pk}"]
    assert logged_keys() == []
    assert not EventRecord.objects.exists()
