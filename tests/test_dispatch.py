"""How handler calls are run: batched transactions, savepoints, and the query budget."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from io import StringIO
from unittest.mock import patch

import pytest
from django.core.management import call_command
from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.transaction import Atomic
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pytest_django import Settings

from spark_decl import Event, event, handles, only_new_events, process_events, process_queryset
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.testing import capture_events
from tests.conftest import (
    CHALLENGE_HANDLER,
    FailStatements,
    all_calls,
    logged_keys,
    retry_warnings,
)
from tests.testapp.models import Challenge, HandlerLog

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


def statements(context: CaptureQueriesContext, *, skip: tuple[str, ...] = ()) -> list[str]:
    """The captured SQL minus transaction control (which backends log differently) and
    statements on the tables in ``skip``; each reduced to its verb and table (a statement
    executed many times, as one ``executemany``, counts once)."""
    result = []
    for query in context.captured_queries:
        sql = re.sub(r"^\d+ times: ", "", query["sql"])
        if sql.upper().startswith(TRANSACTION_CONTROL) or any(table in sql for table in skip):
            continue
        words = sql.replace('"', "").split()
        table = (
            next(
                words[i + 1]
                for i, w in enumerate(words)
                if w.upper() in ("INTO", "UPDATE", "FROM")
            )
            if words[0].upper() != "UPDATE"
            else words[1]
        )
        result.append(f"{words[0].upper()} {table}")
    return result


def batch_statements(*, chunk_size: int, skip: tuple[str, ...]) -> list[str]:
    """What ``process_spark_sources`` over the challenges executes, as :func:`statements`
    shows it."""
    with CaptureQueriesContext(connection) as context:
        call_command(
            "process_spark_sources",
            "--model",
            "testapp.Challenge",
            "--chunk-size",
            str(chunk_size),
            stdout=StringIO(),
        )
    return statements(context, skip=skip)


@pytest.mark.django_db(transaction=True)
def test_a_save_costs_one_statement_for_one_source_and_one_handler() -> None:
    with CaptureQueriesContext(connection) as context:
        challenge = Challenge.objects.create(title="Run")
    assert statements(context) == [
        "INSERT testapp_challenge",
        # The claim, which also records the call as done (done_at_claim)...
        "INSERT spark_decl_eventrecord",
        "INSERT testapp_handlerlog",  # ...and the handler's own write; it succeeded.
    ]
    assert all_calls() == {(f"challenge_created_{challenge.pk}", CHALLENGE_HANDLER): "done"}
    with CaptureQueriesContext(connection) as context:
        challenge.save()
    # A key seen before costs one statement and claims nothing.
    assert statements(context) == ["UPDATE testapp_challenge", "INSERT spark_decl_eventrecord"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("rows", [10, 400])
def test_a_batch_chunk_costs_the_same_statements_whatever_its_size(
    rows: int, settings: Settings
) -> None:
    # A budget no run can exhaust, so the grouping below does not depend on the machine.
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 3600}
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(rows))
    executed = batch_statements(chunk_size=1000, skip=("testapp_handlerlog",))
    assert executed == [
        "SELECT testapp_challenge",
        "SELECT spark_decl_eventrecord",  # keys seen before are dropped with one read
        # The claims, each with its call as done: all succeeded, nothing more is written.
        "INSERT spark_decl_eventrecord",
    ]
    assert len(logged_keys()) == rows
    assert set(all_calls().values()) == {"done"}
    assert len(all_calls()) == rows
    assert not HandlerOutcome.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_batch_reads_seen_keys_first_only_while_chunks_turn_out_mostly_seen(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 3600}

    def batch() -> list[str]:
        return batch_statements(chunk_size=10, skip=("testapp_",))

    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(10))
    batch()
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(10, 30))
    claim = "INSERT spark_decl_eventrecord"
    assert batch() == [
        "SELECT spark_decl_eventrecord",  # the first chunk, all seen: nothing to claim
        "SELECT spark_decl_eventrecord",  # the second, read first again: all new
        claim,
        claim,  # so the third goes straight to the claim
    ]
    assert len(logged_keys()) == 30
    # A re-run finds every chunk seen, each with one read and no write.
    assert batch() == ["SELECT spark_decl_eventrecord"] * 3
    assert len(logged_keys()) == 30


@pytest.mark.django_db(transaction=True)
def test_calls_left_for_later_transactions_get_pending_rows_with_their_claims(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 0}  # a commit after every call
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(3))
    with CaptureQueriesContext(connection) as context:
        call_command("process_spark_sources", "--model", "testapp.Challenge", stdout=StringIO())
    assert statements(context, skip=("testapp_",)) == [
        "SELECT spark_decl_eventrecord",
        "INSERT spark_decl_eventrecord",
        # Before the claims commit: the first call succeeded and stays done in its claim;
        # the two calls the time budget left for later leave done_at_claim (one prepared
        # statement, executed for each) for pending rows...
        "UPDATE spark_decl_eventrecord",
        "INSERT spark_decl_handleroutcome",
        # ...each taken in a transaction of its own, like any recorded call.
        "UPDATE spark_decl_handleroutcome",
        "UPDATE spark_decl_handleroutcome",
    ]
    assert len(logged_keys()) == 3
    first, *later = Challenge.objects.order_by("pk")
    assert EventRecord.objects.get(key=f"challenge_created_{first.pk}").done_at_claim == {
        CHALLENGE_HANDLER: True
    }
    assert list(HandlerOutcome.objects.values_list("record__key", "status", "attempts")) == [
        (f"challenge_created_{challenge.pk}", "done", 1) for challenge in later
    ]
    assert set(all_calls().values()) == {"done"}


@pytest.mark.django_db(transaction=True)
def test_saves_in_one_transaction_are_claimed_and_dispatched_together_after_it_commits(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 3600}  # grouping independent of the machine
    with (
        capture_events() as dispatched,
        CaptureQueriesContext(connection) as context,
        transaction.atomic(),
    ):
        challenges = [Challenge.objects.create(title=str(i)) for i in range(30)]
        # Twice the same instance: its key is claimed once, with the first save's event.
        challenges[0].save()
        assert statements(context, skip=("testapp_",)) == []  # nothing written per save
        assert logged_keys() == []
    keys = [f"challenge_created_{c.pk}" for c in challenges]
    assert logged_keys() == keys
    assert dispatched.keys == keys
    # After the commit: one claim statement, which records the calls as done too.
    assert statements(context, skip=("testapp_",)) == ["INSERT spark_decl_eventrecord"]
    assert all_calls() == dict.fromkeys(((key, CHALLENGE_HANDLER) for key in keys), "done")


@pytest.mark.django_db(transaction=True)
def test_a_large_transactions_saves_are_claimed_a_chunk_at_a_time_after_it_commits(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 10, "TRANSACTION_SECONDS": 3600}
    with CaptureQueriesContext(connection) as context, transaction.atomic():
        challenges = [Challenge.objects.create(title=str(i)) for i in range(25)]
    assert logged_keys() == [f"challenge_created_{c.pk}" for c in challenges]
    claims = [s for s in statements(context, skip=("testapp_",)) if "eventrecord" in s]
    assert claims == ["INSERT spark_decl_eventrecord"] * 3


@pytest.mark.django_db(transaction=True)
def test_saves_each_followed_by_an_on_commit_callback_still_share_one_claim() -> None:
    notified: list[int] = []
    with CaptureQueriesContext(connection) as context, transaction.atomic():
        for i in range(20):
            challenge = Challenge.objects.create(title=str(i))
            transaction.on_commit(partial(notified.append, challenge.pk))
    pks = list(Challenge.objects.order_by("pk").values_list("pk", flat=True))
    assert notified == pks
    assert logged_keys() == [f"challenge_created_{pk}" for pk in pks]
    claims = statements(context, skip=("testapp_",)).count("INSERT spark_decl_eventrecord")
    assert claims == 1


@pytest.mark.django_db(transaction=True)
def test_savepoints_around_saves_keep_their_meaning_and_released_ones_merge() -> None:
    with (
        capture_events() as dispatched,
        CaptureQueriesContext(connection) as context,
        transaction.atomic(),
    ):
        kept = [Challenge.objects.create(title="before")]
        with suppress(RuntimeError), transaction.atomic():
            Challenge.objects.create(title="rolled back")
            raise RuntimeError
        # update_or_create() saves inside a savepoint of its own, each one released.
        for i in range(20):
            kept.append(Challenge.objects.update_or_create(title=f"upserted {i}")[0])
        with transaction.atomic():
            kept.append(Challenge.objects.create(title="in a released savepoint"))
            with suppress(RuntimeError), transaction.atomic():
                Challenge.objects.create(title="rolled back, nested")
                raise RuntimeError
        kept.append(Challenge.objects.create(title="after"))
    assert logged_keys() == [f"challenge_created_{c.pk}" for c in kept]
    # (On SQLite "upserted 0" gets the rolled-back row's id, so its key too: the event
    # dispatched for that key must be its own.)
    assert [e["context"]["challenge"].title for e in dispatched] == [c.title for c in kept]
    assert EventRecord.objects.count() == len(kept)
    # The released savepoints' events were merged: a claim or two, not one per save.
    claims = statements(context, skip=("testapp_",)).count("INSERT spark_decl_eventrecord")
    assert claims <= 2, claims


@pytest.mark.django_db(transaction=True)
def test_a_claim_rolled_back_in_a_savepoint_is_not_dispatched_even_if_its_id_is_reused() -> None:
    def claim(challenge: Challenge) -> None:
        process_events(only_new_events([event("challenge_created", challenge.pk)]))

    with transaction.atomic():
        kept_before = Challenge.objects.create(title="before", is_active=False)
        claim(kept_before)
        try:
            with transaction.atomic():
                rolled_back = Challenge.objects.create(title="rolled back", is_active=False)
                claim(rolled_back)
                rolled_back_record = EventRecord.objects.get(key__endswith=f"_{rolled_back.pk}")
                raise RuntimeError
        except RuntimeError:
            pass
        kept_after = Challenge.objects.create(title="after", is_active=False)
        claim(kept_after)
        reused = EventRecord.objects.get(key=f"challenge_created_{kept_after.pk}")
    if connection.vendor == "sqlite":
        # SQLite hands the rolled-back row id out again: the case the check exists for.
        assert reused.pk == rolled_back_record.pk
    assert logged_keys() == [
        f"challenge_created_{kept_before.pk}",
        f"challenge_created_{kept_after.pk}",
    ]
    assert HandlerOutcome.objects.filter(status="done").count() == 2


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
def test_a_dispatch_failing_after_commit_is_logged_and_the_commit_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    challenge = Challenge.objects.create(title="Claimed inside", is_active=False)
    with (
        patch("spark_decl.dispatch.dispatch", side_effect=RuntimeError("database gone")),
        transaction.atomic(),
    ):
        process_events(only_new_events([event("challenge_created", challenge.pk)]))
    # The commit went through: the claim is there, its call pending for the retry.
    assert HandlerOutcome.objects.get().status == "pending"
    [record] = [r for r in caplog.records if r.name == "spark_decl"]
    assert "retry_spark_events --stale-after" in record.getMessage()
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "database gone"


# -- claims the database aborted (deadlock, serialization failure) -----------------------------
#
# On PostgreSQL a claim can be the victim of a deadlock or of a serialization failure. In a
# transaction of spark_decl's own, before any handler ran, the claim is simply made again.
# The failures are injected here (tests/conftest.py: FailStatements), so that each path runs
# on SQLite too; tests/test_concurrency.py makes a real deadlock on PostgreSQL.


@pytest.mark.django_db(transaction=True)
def test_a_save_in_autocommit_mode_is_claimed_again_after_a_deadlock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = FailStatements()
    with connection.execute_wrapper(failing):
        challenge = Challenge.objects.create(title="Run")
    key = f"challenge_created_{challenge.pk}"
    assert failing.seen == 2
    assert logged_keys() == [key]
    assert all_calls() == {(key, CHALLENGE_HANDLER): "done"}
    [warning] = retry_warnings(caplog)
    assert key in warning


@pytest.mark.django_db(transaction=True)
def test_the_saves_of_a_committed_transaction_are_claimed_again_after_a_deadlock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = FailStatements()
    with connection.execute_wrapper(failing):
        with transaction.atomic():
            first = Challenge.objects.create(title="first")
            second = Challenge.objects.create(title="second")
        assert failing.seen == 2
    keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]
    assert logged_keys() == keys
    assert set(all_calls().values()) == {"done"}
    assert len(retry_warnings(caplog)) == 1
    assert "Could not claim" not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_batch_chunk_is_claimed_again_after_a_serialization_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    Challenge.objects.bulk_create(Challenge(title=str(n)) for n in range(3))
    failing = FailStatements(sqlstate="40001")
    with connection.execute_wrapper(failing):
        result = process_queryset(Challenge.objects.all())
    assert (result.new, result.dispatch.calls, result.dispatch.failed) == (3, 3, 0)
    assert failing.seen == 2
    assert sorted(logged_keys()) == sorted(
        f"challenge_created_{pk}" for pk in Challenge.objects.values_list("pk", flat=True)
    )
    assert "40001" in retry_warnings(caplog)[0]


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
    failing = FailStatements('UPDATE "spark_decl_eventrecord"', times=100)
    with pytest.raises(OperationalError), connection.execute_wrapper(failing):
        Challenge.objects.create(title="Run")
    assert failing.seen == 1
    assert ran == [f"challenge_created_{Challenge.objects.get().pk}"]
    assert logged_keys() == []
    assert not EventRecord.objects.exists()
