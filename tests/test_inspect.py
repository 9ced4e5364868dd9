"""``manage.py spark_inspect [--json]``: what is registered, stored and connected."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db.models import QuerySet
from django.utils import timezone
from pytest_django import DjangoAssertNumQueries

from spark_decl import Event, event, event_source, handles, only_new_events, process_events
from spark_decl.dispatch import claim_and_run
from spark_decl.health import health
from spark_decl.inspection import inspect_spark
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from spark_decl.registry import Registry, function_name, registry
from spark_decl.signals import event_dispatched, handler_failed
from tests.conftest import CHALLENGE_HANDLER
from tests.testapp.models import Challenge, Donation

DONATION_HANDLER = "tests.testapp.spark.log_donation"
ZERO = {"pending": 0, "done": 0, "failed": 0, "given_up": 0}


def refuse_donations(event: Event[Any]) -> None:
    raise RuntimeError("no donations today")


def retired_handler(event: Event[Any]) -> None:
    """Registered while the first events were claimed, then gone (renamed, removed)."""


def mail_digest(event: Event[Any]) -> None:
    """Registered after the events were claimed: it never received one."""


async def notify_async(event: Event[Any]) -> None:
    pass


def active_challenges() -> QuerySet[Challenge]:
    return Challenge.objects.filter(is_active=True)


def batch_only_source(challenge: Challenge) -> Iterator[Event[Any]]:
    yield from ()


def on_dispatched(sender: object, **kwargs: object) -> None:
    pass


def on_failure(sender: object, **kwargs: object) -> None:
    pass


def only_for_challenges(sender: object, **kwargs: object) -> None:
    pass


@pytest.fixture
def stored(isolated_registry: Registry, transactional_db: None) -> Iterator[None]:
    """Real events and outcomes, made by saves and claims with the test app's spark.py plus:

    * challenge_created: 2 events, 2 done calls of the test app's handler, 1 done call of
      ``retired_handler`` (no longer registered);
    * donation_received: 1 event, 1 done call of ``log_donation``, 1 failed call of
      ``refuse_donations``;
    * orphan_group: 2 events, no handler ever matched.

    Registered afterwards: ``mail_digest`` (background, matches challenge_created),
    ``notify_async`` (matches nothing stored) and a batch-only source with a queryset.
    Receivers of both signals are connected for the test.
    """
    with registry.isolated():
        handles(r"^challenge_created$")(retired_handler)
        challenge = Challenge.objects.create(title="first")
    Challenge.objects.create(title="second")
    handles(r"^donation_")(refuse_donations)
    Donation.objects.create(challenge=challenge)
    process_events(only_new_events([event("orphan_group", 1), event("orphan_group", 2)]))

    handles(r"^challenge_created$", background=True)(mail_digest)
    handles(r"^reminder_")(notify_async)
    event_source(Challenge, on_save=False, queryset=active_challenges)(batch_only_source)
    event_dispatched.connect(on_dispatched)
    handler_failed.connect(on_failure)
    event_dispatched.connect(only_for_challenges, sender=Challenge)
    yield
    event_dispatched.disconnect(on_dispatched)
    handler_failed.disconnect(on_failure)
    event_dispatched.disconnect(only_for_challenges, sender=Challenge)


def inspect(*args: str) -> str:
    out = StringIO()
    call_command("spark_inspect", *args, stdout=out, no_color=True)
    return out.getvalue()


@pytest.mark.usefixtures("stored")
def test_json_document() -> None:
    document = json.loads(inspect("--json"))

    assert document["version"] == 1
    assert document["database"] == "default"
    assert document["sources"] == [
        {
            "model": "testapp.Challenge",
            "name": "tests.testapp.spark.events_from_challenge",
            "on_save": True,
            "queryset": None,
        },
        {
            "model": "testapp.Challenge",
            "name": "tests.testapp.spark.challenge_deadlines",
            "on_save": False,
            "queryset": None,
        },
        {
            "model": "testapp.Challenge",
            "name": "tests.test_inspect.batch_only_source",
            "on_save": False,
            "queryset": "tests.test_inspect.active_challenges",
        },
        {
            "model": "testapp.Donation",
            "name": "tests.testapp.spark.events_from_donation",
            "on_save": True,
            "queryset": None,
        },
    ]
    # In registration order: the order they run in.
    assert document["handlers"] == [
        {
            "name": CHALLENGE_HANDLER,
            "patterns": ["^challenge"],
            "background": False,
            "async": False,
            "groups": ["challenge_created"],
            "outcomes": {**ZERO, "done": 2},
        },
        {
            "name": DONATION_HANDLER,
            "patterns": ["^donation_"],
            "background": False,
            "async": False,
            "groups": ["donation_received"],
            "outcomes": {**ZERO, "done": 1},
        },
        {
            "name": "tests.test_inspect.refuse_donations",
            "patterns": ["^donation_"],
            "background": False,
            "async": False,
            "groups": ["donation_received"],
            "outcomes": {**ZERO, "failed": 1},
        },
        {
            "name": "tests.test_inspect.mail_digest",
            "patterns": ["^challenge_created$"],
            "background": True,
            "async": False,
            "groups": ["challenge_created"],
            "outcomes": ZERO,
        },
        {
            "name": "tests.test_inspect.notify_async",
            "patterns": ["^reminder_"],
            "background": False,
            "async": True,
            "groups": [],
            "outcomes": ZERO,
        },
    ]
    assert document["groups"] == [
        {
            "name": "challenge_created",
            "events": 2,
            "handlers": [CHALLENGE_HANDLER, "tests.test_inspect.mail_digest"],
        },
        {
            "name": "donation_received",
            "events": 1,
            "handlers": [DONATION_HANDLER, "tests.test_inspect.refuse_donations"],
        },
        {"name": "orphan_group", "events": 2, "handlers": []},
    ]
    assert document["unhandled_groups"] == ["orphan_group"]
    assert document["unregistered_handlers"] == [
        {"name": "tests.test_inspect.retired_handler", "outcomes": {**ZERO, "done": 1}}
    ]
    receivers = document["receivers"]
    assert set(receivers) == {
        "event_dispatched",
        "handler_failed",
        "events_claimed",
        "call_finished",
    }
    assert receivers["call_finished"] == []
    assert "tests.test_inspect.on_dispatched" in receivers["event_dispatched"]
    # Connected for sender=Challenge: spark_decl sends with sender=None, it is never called.
    assert "tests.test_inspect.only_for_challenges" not in receivers["event_dispatched"]
    assert "tests.test_inspect.on_failure" in receivers["handler_failed"]
    assert "tests.test_inspect.on_failure" not in receivers["event_dispatched"]


@pytest.mark.usefixtures("stored")
def test_text_output() -> None:
    text = inspect()

    assert "Sources (4)\n  testapp.Challenge\n" in text
    assert "    tests.testapp.spark.events_from_challenge (on save and in the batch)\n" in text
    assert "    tests.testapp.spark.challenge_deadlines (batch only)\n" in text
    assert (
        "    tests.test_inspect.batch_only_source "
        "(batch only, batch scans tests.test_inspect.active_challenges())\n"
    ) in text
    assert "Handlers (5), in the order they run\n" in text
    assert (
        f"  {CHALLENGE_HANDLER}\n"
        "    patterns: ^challenge\n"
        "    runs: in process\n"
        "    calls: 0 pending, 2 done, 0 failed, 0 given up\n"
        "    stored groups it matches:\n"
        "      challenge_created (2 events)\n"
    ) in text
    assert (
        "  tests.test_inspect.refuse_donations\n"
        "    patterns: ^donation_\n"
        "    runs: in process\n"
        "    calls: 0 pending, 0 done, 1 failed, 0 given up\n"
        "    stored groups it matches:\n"
        "      donation_received (1 event)\n"
    ) in text
    assert (
        "  tests.test_inspect.mail_digest\n"
        "    patterns: ^challenge_created$\n"
        "    runs: as a background task\n"
        "    calls: 0 pending, 0 done, 0 failed, 0 given up\n"
        "    stored groups it matches:\n"
        "      challenge_created (2 events)\n"
    ) in text
    assert (
        "  tests.test_inspect.notify_async\n"
        "    patterns: ^reminder_\n"
        "    runs: in process (async function)\n"
        "    calls: 0 pending, 0 done, 0 failed, 0 given up\n"
        "    stored groups it matches: none\n"
    ) in text
    assert "Stored groups no handler matches (1)\n  orphan_group (2 events)\n" in text
    assert (
        "Calls of handlers that are not registered (1)\n"
        "  tests.test_inspect.retired_handler: 0 pending, 1 done, 0 failed, 0 given up\n"
    ) in text
    assert "Signal receivers\n  event_dispatched: " in text
    dispatched_line = next(line for line in text.splitlines() if "event_dispatched:" in line)
    assert "tests.test_inspect.on_dispatched" in dispatched_line
    failed_line = next(line for line in text.splitlines() if "handler_failed:" in line)
    assert "tests.test_inspect.on_failure" in failed_line


@pytest.mark.usefixtures("stored")
def test_styles_the_text_on_a_terminal() -> None:
    out = StringIO()
    call_command("spark_inspect", stdout=out, force_color=True)
    text = out.getvalue()
    assert "\x1b[" in text
    # Without colours the same content: styles only wrap it.
    assert inspect().splitlines()[0] in text


@pytest.mark.usefixtures("stored")
def test_two_queries_however_many_handlers_and_groups(
    django_assert_num_queries: DjangoAssertNumQueries,
) -> None:
    for number in range(20):
        # Half with outcome rows (claimed, then run), half done when claimed (a save's way).
        events = [event(f"challenge_extra_{number}", 1)]
        if number % 2:
            process_events(only_new_events(events))
        else:
            claim_and_run(events, using="default")
    # The groups, and the calls by handler and status.
    with django_assert_num_queries(2):
        inspection = inspect_spark()
    assert len(inspection.groups) == 23
    assert inspection.handlers[0].outcomes["done"] == 22


@pytest.mark.django_db
def test_nothing_registered_nothing_stored(isolated_registry: Registry) -> None:
    isolated_registry.clear()
    document = json.loads(inspect("--json"))
    assert document["sources"] == []
    assert document["handlers"] == []
    assert document["groups"] == []
    assert document["unhandled_groups"] == []
    assert document["unregistered_handlers"] == []

    text = inspect()
    assert "Sources (0)\n  none registered\n" in text
    assert "Handlers (0), in the order they run\n  none registered\n" in text
    assert "Stored groups no handler matches (0)\n  none\n" in text
    assert "not registered" not in text


@pytest.mark.django_db(transaction=True)
def test_a_call_done_since_it_failed_counts_as_done_without_its_old_error(
    isolated_registry: Registry,
) -> None:
    broken = [True]

    @handles(r"^donation_")
    def flaky_donations(event: Event[Any]) -> None:
        if broken[0]:
            raise RuntimeError("no donations today")

    Donation.objects.create(challenge=Challenge.objects.create(title="x"))
    broken[0] = False
    call_command("retry_spark_events", stdout=StringIO())
    assert HandlerOutcome.objects.get(handler=function_name(flaky_donations)).last_error

    document = json.loads(inspect("--json"))
    (handler,) = (h for h in document["handlers"] if h["name"] == function_name(flaky_donations))
    assert handler["outcomes"] == {**ZERO, "done": 1}
    assert "no donations today" not in json.dumps(document)
    text = inspect()
    assert (
        f"  {function_name(flaky_donations)}\n"
        "    patterns: ^donation_\n"
        "    runs: in process\n"
        "    calls: 0 pending, 1 done, 0 failed, 0 given up\n"
    ) in text
    assert "no donations today" not in text


# -- --health ---------------------------------------------------------------------------------

REFUSE_ORDERS = "tests.test_inspect.refuse_orders"


def refuse_orders(event: Event[Any]) -> None:
    raise RuntimeError("out of stock")


@pytest.fixture
def unhealthy(isolated_registry: Registry, transactional_db: None) -> timedelta:
    """Two calls of ``refuse_orders`` that failed just now (real claims), and a call of the
    test app's challenge handler pending for two hours. Returns how long it has waited."""
    waited = timedelta(hours=2, seconds=30)
    at = timezone.now() - waited
    record = EventRecord.objects.create(
        key="challenge_created_1", group="challenge_created", created_at=at
    )
    HandlerOutcome.objects.create(record=record, handler=CHALLENGE_HANDLER, created_at=at)
    # After the older rows: health() relies on ids ascending with created_at.
    handles(r"^order")(refuse_orders)
    process_events(only_new_events([event("order_paid", n) for n in range(2)]))
    return waited


