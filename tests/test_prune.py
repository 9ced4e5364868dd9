"""``manage.py prune_spark_events``: retention that keeps once-per-key."""

from __future__ import annotations

import datetime as dt
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db.models import QuerySet
from django.utils import timezone
from pytest_django import Settings

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.claims import claim_events
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.pruning import prune_events
from spark_decl.registry import Registry, function_name
from spark_decl.validation import validate_event
from tests.conftest import logged_keys
from tests.testapp.models import Challenge


def prune(*args: str) -> str:
    out = StringIO()
    call_command("prune_spark_events", *args, stdout=out)
    return out.getvalue()


def age(records: QuerySet[EventRecord], days: float) -> None:
    records.update(created_at=timezone.now() - dt.timedelta(days=days))


def record(key: str) -> EventRecord:
    return EventRecord.objects.get(key=key)


@pytest.fixture
def history(isolated_registry: Registry) -> str:
    """Events 40 days old: done_1 (all done, after a failed first attempt), failed_2 (a
    failed call), pending_3 (a pending call), given_up_4 (a given-up call); done_5 is 5 days
    old. Each context is ``{"n": <n>}``. Returns the name of the handler that failed."""

    @handles(r"^(done|failed|given_up)$")
    def sometimes_fails(event: Event[Any]) -> None:
        if event["group"] != "done":
            raise RuntimeError(f"cannot {event['key']}")

    process_events(
        only_new_events(
            [
                event("done", 1, {"n": 1}),
                event("failed", 2, {"n": 2}),
                event("given_up", 4, {"n": 4}),
                event("done", 5, {"n": 5}),
            ]
        )
    )
    claim_events([validate_event(event("pending", 3, {"n": 3}))])
    name = function_name(sometimes_fails)
    assert HandlerOutcome.objects.filter(record__key="pending_3").count() == 0
    HandlerOutcome.objects.create(
        record=record("pending_3"), handler=name, created_at=timezone.now()
    )
    # done_1 succeeded on a retry: its row still holds the first attempt's error.
    HandlerOutcome.objects.filter(record__key="done_1").update(
        last_error="RuntimeError: first try", traceback="Traceback (most recent call last): ..."
    )
    HandlerOutcome.objects.filter(record__key="given_up_4").update(status="given_up")
    age(EventRecord.objects.exclude(key="done_5"), days=40)
    age(EventRecord.objects.filter(key="done_5"), days=5)
    return name


@pytest.mark.django_db(transaction=True)
def test_prune_clears_completed_old_events_but_keeps_their_keys(history: str) -> None:
    output = prune("--older-than", "30")
    assert output.startswith("1 events and 1 handler outcomes created before ")
    assert output.endswith(" were cleared (context, errors, tracebacks); their keys are kept.\n")
    assert output.count("\n") == 1

    done = record("done_1")
    assert done.context == {}
    assert list(done.outcomes.values_list("status", "last_error", "traceback")) == [
        ("done", "", "")
    ]
    # Everything else is untouched: unfinished calls and younger events keep their details.
    for key in ("failed_2", "pending_3", "given_up_4", "done_5"):
        assert record(key).context == {"n": int(key[-1])}, key
    assert HandlerOutcome.objects.get(record__key="failed_2").last_error == (
        "RuntimeError: cannot failed_2"
    )
    assert EventRecord.objects.count() == 5
    assert HandlerOutcome.objects.count() == 5

    # The key is still claimed: the event never fires again.
    assert list(only_new_events([event("done", 1)])) == []
    # A second run has nothing left to do.
    assert prune("--older-than", "30").startswith("0 events and 0 handler outcomes")


@pytest.mark.django_db(transaction=True)
def test_older_than_counts_days_back_from_now(history: str) -> None:
    assert prune("--older-than", "41").startswith("0 events")
    assert prune("--older-than", "0").startswith("2 events and 2 handler outcomes")
    assert record("done_5").context == {}


@pytest.mark.django_db(transaction=True)
def test_events_without_handler_calls_are_pruned() -> None:
    claim_events([validate_event(event("unrouted", 1, {"big": "x" * 1000}))])
    assert not HandlerOutcome.objects.exists()
    assert prune("--older-than", "0").startswith("1 events and 0 handler outcomes")
    assert record("unrouted_1").context == {}


