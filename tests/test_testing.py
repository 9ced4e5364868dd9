"""``spark_decl.testing`` and the pytest plugin: capturing events, switching handlers off,
and running on-commit handlers in a ``TestCase``."""

from __future__ import annotations

import re
import textwrap
from io import StringIO
from typing import Any, assert_type

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import TestCase, override_settings
from django_tasks_db.models import DBTaskResult
from pytest_django import DjangoCaptureOnCommitCallbacks

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.conf import get_settings
from spark_decl.exceptions import InvalidPattern, UnknownHandler
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from spark_decl.registry import Registry, function_name
from spark_decl.testing import CapturedEvents, capture_events, run_on_commit
from tests.conftest import CHALLENGE_HANDLER, logged_keys
from tests.testapp.models import Challenge, Donation, HandlerLog
from tests.testapp.spark import ChallengeContext, log_challenge_event

pytest_plugins = ["pytester"]

DATABASE_TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}


# -- capture_events ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_capture_records_each_event_when_its_transaction_commits() -> None:
    with capture_events() as events:
        with transaction.atomic():
            first = Challenge.objects.create(title="a")
            second = Challenge.objects.create(title="b")
            assert events == []  # claimed, not dispatched: nothing has committed
        keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]
        assert events.keys == keys
        first.save()  # the key was claimed before: never dispatched again
    assert events.keys == keys
    assert events.groups == ["challenge_created", "challenge_created"]
    assert events[0]["context"]["challenge"] is first
    assert logged_keys() == keys  # handlers ran as usual
    assert events.handlers_of(events[0]) == (CHALLENGE_HANDLER,)


@pytest.mark.django_db(transaction=True)
def test_capture_records_what_event_dispatched_reports_repeats_and_unrouted_included() -> None:
    candidates = [
        event("challenge_created", 1),
        event("unrouted", 2),
        event("challenge_created", 1),
    ]
    with capture_events() as events:
        process_events(candidates)
        process_events(only_new_events(candidates))
    assert events.keys == [
        "challenge_created_1",
        "unrouted_2",
        "challenge_created_1",
        "challenge_created_1",
        "unrouted_2",
    ]
    assert [events.handlers_of(e) for e in events[:2]] == [(CHALLENGE_HANDLER,), ()]


@pytest.mark.django_db(transaction=True)
def test_only_events_dispatched_inside_the_block_are_captured() -> None:
    with transaction.atomic(), capture_events() as events:
        challenge = Challenge.objects.create(title="committed after the block")
    assert events == []
    # It was dispatched (and handled) at the commit, after the block ended.
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_save_is_never_captured() -> None:
    def save_and_roll_back() -> None:
        with transaction.atomic():
            Challenge.objects.create(title="rolled back")
            raise RuntimeError

    with capture_events() as events:
        with pytest.raises(RuntimeError):
            save_and_roll_back()
        kept = Challenge.objects.create(title="kept")
    assert events.keys == [f"challenge_created_{kept.pk}"]


# -- the CapturedEvents helpers -----------------------------------------------------------


def _captured(*events: Event[Any]) -> CapturedEvents[Any]:
    """Capture ``events`` as dispatched; their groups route to no handler, so no database
    is touched."""
    with capture_events() as captured:
        process_events(events)
    return captured


def test_matching_selects_groups_as_handles_patterns_do() -> None:
    captured = _captured(
        event("order_created", 1), event("refund_issued", 2), event("order_shipped", 1)
    )
    assert captured.matching(r"^order_").keys == ["order_created_1", "order_shipped_1"]
    assert captured.matching(re.compile("issued")).groups == ["refund_issued"]
    assert captured.matching("created$").matching("^ord").keys == ["order_created_1"]
    assert captured.matching("^nothing") == []
    with pytest.raises(InvalidPattern, match=r"Invalid pattern '\(' in CapturedEvents\.matching"):
        captured.matching("(")


def test_one_returns_the_only_match_or_fails_listing_what_was_captured() -> None:
    created = event("order_created", 1)
    captured = _captured(created, event("order_shipped", 1), event("order_shipped", 2))
    assert captured.one(r"_created$") is created
    assert _captured(created).one() is created

    message = (
        "Expected exactly one captured event whose group matches '_shipped$', found 2: "
        "['order_shipped_1', 'order_shipped_2']. Captured: ['order_created_1', "
        "'order_shipped_1', 'order_shipped_2']."
    )
    with pytest.raises(AssertionError) as excinfo:
        captured.one(re.compile("_shipped$"))
    assert str(excinfo.value) == message
    with pytest.raises(AssertionError, match=r"matches '\^refund', found 0\. Captured: \["):
        captured.one("^refund")
    with pytest.raises(AssertionError, match=r"^Expected exactly one captured event, found 0"):
        _captured().one()


def test_handlers_of_refuses_an_event_that_was_not_captured() -> None:
    captured = _captured(event("order_created", 1))
    assert captured.handlers_of(captured[0]) == ()
    with pytest.raises(ValueError, match="'order_created_1' is not one of the captured"):
        captured.handlers_of(event("order_created", 1))  # equal, but not the same event


