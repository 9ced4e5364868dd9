"""A failing handler is isolated, atomic, recorded, logged and signalled (semantic 3)."""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import transaction
from django.utils import timezone

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry, function_name
from spark_decl.signals import handler_failed
from tests.conftest import CHALLENGE_HANDLER, all_calls, logged_keys
from tests.testapp.models import Challenge, Donation, HandlerLog


class Boom(Exception):
    pass


@pytest.fixture
def exploding(isolated_registry: Registry) -> str:
    """Register a ``^challenge_created$`` handler that writes a row, then raises Boom."""

    @handles(r"^challenge_created$")
    def explode(event: Event[Any]) -> None:
        HandlerLog.objects.create(handler="explode", key=event["key"])
        raise Boom(f"cannot handle {event['key']}")

    return function_name(explode)


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        received.append(kwargs)

    handler_failed.connect(receiver)
    yield received
    handler_failed.disconnect(receiver)


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_does_not_stop_the_save_or_the_other_handlers(
    exploding: str, caplog: pytest.LogCaptureFixture
) -> None:
    after: list[str] = []

    # Registered after `explode`, so it runs after the failure.
    @handles(r"^challenge")
    def runs_after(event: Event[Any]) -> None:
        after.append(event["key"])

    before = timezone.now()
    with caplog.at_level(logging.ERROR, logger="spark_decl"):
        first = Challenge.objects.create(title="first")
        second = Challenge.objects.create(title="second")
    keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]

    assert Challenge.objects.count() == 2
    assert logged_keys() == keys
    assert after == keys
    # The failing handler's own write was rolled back.
    assert logged_keys("explode") == []

    for key in keys:
        outcome = HandlerOutcome.objects.get(record__key=key, handler=exploding)
        assert outcome.status == HandlerOutcome.Status.FAILED
        assert outcome.attempts == 1
        assert outcome.last_error == f"Boom: cannot handle {key}"
        assert outcome.traceback.startswith("Traceback (most recent call last):")
        assert 'raise Boom(f"cannot handle' in outcome.traceback
        assert outcome.traceback.rstrip().endswith(f"Boom: cannot handle {key}")
        assert outcome.finished_at is None
        # The first retry is due at once.
        assert outcome.next_attempt_at is not None
        assert before <= outcome.next_attempt_at <= timezone.now()
        claimed = EventRecord.objects.get(key=key)
        assert claimed.handler_statuses() == {
            CHALLENGE_HANDLER: "done",
            function_name(runs_after): "done",
            exploding: "failed",
        }

    logged = [r for r in caplog.records if r.name == "spark_decl"]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.ERROR]
    for record, key in zip(logged, keys, strict=True):
        assert exploding in record.getMessage()
        assert key in record.getMessage()
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], Boom)


@pytest.mark.django_db(transaction=True)
def test_handler_failed_is_sent_with_event_handler_and_exception(
    exploding: str, failures: list[dict[str, Any]]
) -> None:
    challenge = Challenge.objects.create(title="x")
    key = f"challenge_created_{challenge.pk}"
    assert len(failures) == 1
    assert failures[0]["event"]["key"] == key
    assert failures[0]["handler"] == exploding
    assert isinstance(failures[0]["exception"], Boom)
    assert str(failures[0]["exception"]) == f"cannot handle {key}"