@pytest.mark.usefixtures("unhealthy")
def test_health_text() -> None:
    text = inspect("--health")

    assert text.startswith("Health over the last 24h (since ")
    # Per handler, in the order handlers run.
    assert (
        "Problems (2)\n"
        f"  {CHALLENGE_HANDLER}: 1 calls pending, the oldest for 2 h\n"
        f"  {REFUSE_ORDERS}: 2 of 2 calls of the last hour failed, since "
    ) in text
    assert "Handlers (3)\n" in text
    oldest = HandlerOutcome.objects.get(handler=CHALLENGE_HANDLER).created_at
    assert (
        f"  {CHALLENGE_HANDLER}\n"
        "    calls: 1 pending, 0 done, 0 failed, 0 given up\n"
        "    last hour: no call ran\n"
        "    backlog: 1 pending, 0 failed waiting for a retry, 0 given up\n"
        f"    oldest pending: {oldest:%Y-%m-%d %H:%M} UTC, waiting 2 h\n"
    ) in text
    first = HandlerOutcome.objects.filter(handler=REFUSE_ORDERS).earliest("pk").created_at
    last = HandlerOutcome.objects.filter(handler=REFUSE_ORDERS).latest("pk").created_at
    assert (
        f"  {REFUSE_ORDERS}\n"
        "    calls: 0 pending, 0 done, 2 failed, 0 given up\n"
        "    last hour: 100% failed (2 of 2 calls)\n"
        "    backlog: 0 pending, 2 failed waiting for a retry, 0 given up\n"
        f"    failing since: {first:%Y-%m-%d %H:%M} UTC (last failure {last:%Y-%m-%d %H:%M} UTC)\n"
    ) in text
    assert (
        "Groups (2), events in the last 24h and their calls now\n"
        "  challenge_created (1 event), their calls: 1 pending, 0 done, 0 failed, 0 given up\n"
        "  order_paid (2 events), their calls: 0 pending, 0 done, 2 failed, 0 given up\n"
    ) in text
    assert "Outbox" not in text