@pytest.mark.django_db(transaction=True)
def test_routed_to_takes_the_handler_or_its_name(isolated_registry: Registry) -> None:
    @handles(r"^challenge_ended$")
    def on_end(event: Event[Any]) -> None:
        pass

    with capture_events() as events:
        process_events([event("challenge_created", 1), event("challenge_ended", 1)])
    assert events.routed_to(log_challenge_event).keys == [
        "challenge_created_1",
        "challenge_ended_1",
    ]
    assert events.routed_to(on_end).keys == ["challenge_ended_1"]
    assert events.routed_to(function_name(on_end)).keys == ["challenge_ended_1"]
    assert events.matching("created").routed_to(on_end) == []
    with pytest.raises(
        UnknownHandler, match=r"Did you mean 'tests\.testapp\.spark\.log_challenge_event'"
    ):
        events.routed_to("tests.testapp.spark.log_challenge_events")


# -- run_handlers=False -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_suppressed_handlers_do_not_run_and_their_calls_stay_pending(
    isolated_registry: Registry,
) -> None:
    called: list[str] = []

    @handles(r"^challenge")
    def spy(event: Event[Any]) -> None:
        called.append(event["key"])

    with capture_events(run_handlers=False) as events:
        autocommit = Challenge.objects.create(title="claimed and dispatched in one go")
        with transaction.atomic():
            on_commit = Challenge.objects.create(title="dispatched on commit")
        process_events([event("challenge_ended", "unclaimed")])
    keys = [f"challenge_created_{autocommit.pk}", f"challenge_created_{on_commit.pk}"]
    assert events.keys == [*keys, "challenge_ended_unclaimed"]
    assert events.routed_to(spy).keys == events.keys  # routed, not run
    assert called == []
    assert not HandlerLog.objects.exists()
    # The claims are complete, the calls owed and untouched: no attempt, no error.
    assert sorted(EventRecord.objects.values_list("key", flat=True)) == sorted(keys)
    assert set(HandlerOutcome.objects.values_list("status", "attempts", "last_error")) == {
        (HandlerOutcome.Status.PENDING, 0, "")
    }
    assert HandlerOutcome.objects.count() == 4

    # Pending means owed: retrying abandoned calls runs each of them once.
    call_command("retry_spark_events", "--stale-after", "0", stdout=StringIO())
    assert sorted(called) == sorted(keys)
    assert sorted(logged_keys()) == sorted(keys)
    assert set(HandlerOutcome.objects.values_list("status", flat=True)) == {"done"}

    # The switch is off again after the block.
    later = Challenge.objects.create(title="after")
    assert called[-1] == f"challenge_created_{later.pk}"


@pytest.mark.django_db(transaction=True)
def test_suppression_nests_and_is_switched_off_even_when_the_block_raises() -> None:
    with capture_events(run_handlers=False):
        with capture_events() as inner:
            first = Challenge.objects.create(title="inner block")
        Challenge.objects.create(title="outer block")
        with pytest.raises(RuntimeError), capture_events(run_handlers=False):
            raise RuntimeError
        Challenge.objects.create(title="still outer")
    assert inner.keys == [f"challenge_created_{first.pk}"]
    assert logged_keys() == []
    assert get_settings().RUN_HANDLERS is True
    last = Challenge.objects.create(title="after")
    assert logged_keys() == [f"challenge_created_{last.pk}"]


@pytest.mark.django_db(transaction=True)
def test_suppressed_handlers_stay_off_for_the_batch_command_too() -> None:
    Challenge.objects.bulk_create([Challenge(title="a"), Challenge(title="b")])
    with capture_events(run_handlers=False) as events:
        call_command("process_spark_sources", stdout=StringIO())
    assert len(events.matching("^challenge_created$")) == 2
    assert logged_keys() == []
    assert HandlerOutcome.objects.filter(status="pending").count() == 2


def send_welcome(event: Event[Any]) -> None:
    """A background handler (module level: the task names it)."""
    HandlerLog.objects.create(handler="send_welcome", key=event["key"])


@pytest.mark.django_db(transaction=True)
def test_suppressed_background_handlers_are_not_enqueued(isolated_registry: Registry) -> None:
    handles(r"^challenge_created$", background=True)(send_welcome)
    with capture_events(run_handlers=False) as events:
        immediate = Challenge.objects.create(title="default backend: runs at once")
        with override_settings(TASKS=DATABASE_TASKS):
            outbox = Challenge.objects.create(title="enqueued with the claim")
            with transaction.atomic():
                in_transaction = Challenge.objects.create(title="enqueued with the claim")
    keys = [f"challenge_created_{c.pk}" for c in (immediate, outbox, in_transaction)]
    assert events.routed_to(send_welcome).keys == keys
    assert not DBTaskResult.objects.exists()
    assert not HandlerLog.objects.exists()
    pending = HandlerOutcome.objects.filter(handler=function_name(send_welcome), status="pending")
    assert pending.count() == 3

    later = Challenge.objects.create(title="after the block")
    assert logged_keys("send_welcome") == [f"challenge_created_{later.pk}"]


# -- run_on_commit: handlers in a TestCase ----------------------------------------------------


