"""``spark_decl.signals.event_dispatched``: any app sees every dispatched event."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import transaction

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.registry import Registry, function_name
from spark_decl.signals import event_dispatched
from tests.conftest import CHALLENGE_HANDLER, logged_keys
from tests.testapp.models import Challenge


@pytest.fixture
def dispatched() -> Iterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        received.append({"sender": sender, **kwargs})

    event_dispatched.connect(receiver)
    yield received
    event_dispatched.disconnect(receiver)


@pytest.mark.django_db(transaction=True)
def test_sent_once_per_dispatched_event(dispatched: list[dict[str, Any]]) -> None:
    challenge = Challenge.objects.create(title="x")
    key = f"challenge_created_{challenge.pk}"
    assert [d["event"]["key"] for d in dispatched] == [key]
    assert dispatched[0]["event"]["context"]["challenge"] is challenge
    assert dispatched[0]["sender"] is None
    assert dispatched[0]["handlers"] == [CHALLENGE_HANDLER]

    challenge.save()
    assert len(dispatched) == 1


@pytest.mark.django_db(transaction=True)
def test_sent_for_every_event_of_process_events_even_without_handlers(
    dispatched: list[dict[str, Any]],
) -> None:
    events = [event("challenge_created", 1), event("unrouted", 2), event("challenge_created", 1)]
    process_events(events)
    assert [d["event"] for d in dispatched] == events
    assert [d["handlers"] for d in dispatched] == [[CHALLENGE_HANDLER], [], [CHALLENGE_HANDLER]]

    dispatched.clear()
    process_events(only_new_events(events))
    assert [d["event"]["key"] for d in dispatched] == ["challenge_created_1", "unrouted_2"]


@pytest.mark.django_db(transaction=True)
def test_sent_after_the_handlers_ran_and_after_commit(
    isolated_registry: Registry, dispatched: list[dict[str, Any]]
) -> None:
    order: list[str] = []

    @handles(r"^challenge_created$")
    def record(event: Event[Any]) -> None:
        order.append("handler")

    def receiver(sender: object, **kwargs: Any) -> None:
        order.append("signal")

    event_dispatched.connect(receiver)
    try:
        with transaction.atomic():
            Challenge.objects.create(title="x")
            assert dispatched == []
    finally:
        event_dispatched.disconnect(receiver)
    assert order == ["handler", "signal"]
    assert dispatched[0]["handlers"] == [CHALLENGE_HANDLER, function_name(record)]


@pytest.mark.django_db(transaction=True)
def test_sent_even_when_a_handler_failed(
    isolated_registry: Registry, dispatched: list[dict[str, Any]]
) -> None:
    @handles(r"^challenge_created$")
    def explode(event: Event[Any]) -> None:
        raise RuntimeError("boom")

    Challenge.objects.create(title="x")
    assert len(dispatched) == 1


@pytest.mark.django_db(transaction=True)
def test_a_raising_receiver_breaks_nothing(
    dispatched: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    def bad_receiver(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    event_dispatched.connect(bad_receiver)
    try:
        with caplog.at_level(logging.ERROR):
            first = Challenge.objects.create(title="a")
            second = Challenge.objects.create(title="b")
    finally:
        event_dispatched.disconnect(bad_receiver)
    keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]
    assert logged_keys() == keys
    # The receiver connected before the raising one still got both events.
    assert [d["event"]["key"] for d in dispatched] == keys
    # Logged once each, by Django's send_robust() (on django.dispatch), not again by us.
    assert not [r for r in caplog.records if r.name == "spark_decl"]
    errors = [r for r in caplog.records if r.name == "django.dispatch"]
    assert len(errors) == 2
    assert "bad_receiver" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert str(errors[0].exc_info[1]) == "receiver broke"
