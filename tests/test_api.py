"""``spark_decl.api``: code written for django-spark's ``from spark import api`` keeps working."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

import spark_decl
from spark_decl import api
from spark_decl.models import EventRecord
from spark_decl.registry import Registry, function_name
from tests.conftest import logged_keys
from tests.testapp import spark
from tests.testapp.models import Challenge, Donation, HandlerLog


def test_api_reexports_the_functional_names() -> None:
    assert api.event is spark_decl.event
    assert api.only_new_events is spark_decl.only_new_events
    assert api.process_events is spark_decl.process_events
    assert api.Event is spark_decl.Event
    assert set(api.__all__) >= {
        "MODEL_SOURCES",
        "event",
        "only_new_events",
        "process_events",
        "register_group_handler",
        "register_model_event_source",
    }


def test_model_sources_maps_models_to_their_source_functions() -> None:
    assert list(api.MODEL_SOURCES) == [Challenge, Donation]
    assert len(api.MODEL_SOURCES) == 2
    assert [function_name(s) for s in api.MODEL_SOURCES[Challenge]] == [
        function_name(spark.events_from_challenge),
        function_name(spark.challenge_deadlines),
    ]
    assert [function_name(s) for s in api.MODEL_SOURCES[Donation]] == [
        function_name(spark.events_from_donation)
    ]
    assert Challenge in api.MODEL_SOURCES
    assert HandlerLog not in api.MODEL_SOURCES
    with pytest.raises(KeyError):
        api.MODEL_SOURCES[HandlerLog]


@pytest.mark.usefixtures("isolated_registry")
def test_model_sources_is_a_live_view_of_registrations() -> None:
    def handler_log_events(log: HandlerLog) -> Iterator[dict[str, Any]]:
        yield {"group": "log", "key": f"log_{log.pk}"}

    api.register_model_event_source(sender=HandlerLog, source=handler_log_events)
    api.register_model_event_source(sender=HandlerLog, source=handler_log_events)
    assert api.MODEL_SOURCES[HandlerLog] == [handler_log_events]
    assert list(api.MODEL_SOURCES) == [Challenge, Donation, HandlerLog]


@pytest.mark.django_db(transaction=True)
def test_functional_registration_runs_on_save(isolated_registry: Registry) -> None:
    seen: list[tuple[str, int]] = []

    def events_from_challenge(challenge: Challenge) -> Iterator[dict[str, Any]]:
        # django-spark style: plain dicts, key built by hand.
        yield {
            "group": "challenge_functional",
            "key": f"challenge_functional_{challenge.pk}",
            "context": {"challenge": challenge},
        }

    def handle(event: spark_decl.Event[Any]) -> None:
        seen.append((event["key"], event["context"]["challenge"].pk))

    api.register_model_event_source(sender=Challenge, source=events_from_challenge)
    api.register_group_handler(handler=handle, group=r"^challenge_functional")
    challenge = Challenge.objects.create(title="x")
    assert seen == [(f"challenge_functional_{challenge.pk}", challenge.pk)]
    challenge.save()
    assert len(seen) == 1


@pytest.mark.django_db(transaction=True)
def test_the_seed_readme_out_of_request_loop() -> None:
    """The loop django-spark's README gives for handling events outside requests."""
    today = timezone.localdate()
    Challenge.objects.bulk_create(
        [
            Challenge(title="new"),
            Challenge(title="ending", end_date=today + dt.timedelta(days=1)),
            Challenge(title="ended", is_active=False, end_date=today - dt.timedelta(days=1)),
        ]
    )
    challenge = Challenge.objects.get(title="new")
    Donation.objects.bulk_create([Donation(challenge=challenge), Donation(challenge=challenge)])

    for _ in range(2):  # the second run handles nothing new
        for model, sources in api.MODEL_SOURCES.items():
            # Verbatim; django-stubs' Model declares no `objects` manager.
            for instance in model.objects.all():  # type: ignore[attr-defined]
                for source in sources:
                    api.process_events(api.only_new_events(source(instance)))

    pks = {c.title: c.pk for c in Challenge.objects.all()}
    assert sorted(logged_keys()) == sorted(
        [
            f"challenge_created_{pks['new']}",
            f"challenge_created_{pks['ending']}",
            f"challenge_ends_2d_{pks['ending']}",
            f"challenge_ended_{pks['ended']}",
        ]
    )
    assert sorted(logged_keys("log_donation")) == sorted(
        f"donation_received_{pk}" for pk in Donation.objects.values_list("pk", flat=True)
    )
    assert EventRecord.objects.count() == 6
