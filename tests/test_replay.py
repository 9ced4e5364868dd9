"""``retry_spark_events --replay-to HANDLER --group REGEX``: old events to a new handler."""

from __future__ import annotations

import logging
import re
from collections import Counter
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from pytest_django import Settings

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.claims import claim_events
from spark_decl.dispatch import claim_and_run
from spark_decl.exceptions import InvalidPattern, UnknownHandler
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry, function_name
from spark_decl.retry import replay_events
from spark_decl.signals import handler_failed
from spark_decl.testing import capture_events
from spark_decl.validation import validate_event
from tests.conftest import CHALLENGE_HANDLER, logged_keys
from tests.test_retry import run_workers
from tests.testapp.models import Challenge, HandlerLog


def replay(*args: str) -> str:
    out = StringIO()
    call_command("retry_spark_events", *args, stdout=out)
    return out.getvalue()


def claim(*events: Event[Any]) -> None:
    """Claim ``events`` and run their handlers, as a save or the batch would."""
    process_events(only_new_events(events))


class Late:
    """A handler registered after events were claimed; records what it received."""

    def __init__(self) -> None:
        self.received: list[Event[Any]] = []
        self.broken = False
        self.name = ""


@pytest.fixture
def late(isolated_registry: Registry) -> Late:
    """Claims challenge_created_1, challenge_ended_2 and donation_received_3 (with the
    test app's handlers), then registers a ``^challenge_`` handler."""
    claim(
        event("challenge_created", 1, {"n": 1}),
        event("challenge_ended", 2, {"n": 2}),
        event("donation_received", 3, {"n": 3}),
    )
    state = Late()

    @handles(r"^challenge_")
    def late_handler(event: Event[Any]) -> None:
        state.received.append(event)
        HandlerLog.objects.create(handler="late", key=event["key"])
        if state.broken:
            raise RuntimeError(f"late broke on {event['key']}")

    state.name = function_name(late_handler)
    return state


@pytest.mark.django_db(transaction=True)
def test_a_handler_added_later_does_not_receive_old_events(late: Late) -> None:
    assert replay("--all", "--stale-after", "0").startswith("0 due")
    claim(event("challenge_created", 1), event("challenge_created", 4))
    assert [e["key"] for e in late.received] == ["challenge_created_4"]
    assert not HandlerOutcome.objects.filter(
        handler=late.name, record__key__in=["challenge_created_1", "challenge_ended_2"]
    ).exists()


@pytest.mark.django_db(transaction=True)
def test_replay_sends_matching_old_events_to_the_handler_once(late: Late) -> None:
    output = replay("--replay-to", late.name, "--group", "^challenge")
    assert output.splitlines()[0] == (
        f"2 events replayed to {late.name}: 2 succeeded, 0 failed, 0 skipped (done elsewhere)"
    )
    assert "Groups: challenge_created, challenge_ended" in output
    assert sorted(e["key"] for e in late.received) == ["challenge_created_1", "challenge_ended_2"]
    # The stored context, rebuilt.
    assert sorted(e["context"]["n"] for e in late.received) == [1, 2]
    outcomes = HandlerOutcome.objects.filter(handler=late.name)
    assert sorted(outcomes.values_list("record__key", "status", "attempts")) == [
        ("challenge_created_1", "done", 1),
        ("challenge_ended_2", "done", 1),
    ]
    # The handlers that had run did not run again; nothing was claimed twice.
    assert logged_keys() == ["challenge_created_1", "challenge_ended_2"]
    assert EventRecord.objects.count() == 3

    # Idempotent: a second replay creates and runs nothing.
    again = replay("--replay-to", late.name, "--group", "^challenge")
    assert again.startswith(f"0 events replayed to {late.name}: 0 succeeded")
    assert len(late.received) == 2
    assert HandlerOutcome.objects.filter(handler=late.name).count() == 2