@pytest.mark.django_db(transaction=True)
def test_a_raising_handler_failed_receiver_is_logged_and_harmless(
    exploding: str, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_receiver(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    handler_failed.connect(bad_receiver)
    try:
        challenge = Challenge.objects.create(title="x")
    finally:
        handler_failed.disconnect(bad_receiver)
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]
    assert any(
        r.exc_info is not None and str(r.exc_info[1]) == "receiver broke" for r in caplog.records
    )


@pytest.mark.django_db(transaction=True)
def test_a_failure_inside_an_atomic_save_does_not_roll_back_the_save(exploding: str) -> None:
    with transaction.atomic():
        challenge = Challenge.objects.create(title="committed")
    assert Challenge.objects.filter(pk=challenge.pk).exists()
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]
    outcome = HandlerOutcome.objects.get(handler=exploding)
    assert outcome.status == HandlerOutcome.Status.FAILED


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_breaks_the_database_transaction_is_isolated(
    isolated_registry: Registry,
) -> None:
    @handles(r"^challenge_created$")
    def integrity_error(event: Event[Any]) -> None:
        HandlerLog.objects.create(handler="integrity_error", key=event["key"])
        # A duplicate primary key: the database aborts the statement (and, on PostgreSQL,
        # the transaction up to the handler's savepoint).
        first = HandlerLog.objects.get(handler="integrity_error")
        HandlerLog.objects.create(pk=first.pk, handler="duplicate", key=event["key"])

    challenge = Challenge.objects.create(title="x")
    second = Challenge.objects.create(title="y")
    assert logged_keys() == [f"challenge_created_{challenge.pk}", f"challenge_created_{second.pk}"]
    assert logged_keys("integrity_error") == []
    failed = HandlerOutcome.objects.filter(handler=function_name(integrity_error))
    assert [o.status for o in failed] == ["failed", "failed"]
    assert all(o.last_error.startswith("IntegrityError") for o in failed)


@pytest.mark.django_db(transaction=True)
def test_failures_are_isolated_per_event_in_process_events(
    exploding: str, failures: list[dict[str, Any]]
) -> None:
    # process_events without only_new_events: nothing recorded, but still isolated and atomic.
    process_events([event("challenge_created", 1), event("challenge_created", 2)])
    assert logged_keys() == ["challenge_created_1", "challenge_created_2"]
    assert logged_keys("explode") == []
    assert [f["event"]["key"] for f in failures] == ["challenge_created_1", "challenge_created_2"]
    assert not HandlerOutcome.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_failures_are_isolated_per_event_in_claimed_batches(exploding: str) -> None:
    process_events(only_new_events([event("challenge_created", 1), event("challenge_created", 2)]))
    assert logged_keys() == ["challenge_created_1", "challenge_created_2"]
    statuses = HandlerOutcome.objects.filter(handler=exploding).values_list("status", flat=True)
    assert list(statuses) == ["failed", "failed"]


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_does_not_stop_the_batch_command(exploding: str) -> None:
    Challenge.objects.bulk_create([Challenge(title="a"), Challenge(title="b")])
    out = StringIO()
    call_command("process_spark_sources", stdout=out)
    assert out.getvalue().startswith("2 rows, 2 events, 2 new, 4 handled, 2 failed in ")
    assert len(logged_keys()) == 2
    assert HandlerOutcome.objects.filter(status="failed").count() == 2
    assert Counter(all_calls().values()) == {"failed": 2, "done": 2}


@pytest.mark.django_db(transaction=True)
def test_events_from_a_handler_are_handled_after_it_commits_or_never(
    isolated_registry: Registry,
) -> None:
    order: list[str] = []
    broken = True

    @handles(r"^donation_received$")
    def activate_challenge(event: Event[Any]) -> None:
        challenge = event["context"]["donation"].challenge
        challenge.is_active = True
        challenge.save()
        order.append("activated")
        if broken:
            raise Boom("after saving")

    @handles(r"^challenge_created$")
    def after_activation(event: Event[Any]) -> None:
        order.append(f"handled {event['key']}")

    challenge = Challenge.objects.create(title="x", is_active=False)
    key = f"challenge_created_{challenge.pk}"
    Donation.objects.create(challenge=challenge)
    # The handler's save and the claim it made were rolled back with it.
    assert order == ["activated"]
    challenge.refresh_from_db()
    assert not challenge.is_active
    assert not EventRecord.objects.filter(key=key).exists()

    broken = False
    call_command("retry_spark_events", stdout=StringIO())
    assert order == ["activated", "activated", f"handled {key}"]
    assert logged_keys() == [key]
    challenge.refresh_from_db()
    assert challenge.is_active


# -- failures whose text the database or str() refuses ------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise TypeError("no text for you")