@pytest.mark.django_db(transaction=True)
def test_a_saved_object_does_not_fire_again_after_pruning() -> None:
    challenge = Challenge.objects.create(title="x")
    key = f"challenge_created_{challenge.pk}"
    assert prune("--older-than", "0").startswith("1 events")
    challenge.save()
    call_command("process_spark_sources", stdout=StringIO())
    assert logged_keys() == [key]


@pytest.mark.django_db(transaction=True)
def test_dry_run_counts_and_changes_nothing(history: str) -> None:
    output = prune("--older-than", "30", "--dry-run")
    assert output.startswith("1 events and 1 handler outcomes created before ")
    assert " would be cleared " in output
    assert record("done_1").context == {"n": 1}
    assert HandlerOutcome.objects.get(record__key="done_1").last_error == "RuntimeError: first try"

    output = prune("--older-than", "30", "--dry-run", "--delete-keys")
    assert output.startswith("1 events and 1 handler outcomes created before ")
    assert " would be deleted: their keys can fire again." in output
    assert EventRecord.objects.count() == 5


@pytest.mark.django_db(transaction=True)
def test_delete_keys_deletes_completed_old_events_which_can_then_fire_again() -> None:
    challenge = Challenge.objects.create(title="x")
    key = f"challenge_created_{challenge.pk}"
    claim_events([validate_event(event("failed", 1))])  # pending: never deleted
    HandlerOutcome.objects.create(
        record=record("failed_1"), handler="x.y", status="failed", created_at=timezone.now()
    )
    age(EventRecord.objects.all(), days=10)

    output = prune("--older-than", "7", "--delete-keys")
    assert output.startswith("1 events and 1 handler outcomes created before ")
    assert output.endswith(" were deleted: their keys can fire again.\n")
    assert list(EventRecord.objects.values_list("key", flat=True)) == ["failed_1"]
    assert list(HandlerOutcome.objects.values_list("handler", flat=True)) == ["x.y"]

    # What the flag's help warns about: the event fires again.
    challenge.save()
    assert logged_keys() == [key, key]


@pytest.mark.django_db(transaction=True)
def test_delete_keys_also_deletes_events_already_cleared(history: str) -> None:
    prune("--older-than", "30")
    assert prune("--older-than", "30", "--delete-keys").startswith(
        "1 events and 1 handler outcomes"
    )
    assert not EventRecord.objects.filter(key="done_1").exists()


def test_delete_keys_help_says_the_events_can_fire_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        call_command("prune_spark_events", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--delete-keys Delete those events" in text
    assert "THOSE EVENTS CAN FIRE AGAIN" in text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("delete_keys", [False, True])
def test_pruning_works_a_chunk_at_a_time(
    isolated_registry: Registry, settings: Settings, delete_keys: bool
) -> None:
    @handles(r"^many$")
    def ok(event: Event[Any]) -> None:
        pass

    process_events(only_new_events([event("many", n, {"n": n}) for n in range(7)]))
    # 3 events per chunk: 3 chunks, the last one short.
    result = prune_events(dt.timedelta(0), delete_keys=delete_keys, chunk_size=3)
    assert (result.events, result.outcomes) == (7, 7)
    if delete_keys:
        assert not EventRecord.objects.exists()
        assert not HandlerOutcome.objects.exists()
    else:
        assert list(EventRecord.objects.values_list("context", flat=True)) == [{}] * 7
    settings.SPARK_DECL = {"CHUNK_SIZE": 2}
    assert prune_events(dt.timedelta(0)).events == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "-1"], "--older-than must be 0 or more days, got -1."),
        (["--older-than", "1.5"], "invalid int value: '1.5'"),
        (["--older-than", "soon"], "invalid int value: 'soon'"),
        ([], "the following arguments are required: --older-than"),
        (["--older-than", "99999999"], "--older-than 99999999 reaches before year 1."),
    ],
)
def test_days_must_be_a_non_negative_integer(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("prune_spark_events", *args, stdout=StringIO())
    assert message in str(excinfo.value)