@pytest.mark.django_db(transaction=True)
def test_replay_skips_events_the_handler_already_has(late: Late) -> None:
    claim(event("challenge_created", 5))
    assert [e["key"] for e in late.received] == ["challenge_created_5"]
    result = replay_events(late.name, group="created")
    assert (result.created, result.run.succeeded) == (1, 1)
    assert [e["key"] for e in late.received] == ["challenge_created_5", "challenge_created_1"]


@pytest.mark.django_db(transaction=True)
def test_replay_skips_events_the_handler_handled_when_they_were_claimed(late: Late) -> None:
    # Run in the claiming transaction, as a save's calls are.
    claim_and_run([validate_event(event("challenge_created", 6))], using="default")
    calls_of_6 = HandlerOutcome.objects.filter(
        handler=late.name, record__key="challenge_created_6"
    )
    assert list(calls_of_6.values_list("status", flat=True)) == ["done"]
    result = replay_events(late.name, group="created")
    assert (result.created, result.run.succeeded) == (1, 1)
    assert [e["key"] for e in late.received] == ["challenge_created_6", "challenge_created_1"]
    assert list(calls_of_6.values_list("status", "attempts")) == [("done", 1)]


@pytest.mark.django_db(transaction=True)
def test_replay_uses_python_regex_semantics_on_every_database(late: Late) -> None:
    # A named group and a lookbehind: Python syntax that PostgreSQL's ~ rejects.
    result = replay_events(late.name, group=r"(?<=challenge_)(?P<what>ended)$")
    assert result.groups == ["challenge_ended"]
    assert [e["key"] for e in late.received] == ["challenge_ended_2"]


@pytest.mark.django_db(transaction=True)
def test_replay_never_sends_a_group_the_handler_is_not_registered_for(late: Late) -> None:
    output = replay("--replay-to", late.name, "--group", "_")
    assert output.startswith(f"2 events replayed to {late.name}")
    assert "Not replayed, the handler's patterns do not match them: donation_received" in output
    assert all(e["group"].startswith("challenge_") for e in late.received)

    result = replay_events(late.name, group="^donation")
    assert (result.groups, result.unrouted_groups, result.created) == (
        [],
        ["donation_received"],
        0,
    )
    assert "No stored group matches '^nothing'" in replay(
        "--replay-to", late.name, "--group", "^nothing"
    )


@pytest.mark.django_db(transaction=True)
def test_replay_works_a_chunk_at_a_time(late: Late, settings: Settings) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 2}
    claim(*(event("challenge_archived", n) for n in range(7)))
    late.received.clear()
    HandlerOutcome.objects.filter(handler=late.name).delete()
    result = replay_events(late.name, group="^challenge_")
    assert result.created == 9
    assert result.run.succeeded == 9
    assert len({e["key"] for e in late.received}) == 9
    assert replay_events(late.name, group="^challenge_").created == 0


@pytest.mark.django_db(transaction=True)
def test_a_failing_replayed_call_is_recorded_signalled_and_retried(late: Late) -> None:
    late.broken = True
    failures: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        failures.append(kwargs)

    handler_failed.connect(receiver)
    try:
        output = replay("--replay-to", late.name, "--group", "^challenge_ended$")
    finally:
        handler_failed.disconnect(receiver)
    assert output.startswith(f"1 events replayed to {late.name}: 0 succeeded, 1 failed")
    outcome = HandlerOutcome.objects.get(handler=late.name)
    assert (outcome.status, outcome.attempts) == (HandlerOutcome.Status.FAILED, 1)
    assert outcome.last_error == "RuntimeError: late broke on challenge_ended_2"
    assert logged_keys("late") == []  # its write was rolled back
    assert [(f["handler"], f["event"]["key"]) for f in failures] == [
        (late.name, "challenge_ended_2")
    ]

    # An ordinary failed call now: the next retry runs it.
    late.broken = False
    assert replay().startswith("1 due, 1 succeeded")
    assert logged_keys("late") == ["challenge_ended_2"]
    # And a replay does not create it again.
    assert replay_events(late.name, group="ended").created == 0