# What each exception's stored last_error must match (re.fullmatch, across lines).
UNSTORABLE = [
    # PostgreSQL refuses NUL in text columns; SQLite stores it, unreadably.
    pytest.param(lambda: Boom("a NUL \x00 byte"), re.escape(r"Boom: a NUL \x00 byte"), id="nul"),
    # What os.fsdecode() makes of a file name that is not UTF-8: no driver can encode it.
    pytest.param(
        lambda: Boom(os.fsdecode(b"caf\xe9.txt")),
        re.escape(r"Boom: caf\udce9.txt"),
        id="surrogate",
    ),
    # A message and params that do not match: Django's str() raises KeyError.
    pytest.param(
        lambda: ValidationError("%(x)s", params={"y": 1}),
        re.escape("<unprintable ValidationError: str() raised KeyError: 'x'>"),
        id="validation-error",
    ),
    pytest.param(
        Unprintable,
        re.escape("<unprintable Unprintable: str() raised TypeError: no text for you>"),
        id="str-raises",
    ),
    # Its traceback repeats it: a megabyte.
    pytest.param(lambda: Boom(f"head{'x' * 1_000_000}tail"), "Boom: headx{100}.*tail", id="huge"),
]
# The bounds docs/guarantees.rst states.
ERROR_CHARS = 10_000
TRACEBACK_CHARS = 50_000


@dataclass
class Breaking:
    """A registered ``^challenge_created$`` handler that writes a row, then raises
    ``exception()`` while ``broken`` is set (for every key, or only ``keys`` if given), and a
    ``^challenge`` handler registered after it, which records the keys it received."""

    name: str = ""
    exception: Callable[[], Exception] = lambda: Boom("plain")
    broken: bool = True
    keys: set[str] | None = None
    after: list[str] = field(default_factory=list)


@pytest.fixture
def breaking(isolated_registry: Registry) -> Breaking:
    state = Breaking()

    @handles(r"^challenge_created$")
    def breaks(event: Event[Any]) -> None:
        HandlerLog.objects.create(handler="breaks", key=event["key"])
        if state.broken and (state.keys is None or event["key"] in state.keys):
            raise state.exception()

    @handles(r"^challenge")
    def runs_after(event: Event[Any]) -> None:
        state.after.append(event["key"])

    state.name = function_name(breaks)
    return state


def assert_recorded_failure(
    key: str, handler: str, exception: Callable[[], Exception], error: str, *, attempts: int = 1
) -> None:
    outcome = HandlerOutcome.objects.get(record__key=key, handler=handler)
    assert (outcome.status, outcome.attempts) == (HandlerOutcome.Status.FAILED, attempts)
    assert re.fullmatch(error, outcome.last_error, re.DOTALL), outcome.last_error[:200]
    assert len(outcome.last_error) <= ERROR_CHARS
    trace = outcome.traceback
    assert trace.startswith("Traceback (most recent call last):")
    assert "raise state.exception()" in trace
    assert type(exception()).__name__ in trace
    assert len(trace) <= TRACEBACK_CHARS
    for text in (outcome.last_error, trace):
        assert "\x00" not in text
        text.encode("utf-8")  # no lone surrogate left


def assert_isolated(
    breaking: Breaking, keys: list[str], exception: Callable[[], Exception], error: str
) -> None:
    """The other handlers ran for every event, the failing one left no write, its calls
    are recorded as failed, and a retry runs them again once the handler is fixed."""
    assert logged_keys() == keys
    assert breaking.after == keys
    assert logged_keys("breaks") == []
    for key in keys:
        assert_recorded_failure(key, breaking.name, exception, error)
    breaking.broken = False
    assert retry().startswith(f"{len(keys)} due, {len(keys)} succeeded, 0 failed")
    assert logged_keys("breaks") == keys
    assert Counter(all_calls().values()) == {"done": 3 * len(keys)}