@pytest.mark.usefixtures("unhealthy")
def test_health_json_is_the_health_document() -> None:
    document = json.loads(inspect("--health", "--json"))

    expected = health().as_dict()
    # Measured a moment apart: everything but the time of the measurement agrees.
    del document["now"], expected["now"]
    assert document == expected
    assert document["version"] == 1
    assert document["window"] == "24h"
    assert len(document["buckets"]) == 24
    assert len(document["problems"]) == 2
    (refuse,) = (h for h in document["handlers"] if h["name"] == REFUSE_ORDERS)
    assert refuse["calls"] == {**ZERO, "failed": 2}
    assert refuse["recent"]["failure_rate"] == 1.0
    assert refuse["open"]["failed"] == 2


@pytest.mark.usefixtures("unhealthy")
def test_health_window() -> None:
    document = json.loads(inspect("--health", "--window", "7d", "--json"))
    assert document["window"] == "7d"
    assert len(document["buckets"]) == 28
    assert inspect("--health", "--window", "7d").startswith("Health over the last 7d (since ")


@pytest.mark.usefixtures("unhealthy")
def test_problems_change_the_exit_status_only_when_asked() -> None:
    # Informational: printed, and a success for cron and shells.
    assert "Problems (2)" in inspect("--health")
    assert json.loads(inspect("--health", "--json"))["problems"]

    out = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("spark_inspect", "--health", "--fail-on-problems", stdout=out)
    assert exited.value.code == 1
    # The report is still printed, for the alert to carry.
    assert "Problems (2)" in out.getvalue()

    out = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("spark_inspect", "--health", "--json", "--fail-on-problems", stdout=out)
    assert exited.value.code == 1
    assert len(json.loads(out.getvalue())["problems"]) == 2