@pytest.mark.django_db(transaction=True)
def test_replay_does_not_send_event_dispatched(late: Late) -> None:
    with capture_events() as dispatched:
        replay_events(late.name, group="^challenge")
    assert len(late.received) == 2
    assert dispatched == []


@pytest.mark.django_db(transaction=True)
def test_replaying_an_event_whose_instance_was_deleted_is_a_recorded_failure(
    isolated_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    challenge = Challenge.objects.create(title="x")
    pk = challenge.pk
    challenge.delete()
    received: list[Event[Any]] = []

    @handles(r"^challenge_created$")
    def later(event: Event[Any]) -> None:
        received.append(event)

    with caplog.at_level(logging.ERROR, logger="spark_decl"):
        result = replay_events(function_name(later), group="created")
    assert (result.created, result.run.failed) == (1, 1)
    assert received == []
    outcome = HandlerOutcome.objects.get(handler=function_name(later))
    assert outcome.status == HandlerOutcome.Status.FAILED
    assert outcome.last_error == f"ContextUnavailable: Challenge with pk={pk!r} no longer exists."


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_replay_to_requires_a_group() -> None:
    with pytest.raises(CommandError, match="--replay-to needs --group REGEX"):
        replay("--replay-to", CHALLENGE_HANDLER)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--handler", CHALLENGE_HANDLER), "--handler"),
        (("--all",), "--all"),
        (("--include-given-up",), "--include-given-up"),
    ],
)
def test_replay_to_cannot_be_combined_with_retry_options(
    extra: tuple[str, ...], named: str
) -> None:
    with pytest.raises(CommandError, match=f"--replay-to cannot be combined with {named}"):
        replay("--replay-to", CHALLENGE_HANDLER, "--group", "x", *extra)


@pytest.mark.django_db
def test_replay_to_an_unregistered_handler_is_an_error_naming_it() -> None:
    claim_events([validate_event(event("challenge_created", 1))], handlers=False)
    with pytest.raises(CommandError, match=re.escape("--replay-to: No handler named 'os.system'")):
        replay("--replay-to", "os.system", "--group", ".")
    with pytest.raises(UnknownHandler, match=re.escape("tests.testapp.spark.nope")):
        replay_events("tests.testapp.spark.nope", group=".")
    assert not HandlerOutcome.objects.exists()


@pytest.mark.django_db
def test_replay_with_an_invalid_group_is_an_error_naming_it() -> None:
    with pytest.raises(CommandError, match=re.escape("--group: Invalid pattern '[z-a]'")):
        replay("--replay-to", CHALLENGE_HANDLER, "--group", "[z-a]")
    with pytest.raises(InvalidPattern):
        replay_events(CHALLENGE_HANDLER, group="(")


def test_the_command_help_documents_replay(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        call_command("retry_spark_events", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--replay-to HANDLER" in text
    assert "never receives old events unless you replay them" in text


# -- several replay processes at once ---------------------------------------------------------

CONCURRENT_KEYS = 150


@pytest.mark.django_db(transaction=True)
def test_concurrent_replays_send_each_event_once() -> None:
    # Claimed without owing any handler call (as --mark-only does): for every handler,
    # these are old events.
    claim_events(
        [validate_event(event("challenge_created", n)) for n in range(CONCURRENT_KEYS)],
        handlers=False,
    )
    outputs = run_workers(
        3, "retry_spark_events", "--replay-to", CHALLENGE_HANDLER, "--group", "^challenge_"
    )
    handled = Counter(logged_keys())
    assert len(handled) == CONCURRENT_KEYS
    assert set(handled.values()) == {1}
    assert HandlerOutcome.objects.count() == CONCURRENT_KEYS
    assert set(HandlerOutcome.objects.values_list("status", "attempts")) == {("done", 1)}
    succeeded = [int(out.split(" succeeded")[0].rsplit(" ", 1)[1]) for out in outputs]
    assert sum(succeeded) == CONCURRENT_KEYS
