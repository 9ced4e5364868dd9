"""``manage.py retry_spark_events``: failed calls, backoff, giving up, abandoned claims."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from pytest_django import Settings

from spark_decl import Event, event, handles, only_new_events
from spark_decl.claims import claim_events
from spark_decl.models import HandlerOutcome
from spark_decl.registry import Registry, function_name
from spark_decl.retry import due_outcomes, retry_outcomes
from spark_decl.signals import event_dispatched
from spark_decl.validation import validate_event
from tests.conftest import CHALLENGE_HANDLER, logged_keys
from tests.testapp.models import Challenge, HandlerLog
from tests.testapp.spark import ChallengeContext


class Boom(Exception):
    pass


@dataclass
class Flaky:
    """A registered ``^challenge_created$`` handler that raises while ``broken`` is set."""

    name: str
    broken: bool = True
    calls: list[Challenge] = field(default_factory=list)


@pytest.fixture
def flaky(isolated_registry: Registry) -> Flaky:
    state = Flaky(name="")

    @handles(r"^challenge_created$")
    def flaky_handler(event: Event[ChallengeContext]) -> None:
        state.calls.append(event["context"]["challenge"])
        HandlerLog.objects.create(handler="flaky", key=event["key"])
        if state.broken:
            raise Boom("still broken")

    state.name = function_name(flaky_handler)
    return state


def retry(*args: str) -> str:
    out = StringIO()
    call_command("retry_spark_events", *args, stdout=out)
    return out.getvalue()


def outcome_of(name: str) -> HandlerOutcome:
    return HandlerOutcome.objects.get(handler=name)


@pytest.mark.django_db(transaction=True)
def test_retry_reruns_only_the_failed_handler(flaky: Flaky) -> None:
    challenge = Challenge.objects.create(title="x")
    key = f"challenge_created_{challenge.pk}"
    assert outcome_of(flaky.name).status == HandlerOutcome.Status.FAILED
    assert logged_keys() == [key]

    flaky.broken = False
    output = retry()
    assert output.startswith("1 due, 1 succeeded, 0 failed")
    outcome = outcome_of(flaky.name)
    assert (outcome.status, outcome.attempts) == (HandlerOutcome.Status.DONE, 2)
    assert outcome.next_attempt_at is None
    assert outcome.finished_at is not None
    assert logged_keys("flaky") == [key]
    # The handler that had succeeded did not run again.
    assert logged_keys() == [key]
    assert outcome_of(CHALLENGE_HANDLER).attempts == 1

    assert retry("--all", "--stale-after", "0").startswith("0 due")
    assert len(flaky.calls) == 2


@pytest.mark.django_db(transaction=True)
def test_retry_does_not_send_event_dispatched(flaky: Flaky) -> None:
    Challenge.objects.create(title="x")
    dispatched: list[Any] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        dispatched.append(kwargs["event"])

    event_dispatched.connect(receiver)
    try:
        flaky.broken = False
        retry()
    finally:
        event_dispatched.disconnect(receiver)
    assert outcome_of(flaky.name).status == HandlerOutcome.Status.DONE
    assert dispatched == []


@pytest.mark.django_db(transaction=True)
def test_later_retries_wait_a_doubling_backoff_then_give_up(
    flaky: Flaky, settings: Settings
) -> None:
    settings.SPARK_DECL = {"MAX_ATTEMPTS": 4, "BACKOFF_SECONDS": 30, "BACKOFF_MAX_SECONDS": 45}
    Challenge.objects.create(title="x")
    assert outcome_of(flaky.name).attempts == 1

    # Attempt 2: due at once, fails, then waits BACKOFF_SECONDS.
    before = timezone.now()
    assert retry().startswith("1 due, 0 succeeded, 1 failed")
    outcome = outcome_of(flaky.name)
    assert (outcome.status, outcome.attempts) == (HandlerOutcome.Status.FAILED, 2)
    assert outcome.next_attempt_at is not None
    assert (
        before + dt.timedelta(seconds=30)
        <= outcome.next_attempt_at
        <= timezone.now() + dt.timedelta(seconds=30)
    )
    assert retry().startswith("0 due")
    assert outcome_of(flaky.name).attempts == 2

    # --all ignores the schedule. Attempt 3 waits twice as long, capped at 45 seconds.
    before = timezone.now()
    assert retry("--all").startswith("1 due, 0 succeeded, 1 failed")
    outcome = outcome_of(flaky.name)
    assert outcome.attempts == 3
    assert outcome.next_attempt_at is not None
    assert (
        before + dt.timedelta(seconds=45)
        <= outcome.next_attempt_at
        <= timezone.now() + dt.timedelta(seconds=45)
    )

    # Attempt 4 is the last one.
    assert retry("--all").startswith("1 due, 0 succeeded, 1 failed")
    outcome = outcome_of(flaky.name)
    assert (outcome.status, outcome.attempts) == (HandlerOutcome.Status.GIVEN_UP, 4)
    assert outcome.next_attempt_at is None
    assert outcome.last_error == "Boom: still broken"

    flaky.broken = False
    assert retry("--all", "--stale-after", "0").startswith("0 due")
    assert len(flaky.calls) == 4
    assert logged_keys("flaky") == []


@pytest.mark.django_db(transaction=True)
def test_a_failed_call_becomes_due_when_its_backoff_has_passed(
    flaky: Flaky, settings: Settings
) -> None:
    settings.SPARK_DECL = {"BACKOFF_SECONDS": 600}
    Challenge.objects.create(title="x")
    retry()
    assert retry().startswith("0 due")
    HandlerOutcome.objects.filter(handler=flaky.name).update(
        next_attempt_at=timezone.now() - dt.timedelta(seconds=1)
    )
    flaky.broken = False
    assert retry().startswith("1 due, 1 succeeded")
    assert outcome_of(flaky.name).status == HandlerOutcome.Status.DONE


@pytest.mark.django_db(transaction=True)
def test_retry_rebuilds_the_context_from_storage(flaky: Flaky) -> None:
    challenge = Challenge.objects.create(title="before")
    Challenge.objects.filter(pk=challenge.pk).update(title="after")
    flaky.broken = False
    retry()
    first, second = flaky.calls
    assert first is challenge
    assert second is not challenge
    assert isinstance(second, Challenge)
    assert second.pk == challenge.pk
    assert second.title == "after"


@pytest.mark.django_db(transaction=True)
def test_a_deleted_instance_is_a_recorded_failure(
    flaky: Flaky, caplog: pytest.LogCaptureFixture
) -> None:
    challenge = Challenge.objects.create(title="x")
    pk = challenge.pk
    challenge.delete()
    flaky.broken = False
    with caplog.at_level(logging.ERROR, logger="spark_decl"):
        assert retry().startswith("1 due, 0 succeeded, 1 failed")
    outcome = outcome_of(flaky.name)
    assert (outcome.status, outcome.attempts) == (HandlerOutcome.Status.FAILED, 2)
    assert outcome.last_error == f"ContextUnavailable: Challenge with pk={pk!r} no longer exists."
    assert "ContextUnavailable" in outcome.traceback
    assert len(flaky.calls) == 1
    assert any(f"pk={pk!r} no longer exists" in r.getMessage() for r in caplog.records)


# -- abandoned claims (a process died between claiming and handling) -------------------


@pytest.fixture
def recorder(isolated_registry: Registry) -> list[str]:
    calls: list[str] = []

    @handles(r"^challenge_created$")
    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    return calls


@pytest.mark.django_db(transaction=True)
def test_stale_after_finishes_claims_whose_handlers_never_ran(recorder: list[str]) -> None:
    claim_events([validate_event(event("challenge_created", n)) for n in (1, 2)])
    assert HandlerOutcome.objects.filter(status="pending").count() == 4
    assert retry().startswith("0 due")
    assert recorder == []

    output = retry("--stale-after", "0")
    assert output.startswith("4 due, 4 succeeded, 0 failed")
    assert recorder == ["challenge_created_1", "challenge_created_2"]
    assert logged_keys() == ["challenge_created_1", "challenge_created_2"]
    assert set(HandlerOutcome.objects.values_list("status", flat=True)) == {"done"}
    assert retry("--stale-after", "0").startswith("0 due")


@pytest.mark.django_db(transaction=True)
def test_an_abandoned_only_new_events_iteration_is_finished_by_retry(
    recorder: list[str],
) -> None:
    claimed = only_new_events([event("challenge_created", 1)])
    assert next(claimed)["key"] == "challenge_created_1"
    # The caller never dispatched; the next claim of the key yields nothing.
    assert list(only_new_events([event("challenge_created", 1)])) == []
    retry("--stale-after", "0")
    assert recorder == ["challenge_created_1"]


@pytest.mark.django_db(transaction=True)
def test_stale_after_respects_the_age_of_the_claim(recorder: list[str]) -> None:
    claim_events([validate_event(event("challenge_created", 1))])
    HandlerOutcome.objects.update(created_at=timezone.now() - dt.timedelta(seconds=120))
    assert retry("--stale-after", "300").startswith("0 due")
    assert retry("--stale-after", "60").startswith("2 due, 2 succeeded")
    assert recorder == ["challenge_created_1"]


@pytest.mark.django_db(transaction=True)
def test_a_call_is_never_run_twice_by_concurrent_retries(recorder: list[str]) -> None:
    claim_events([validate_event(event("challenge_created", 1))])
    seen_by_a_slow_worker = list(due_outcomes(stale_after=0))
    assert len(seen_by_a_slow_worker) == 2
    retry("--stale-after", "0")
    result = retry_outcomes(seen_by_a_slow_worker)
    assert (result.due, result.skipped, result.succeeded) == (2, 2, 0)
    assert recorder == ["challenge_created_1"]
    assert logged_keys() == ["challenge_created_1"]


@pytest.mark.django_db(transaction=True)
def test_an_unregistered_handler_is_reported_not_imported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    claim_events([validate_event(event("challenge_created", 1))])
    HandlerOutcome.objects.update(handler="os.system")
    with caplog.at_level(logging.WARNING, logger="spark_decl"):
        output = retry("--stale-after", "0")
    assert output.endswith("1 with no registered handler\n")
    assert HandlerOutcome.objects.get().status == HandlerOutcome.Status.PENDING
    assert any("os.system" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_a_negative_stale_after_is_an_error() -> None:
    with pytest.raises(CommandError, match="stale-after"):
        call_command("retry_spark_events", "--stale-after", "-1")
