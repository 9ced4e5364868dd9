"""spark_decl.dispatch: claiming and running a save's or a chunk's events, process_events,
and running the calls of a transaction's claims once it commits."""

from __future__ import annotations

import re
from contextlib import suppress
from functools import partial
from io import StringIO
from unittest.mock import patch

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from pytest_django import Settings

from spark_decl import event, only_new_events, process_events, process_queryset
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from spark_decl.testing import capture_events
from tests.conftest import (
    CHALLENGE_HANDLER,
    FailStatements,
    all_calls,
    logged_keys,
    retry_warnings,
)
from tests.testapp.models import Challenge

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


def spark_statements(context: CaptureQueriesContext, start: int = 0) -> list[str]:
    """The statements on spark_decl's tables captured (from the ``start``-th on), each as
    its verb and table; transaction control aside."""
    found = []
    for query in context.captured_queries[start:]:
        sql = re.sub(r"^\d+ times: ", "", query["sql"]).replace('"', "")
        if sql.upper().startswith(TRANSACTION_CONTROL) or "spark_decl_" not in sql:
            continue
        table = re.search(r"(spark_decl_\w+)", sql)
        assert table is not None
        found.append(f"{sql.split()[0].upper()} {table.group(1)}")
    return found


# -- query budgets --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_save_in_autocommit_mode_costs_its_claim_and_its_calls_rows() -> None:
    with CaptureQueriesContext(connection) as context:
        challenge = Challenge.objects.create(title="Run")
    # The claim, then the call's row, written once with its result.
    assert len(spark_statements(context)) == 2
    assert all_calls() == {(f"challenge_created_{challenge.pk}", CHALLENGE_HANDLER): "done"}
    with CaptureQueriesContext(connection) as context:
        challenge.save()
    # A key seen before costs one statement and claims nothing.
    assert len(spark_statements(context)) == 1
    assert len(all_calls()) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("rows", [10, 400])
def test_a_batch_chunk_costs_the_same_statements_whatever_its_size(
    rows: int, settings: Settings
) -> None:
    # A budget no run can exhaust, so the statements do not depend on the machine.
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 3600}
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(rows))
    with CaptureQueriesContext(connection) as context:
        call_command("process_spark_sources", "--model", "testapp.Challenge", stdout=StringIO())
    # The seen keys read, the claims, and the calls' rows with their results.
    assert len(spark_statements(context)) == 3
    assert len(logged_keys()) == rows
    assert set(all_calls().values()) == {"done"}
    assert len(all_calls()) == rows


@pytest.mark.django_db(transaction=True)
def test_the_batch_reads_seen_keys_first_only_while_chunks_turn_out_mostly_seen(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 3600}

    def batch() -> list[str]:
        with CaptureQueriesContext(connection) as context:
            call_command(
                "process_spark_sources",
                "--model",
                "testapp.Challenge",
                "--chunk-size",
                "10",
                stdout=StringIO(),
            )
        return [s for s in spark_statements(context) if "eventrecord" in s]

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


# -- a transaction's saves: claimed in it, handled once it commits ------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_transactions_saves_go_to_the_outbox_and_are_claimed_together_after_it_commits(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"TRANSACTION_SECONDS": 3600}  # batches independent of the machine
    with (
        capture_events() as dispatched,
        CaptureQueriesContext(connection) as context,
        transaction.atomic(),
    ):
        challenges = [Challenge.objects.create(title=str(i)) for i in range(30)]
        # The same instance again: its key is claimed once, with the first save's event.
        challenges[0].save()
        keys = [f"challenge_created_{c.pk}" for c in challenges]
        # One statement per save, through the driver's cursor (not logged with Django's
        # queries): its events written to the outbox, in its transaction.
        assert spark_statements(context) == []
        assert OutboxEvent.objects.count() == 31
        assert logged_keys() == []
        committing = len(context.captured_queries)
    assert logged_keys() == keys
    assert dispatched.keys == keys
    assert all_calls() == dict.fromkeys(((key, CHALLENGE_HANDLER) for key in keys), "done")
    assert not OutboxEvent.objects.exists()
    # After the commit, all together, as a batch chunk: the outbox rows taken, the claims,
    # and the calls' rows with their results.
    assert spark_statements(context, committing) == [
        "DELETE spark_decl_outboxevent",
        "INSERT spark_decl_eventrecord",
        "INSERT spark_decl_handleroutcome",
    ]


@pytest.mark.django_db(transaction=True)
def test_saves_each_followed_by_an_on_commit_callback_are_still_run_together() -> None:
    notified: list[int] = []
    with CaptureQueriesContext(connection) as context, transaction.atomic():
        for i in range(20):
            challenge = Challenge.objects.create(title=str(i))
            transaction.on_commit(partial(notified.append, challenge.pk))
    pks = list(Challenge.objects.order_by("pk").values_list("pk", flat=True))
    assert notified == pks
    assert logged_keys() == [f"challenge_created_{pk}" for pk in pks]
    claims = spark_statements(context).count("INSERT spark_decl_eventrecord")
    assert claims == 1


@pytest.mark.django_db(transaction=True)
def test_savepoints_around_saves_keep_their_meaning() -> None:
    with capture_events() as dispatched, transaction.atomic():
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


@pytest.mark.django_db(transaction=True)
def test_a_claim_rolled_back_in_a_savepoint_is_not_dispatched_even_if_its_id_is_reused() -> None:
    def claim(challenge: Challenge) -> None:
        process_events(only_new_events([event("challenge_created", challenge.pk)]))

    with capture_events() as dispatched, transaction.atomic():
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
    keys = [f"challenge_created_{kept_before.pk}", f"challenge_created_{kept_after.pk}"]
    assert logged_keys() == keys
    assert dispatched.keys == keys
    assert HandlerOutcome.objects.filter(status="done").count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_claim_failing_after_the_commit_is_logged_and_leaves_the_events_in_the_outbox(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        patch(
            "spark_decl.dispatch.CallRunner.run_claimed", side_effect=RuntimeError("database gone")
        ),
        transaction.atomic(),
    ):
        challenge = Challenge.objects.create(title="Saved inside")
    # The commit went through; the event waits in the outbox, for the retry.
    assert Challenge.objects.filter(pk=challenge.pk).exists()
    assert not EventRecord.objects.exists()
    assert OutboxEvent.objects.get().key == f"challenge_created_{challenge.pk}"
    [record] = [r for r in caplog.records if r.name == "spark_decl"]
    assert "retry_spark_events --stale-after" in record.getMessage()
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "database gone"

    call_command("retry_spark_events", "--stale-after", "0", stdout=StringIO())
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]
    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db
def test_a_transaction_that_never_commits_claims_and_runs_nothing() -> None:
    """A ``TestCase``: the events wait in its transaction's outbox for ever."""
    challenge = Challenge.objects.create(title="Run")
    assert OutboxEvent.objects.get().key == f"challenge_created_{challenge.pk}"
    assert not EventRecord.objects.exists()
    assert logged_keys() == []


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
    assert not OutboxEvent.objects.exists()
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
