"""Events from saves: claimed in the saving transaction, handled after it commits."""

from __future__ import annotations

import datetime as dt
import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone
from pytest_django import DjangoCaptureOnCommitCallbacks

from spark_decl import Event, handles
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from tests.conftest import CHALLENGE_HANDLER, all_calls, logged_keys
from tests.testapp.models import Challenge, Donation, HandlerLog
from tests.testapp.spark import ChallengeContext


class Boom(Exception):
    pass


@pytest.mark.django_db(transaction=True)
def test_a_save_claims_and_handles_its_events_once() -> None:
    challenge = Challenge.objects.create(title="Run")
    key = f"challenge_created_{challenge.pk}"
    assert logged_keys() == [key]
    record = EventRecord.objects.get()
    assert (record.key, record.group) == (key, "challenge_created")
    assert record.context == {
        "challenge": {"__spark__": "model", "model": "testapp.challenge", "pk": challenge.pk}
    }
    assert record.created_at <= timezone.now()
    assert record.handler_statuses() == {CHALLENGE_HANDLER: "done"}

    challenge.title = "Run again"
    challenge.save()
    Challenge.objects.get(pk=challenge.pk).save()
    assert logged_keys() == [key]
    assert EventRecord.objects.count() == 1
    assert all_calls() == {(key, CHALLENGE_HANDLER): "done"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_the_handler_gets_the_saved_instance_itself() -> None:
    seen: list[Challenge] = []

    @handles(r"^challenge_created$")
    def record(event: Event[ChallengeContext]) -> None:
        seen.append(event["context"]["challenge"])

    challenge = Challenge(title="Same object")
    challenge.save()
    assert len(seen) == 1
    assert seen[0] is challenge


@pytest.mark.django_db(transaction=True)
def test_a_save_without_events_claims_nothing() -> None:
    Challenge.objects.create(title="Inactive", is_active=False)
    assert not EventRecord.objects.exists()
    assert logged_keys() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_handlers_run_only_after_the_saving_transaction_commits() -> None:
    order: list[str] = []

    @handles(r"^challenge_created$")
    def record(event: Event[ChallengeContext]) -> None:
        order.append(f"handler {event['key']}")

    with transaction.atomic():
        challenge = Challenge.objects.create(title="In a transaction")
        key = f"challenge_created_{challenge.pk}"
        # The events are written to the outbox, in the saving transaction, and claimed at
        # its commit ...
        assert list(OutboxEvent.objects.values_list("key", flat=True)) == [key]
        assert not EventRecord.objects.exists()
        order.append("body continues")
        # ... but nothing ran yet, not even when a nested atomic block commits.
        with transaction.atomic():
            Challenge.objects.filter(pk=challenge.pk).update(title="Nested")
        assert logged_keys() == []
        order.append("body ends")
    order.append("after commit")
    assert order == ["body continues", "body ends", f"handler {key}", "after commit"]
    assert logged_keys() == [key]
    assert EventRecord.objects.get().key == key
    assert not OutboxEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_save_leaves_no_claim_and_runs_no_handler() -> None:
    challenge = Challenge.objects.create(title="Later", is_active=False)
    key = f"challenge_created_{challenge.pk}"

    def activate_then_fail() -> None:
        with transaction.atomic():
            challenge.is_active = True
            challenge.save()
            assert Challenge.objects.get(pk=challenge.pk).is_active
            raise Boom

    with pytest.raises(Boom):
        activate_then_fail()
    assert not EventRecord.objects.exists()
    assert not HandlerOutcome.objects.exists()
    assert logged_keys() == []

    # Saving again later produces the event normally.
    challenge.refresh_from_db()
    challenge.is_active = True
    challenge.save()
    assert logged_keys() == [key]
    assert EventRecord.objects.get().key == key


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_savepoint_drops_its_claims_while_the_outer_transaction_commits() -> None:
    challenge = Challenge.objects.create(title="Savepoint", is_active=False)
    key = f"challenge_created_{challenge.pk}"

    def activate_then_fail() -> None:
        with transaction.atomic():
            challenge.is_active = True
            challenge.save()
            raise Boom

    with transaction.atomic():
        Donation.objects.create(challenge=challenge)
        with pytest.raises(Boom):
            activate_then_fail()
    donation = Donation.objects.get()
    assert logged_keys("log_donation") == [f"donation_received_{donation.pk}"]
    assert logged_keys() == []
    assert not EventRecord.objects.filter(key=key).exists()

    challenge.save()
    assert logged_keys() == [key]


@pytest.mark.django_db(transaction=True)
def test_on_save_false_sources_run_only_in_the_batch_command() -> None:
    today = timezone.localdate()
    ending = Challenge.objects.create(title="Ends soon", end_date=today + dt.timedelta(days=2))
    ended = Challenge.objects.create(
        title="Ended", is_active=False, end_date=today - dt.timedelta(days=1)
    )
    assert logged_keys() == [f"challenge_created_{ending.pk}"]

    call_command("process_spark_sources", stdout=StringIO())
    assert logged_keys() == [
        f"challenge_created_{ending.pk}",
        f"challenge_ends_2d_{ending.pk}",
        f"challenge_ended_{ended.pk}",
    ]


@pytest.mark.django_db(transaction=True)
def test_fixture_loading_is_skipped_and_left_to_the_batch_command(tmp_path: Path) -> None:
    fixture = tmp_path / "challenges.json"
    fixture.write_text(
        json.dumps(
            [
                {
                    "model": "testapp.challenge",
                    "pk": 77,
                    "fields": {
                        "title": "Loaded",
                        "is_active": True,
                        "start_date": "2020-01-01",
                        "end_date": "2999-01-01",
                    },
                }
            ]
        )
    )
    call_command("loaddata", str(fixture), verbosity=0)
    assert Challenge.objects.get().pk == 77
    assert not EventRecord.objects.exists()
    assert not HandlerLog.objects.exists()

    call_command("process_spark_sources", stdout=StringIO())
    assert logged_keys() == ["challenge_created_77"]


@pytest.mark.django_db(transaction=True)
def test_bulk_create_bypasses_sources_until_the_batch_command() -> None:
    Challenge.objects.bulk_create([Challenge(title="a"), Challenge(title="b")])
    assert not EventRecord.objects.exists()
    call_command("process_spark_sources", "--model", "testapp.Challenge", stdout=StringIO())
    assert sorted(logged_keys()) == sorted(
        f"challenge_created_{pk}" for pk in Challenge.objects.values_list("pk", flat=True)
    )


@pytest.mark.django_db
def test_without_a_commit_no_handler_runs_but_capturing_on_commit_callbacks_runs_them(
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        Challenge.objects.create(title="Never committed")
    assert len(callbacks) == 1
    assert logged_keys() == []

    with django_capture_on_commit_callbacks(execute=True):
        challenge = Challenge.objects.create(title="Executed")
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]