@pytest.mark.django_db
def test_in_a_test_case_nothing_commits_so_nothing_is_dispatched() -> None:
    with capture_events() as events:
        challenge = Challenge.objects.create(title="never committed")
    assert events == []
    assert logged_keys() == []
    # In the outbox of the test's transaction, claimed at its commit, which never comes.
    assert OutboxEvent.objects.get().key == f"challenge_created_{challenge.pk}"
    assert not EventRecord.objects.exists()


@pytest.mark.django_db
def test_run_on_commit_dispatches_the_blocks_claims_on_exit() -> None:
    before = Challenge.objects.create(title="claimed before the block")
    with run_on_commit() as events:
        first = Challenge.objects.create(title="a")
        second = Challenge.objects.create(title="b")
        assert events == []
    keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]
    assert events.keys == keys
    assert logged_keys() == keys  # not the claim made before the block
    assert f"challenge_created_{before.pk}" not in events.keys
    assert set(HandlerOutcome.objects.filter(record__key__in=keys).values_list("status")) == {
        ("done",)
    }


@pytest.mark.django_db
def test_run_on_commit_also_dispatches_events_from_handlers_saves(
    isolated_registry: Registry,
) -> None:
    @handles(r"^challenge_created$")
    def donate(event: Event[ChallengeContext]) -> None:
        Donation.objects.create(challenge=event["context"]["challenge"])

    with run_on_commit() as events:
        challenge = Challenge.objects.create(title="a")
    donation = Donation.objects.get()
    assert events.keys == [f"challenge_created_{challenge.pk}", f"donation_received_{donation.pk}"]
    assert logged_keys("log_donation") == [f"donation_received_{donation.pk}"]


@pytest.mark.django_db
def test_run_on_commit_without_handlers_captures_what_a_save_would_dispatch() -> None:
    with run_on_commit(run_handlers=False) as events:
        challenge = Challenge.objects.create(title="a")
    assert events.one()["context"]["challenge"] is challenge
    assert logged_keys() == []


@pytest.mark.django_db(transaction=True)
def test_run_on_commit_inside_a_transaction_does_not_dispatch_again_at_the_commit() -> None:
    with capture_events() as everything, transaction.atomic():
        with run_on_commit() as events:
            challenge = Challenge.objects.create(title="a")
        key = f"challenge_created_{challenge.pk}"
        assert events.keys == [key]
        assert logged_keys() == [key]
    # The real commit ran the callback again: it knew it was done.
    assert everything.keys == [key]
    assert logged_keys() == [key]


@pytest.mark.django_db(transaction=True)
def test_run_on_commit_in_a_transaction_test_captures_real_commits() -> None:
    with run_on_commit() as events:
        challenge = Challenge.objects.create(title="autocommit")
        assert events.keys == [f"challenge_created_{challenge.pk}"]
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]


class RunOnCommitInATestCase(TestCase):
    """The unittest spelling: the helpers need no pytest."""

    def test_handlers_run_when_the_block_exits(self) -> None:
        with run_on_commit() as events:
            challenge = Challenge.objects.create(title="a")
        key = f"challenge_created_{challenge.pk}"
        assert events.keys == [key]
        assert logged_keys() == [key]

    def test_capture_on_commit_callbacks_works_as_well(self) -> None:
        with capture_events() as events, self.captureOnCommitCallbacks(execute=True):
            challenge = Challenge.objects.create(title="a")
        assert events.keys == [f"challenge_created_{challenge.pk}"]


# -- the pytest plugin ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_spark_events_fixture_captures_the_whole_test(
    spark_events: CapturedEvents[ChallengeContext],
) -> None:
    challenge = Challenge.objects.create(title="a")
    created = spark_events.one(r"^challenge_created$")
    assert_type(created["context"]["challenge"], Challenge)
    assert created["context"]["challenge"] is challenge
    assert logged_keys() == [created["key"]]


@pytest.mark.django_db(transaction=True)
def test_the_no_handlers_fixture_captures_without_running_handlers(
    spark_events_no_handlers: CapturedEvents[Any],
) -> None:
    challenge = Challenge.objects.create(title="a")
    assert spark_events_no_handlers.keys == [f"challenge_created_{challenge.pk}"]
    assert logged_keys() == []


@pytest.mark.django_db
def test_the_fixtures_combine_with_pytest_djangos_on_commit_capture(
    spark_events: CapturedEvents[Any],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        challenge = Challenge.objects.create(title="a")
    assert spark_events.keys == [f"challenge_created_{challenge.pk}"]


def test_the_plugin_is_loaded_by_its_entry_point_without_django(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project that neither configures Django nor uses pytest-django runs unaffected,
    with the plugin loaded."""
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    pytester.makepyfile(
        test_plain=textwrap.dedent(
            """
            from django.conf import settings

            def test_plugin_loaded_and_no_settings_read(request):
                plugin = request.config.pluginmanager.get_plugin("spark_decl")
                assert plugin.__name__ == "spark_decl.pytest_plugin"
                assert not settings.configured

            def test_the_fixture_reads_no_settings_either(spark_events):
                assert spark_events == []
                assert not settings.configured
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:django", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