@pytest.mark.django_db
def test_healthy(isolated_registry: Registry) -> None:
    Challenge.objects.create(title="fine")

    text = inspect("--health", "--fail-on-problems")

    assert "Problems: none, healthy\n" in text
    assert (
        f"  {CHALLENGE_HANDLER}\n"
        "    calls: 0 pending, 0 done, 0 failed, 0 given up\n"
        "    last hour: no call ran\n"
        "    backlog: 0 pending, 0 failed waiting for a retry, 0 given up\n"
    ) in text
    assert json.loads(inspect("--health", "--json", "--fail-on-problems"))["problems"] == []


@pytest.mark.django_db
def test_a_stale_outbox_is_shown() -> None:
    OutboxEvent.objects.create(key="k", group="g", context={})
    OutboxEvent.objects.update(created_at=timezone.now() - timedelta(hours=1))

    text = inspect("--health")

    assert "Outbox: 1 saved events not claimed yet, the oldest for 1 h\n" in text
    assert "1 saved events not claimed for 1 h" in text


@pytest.mark.django_db
def test_health_options_are_validated() -> None:
    with pytest.raises(CommandError, match="invalid choice: '1y'"):
        inspect("--health", "--window", "1y")
    with pytest.raises(CommandError, match="--window only applies with --health"):
        inspect("--window", "7d")
    with pytest.raises(CommandError, match="--fail-on-problems only applies with --health"):
        inspect("--fail-on-problems")