def retry(*args: str) -> str:
    out = StringIO()
    call_command("retry_spark_events", *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize(("exception", "error"), UNSTORABLE)
@pytest.mark.django_db(transaction=True)
def test_a_failure_whose_text_cannot_be_stored_is_recorded_on_a_save(
    breaking: Breaking,
    exception: Callable[[], Exception],
    error: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaking.exception = exception
    with caplog.at_level(logging.ERROR, logger="spark_decl"):
        first = Challenge.objects.create(title="first")
        second = Challenge.objects.create(title="second")
    assert Challenge.objects.count() == 2
    # Logged with its traceback, formatted by pytest's handler, which raises on a logging
    # error.
    failures = [r for r in caplog.records if r.name == "spark_decl" and r.exc_info]
    assert len(failures) == 2
    assert breaking.name in caplog.text
    assert type(exception()).__name__ in caplog.text
    assert_isolated(
        breaking,
        [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"],
        exception,
        error,
    )


@pytest.mark.parametrize(("exception", "error"), UNSTORABLE)
@pytest.mark.django_db(transaction=True)
def test_a_failure_whose_text_cannot_be_stored_is_recorded_on_a_save_in_atomic(
    breaking: Breaking, exception: Callable[[], Exception], error: str
) -> None:
    breaking.exception = exception
    with transaction.atomic():
        first = Challenge.objects.create(title="first")
        second = Challenge.objects.create(title="second")
    assert Challenge.objects.count() == 2
    assert_isolated(
        breaking,
        [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"],
        exception,
        error,
    )


@pytest.mark.parametrize(("exception", "error"), UNSTORABLE)
@pytest.mark.django_db(transaction=True)
def test_a_failure_whose_text_cannot_be_stored_does_not_stop_the_batch_command(
    breaking: Breaking, exception: Callable[[], Exception], error: str
) -> None:
    breaking.exception = exception
    first, second = Challenge.objects.bulk_create([Challenge(title="a"), Challenge(title="b")])
    out = StringIO()
    call_command("process_spark_sources", stdout=out)
    assert out.getvalue().startswith("2 rows, 2 events, 2 new, 6 handled, 2 failed in ")
    assert_isolated(
        breaking,
        [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"],
        exception,
        error,
    )


@pytest.mark.parametrize(("exception", "error"), UNSTORABLE)
@pytest.mark.django_db(transaction=True)
def test_a_retry_failing_with_text_that_cannot_be_stored_is_recorded(
    breaking: Breaking, exception: Callable[[], Exception], error: str
) -> None:
    first = Challenge.objects.create(title="first")
    second = Challenge.objects.create(title="second")
    keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]
    breaking.exception = exception
    breaking.keys = {keys[0]}
    assert retry().startswith("2 due, 1 succeeded, 1 failed")
    assert_recorded_failure(keys[0], breaking.name, exception, error, attempts=2)
    assert logged_keys("breaks") == keys[1:]

    breaking.broken = False
    assert retry("--all").startswith("1 due, 1 succeeded, 0 failed")
    assert logged_keys("breaks") == [keys[1], keys[0]]
    assert Counter(all_calls().values()) == {"done": 6}


@pytest.mark.django_db(transaction=True)
def test_a_huge_traceback_keeps_its_first_and_last_exception(breaking: Breaking) -> None:
    def chained() -> Exception:
        try:
            raise ValueError(f"the cause {'y' * 200_000}")
        except ValueError as cause:
            error = RuntimeError("the last straw")
            error.__cause__ = cause
            return error

    breaking.exception = chained
    Challenge.objects.create(title="x")
    outcome = HandlerOutcome.objects.get(handler=breaking.name)
    assert outcome.last_error == "RuntimeError: the last straw"
    trace = outcome.traceback
    assert len(trace) <= TRACEBACK_CHARS
    assert trace.startswith("Traceback (most recent call last):")
    assert "ValueError: the cause yyy" in trace
    assert re.search(r"\n\[\.\.\. [\d,]+ characters cut \.\.\.\]\n", trace)
    assert trace.endswith("RuntimeError: the last straw\n")


@pytest.mark.parametrize(("exception", "error"), UNSTORABLE)
@pytest.mark.django_db(transaction=True)
def test_logging_a_failure_does_not_raise_where_its_text_cannot_be_written(
    breaking: Breaking,
    exception: Callable[[], Exception],
    error: str,
) -> None:
    # A log file that only takes ASCII: the logging module reports the error on stderr.
    ascii_only = logging.StreamHandler(io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    logger = logging.getLogger("spark_decl")
    logger.addHandler(ascii_only)
    breaking.exception = exception
    try:
        challenge = Challenge.objects.create(title="x")
    finally:
        logger.removeHandler(ascii_only)
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]
    assert_recorded_failure(f"challenge_created_{challenge.pk}", breaking.name, exception, error)
