"""``only_new_events`` and ``process_events``: once per key (semantic 1), and seed semantics."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import IntegrityError, OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pytest_django import Settings

from spark_decl import Event, api, claims, event, handles, only_new_events, process_events
from spark_decl.claims import seen_keys
from spark_decl.exceptions import InvalidContext
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry
from spark_decl.validation import validate_event
from tests.conftest import (
    CHALLENGE_HANDLER,
    FailStatements,
    all_calls,
    handler_statuses,
    logged_keys,
    retry_warnings,
)
from tests.testapp.models import Challenge, HandlerLog

ROOT = Path(__file__).resolve().parent.parent
ROWS = 50


@pytest.fixture
def recorder(isolated_registry: Registry) -> list[str]:
    calls: list[str] = []

    @handles(r"^g")
    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    return calls


@pytest.mark.django_db(transaction=True)
def test_only_new_events_yields_new_keys_in_input_order_each_once() -> None:
    list(only_new_events([event("g", 2)]))
    events = [event("g", 3), event("g", 1), event("g", 2), event("g", 3), event("h", 4)]
    assert [e["key"] for e in only_new_events(events)] == ["g_3", "g_1", "h_4"]
    assert list(only_new_events(events)) == []
    assert sorted(EventRecord.objects.values_list("key", flat=True)) == [
        "g_1",
        "g_2",
        "g_3",
        "h_4",
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "numbers",
    [[3, 1, 10, 2], list(range(1200, 0, -1))],
    ids=["values", "json_document"],
)
def test_a_claim_inserts_its_rows_in_key_order_and_returns_them_in_input_order(
    numbers: list[int],
) -> None:
    """Every claim takes the locks of its keys in one order, so that two claims of
    overlapping keys never wait for each other in a cycle; the events still come back in
    the order they went in. (On PostgreSQL, 4 rows are one ``VALUES`` list, 1,200 one JSON
    document.) Record ids follow the order of insertion."""
    events = [validate_event(event("g", n)) for n in numbers]
    assert [e["key"] for e in claims.claim_events(events)] == [e["key"] for e in events]
    inserted = list(EventRecord.objects.order_by("pk").values_list("key", flat=True))
    assert inserted == sorted(e["key"] for e in events)


@pytest.mark.django_db(transaction=True)
def test_the_first_occurrence_of_a_key_wins() -> None:
    first = {"group": "g", "key": "same", "context": {"n": 1}}
    second = {"group": "other", "key": "same", "context": {"n": 2}}
    assert list(only_new_events([first, second])) == [first]
    record = EventRecord.objects.get()
    assert (record.group, record.context) == ("g", {"n": 1})


@pytest.mark.django_db(transaction=True)
def test_claimed_events_equal_the_events_passed_in() -> None:
    challenge = Challenge.objects.create(title="x", is_active=False)
    original = event("challenge_x", challenge.pk, {"challenge": challenge, "extra": [1, 2]})
    (claimed,) = only_new_events([original])
    assert claimed == original
    assert claimed["context"]["challenge"] is challenge


@pytest.mark.django_db(transaction=True)
def test_only_new_events_reads_a_chunk_and_claims_each_event_as_it_yields(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 2}
    pulled: list[int] = []

    def produce() -> Iterator[Event[dict[str, Any]]]:
        for n in range(5):
            pulled.append(n)
            yield event("g", n)

    claimed = only_new_events(produce())
    assert pulled == []
    assert not EventRecord.objects.exists()
    assert next(claimed)["key"] == "g_0"
    # A chunk is read from the source, and only what is handed over is claimed.
    assert pulled == [0, 1]
    assert EventRecord.objects.count() == 1
    assert next(claimed)["key"] == "g_1"
    assert EventRecord.objects.count() == 2
    assert [e["key"] for e in claimed] == ["g_2", "g_3", "g_4"]
    assert pulled == [0, 1, 2, 3, 4]
    assert EventRecord.objects.count() == 5


@pytest.mark.django_db(transaction=True)
def test_duplicates_across_chunks_are_yielded_once(settings: Settings) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 2}
    events = [event("g", n) for n in (1, 2, 1, 3, 2, 3, 4)]
    assert [e["key"] for e in only_new_events(events)] == ["g_1", "g_2", "g_3", "g_4"]


@pytest.mark.django_db(transaction=True)
def test_claiming_many_events_at_once() -> None:
    # More rows than one INSERT statement takes.
    events = [event("g", n) for n in range(1200)]
    assert len(list(only_new_events(events))) == 1200
    assert len(list(only_new_events([*events, event("g", "new")]))) == 1
    assert EventRecord.objects.count() == 1201


@pytest.mark.django_db(transaction=True)
def test_process_events_does_not_dedupe(recorder: list[str]) -> None:
    process_events([event("g", 1), event("g", 1)])
    process_events([event("g", 1)])
    assert recorder == ["g_1", "g_1", "g_1"]
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_process_events_with_only_new_events_handles_each_key_once(recorder: list[str]) -> None:
    for _ in range(3):
        process_events(only_new_events([event("g", 1), event("g", 2), event("g", 1)]))
    assert recorder == ["g_1", "g_2"]
    outcomes = HandlerOutcome.objects.filter(status="done").values_list("record__key", flat=True)
    assert sorted(outcomes) == ["g_1", "g_2"]


@pytest.mark.django_db(transaction=True)
def test_process_events_inside_a_transaction_runs_after_commit(recorder: list[str]) -> None:
    with transaction.atomic():
        process_events([event("g", 1)])
        process_events(only_new_events([event("g", 2)]))
        assert recorder == []
    assert recorder == ["g_1", "g_2"]


@pytest.mark.django_db(transaction=True)
def test_process_events_inside_a_rolled_back_transaction_runs_nothing(
    recorder: list[str],
) -> None:
    def process_then_fail() -> None:
        with transaction.atomic():
            process_events(only_new_events([event("g", 1)]))
            process_events([event("g", 2)])
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        process_then_fail()
    assert recorder == []
    assert not EventRecord.objects.exists()
    # The key was never claimed: it is new next time.
    process_events(only_new_events([event("g", 1)]))
    assert recorder == ["g_1"]


@pytest.mark.django_db(transaction=True)
def test_an_event_without_handlers_is_claimed_without_outcomes() -> None:
    process_events(only_new_events([event("unrouted", 1)]))
    assert EventRecord.objects.get().key == "unrouted_1"
    assert not HandlerOutcome.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_outcomes_are_made_for_the_handlers_matching_at_claim_time() -> None:
    process_events(only_new_events([event("challenge_created", 1)]))
    assert list(HandlerOutcome.objects.values_list("handler", "status")) == [
        (CHALLENGE_HANDLER, "done")
    ]


@pytest.mark.django_db(transaction=True)
def test_an_unstorable_context_is_refused_before_anything_is_written() -> None:
    good = event("challenge_created", 1, {"when": timezone.now()})
    bad = event("challenge_created", 2, {"when": {1, 2}})
    with pytest.raises(InvalidContext) as excinfo:
        list(only_new_events([good, bad]))
    assert isinstance(excinfo.value, ValueError)
    assert "'challenge_created_2'" in str(excinfo.value)
    assert "context['when']" in str(excinfo.value)
    assert "builtins.set" in str(excinfo.value)
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_unstorable_context_from_a_save_raises_and_claims_nothing(
    isolated_registry: Registry,
) -> None:
    from spark_decl import event_source

    @event_source(Challenge)
    def with_object(challenge: Challenge) -> Iterator[Event[dict[str, object]]]:
        yield event("challenge_odd", challenge.pk, {"thing": object()})

    with pytest.raises(InvalidContext, match=r"context\['thing'\]"), transaction.atomic():
        Challenge.objects.create(title="x")
    assert not EventRecord.objects.exists()
    assert not Challenge.objects.exists()
    assert logged_keys() == []


@pytest.mark.django_db
def test_the_unique_key_is_enforced_by_the_database() -> None:
    now = timezone.now()
    EventRecord.objects.create(key="k", group="g", created_at=now)
    with pytest.raises(IntegrityError), transaction.atomic():
        EventRecord.objects.create(key="k", group="other", created_at=now)


WORKER = textwrap.dedent(
    """
    import os, sys

    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    from django.conf import settings

    # The test database, not the development one.
    settings.DATABASES["default"]["NAME"] = sys.argv[1]
    # Small chunks, so that the workers' claims interleave.
    settings.SPARK_DECL = {"CHUNK_SIZE": 5}
    import django

    django.setup()
    from django.core.management import call_command

    call_command("process_spark_sources", "--model", "testapp.Challenge")
    """
)


@pytest.mark.django_db(transaction=True)
def test_concurrent_batch_workers_never_handle_a_key_twice() -> None:
    """Semantic 1 across processes, on a file SQLite database or PostgreSQL."""
    if connection.vendor == "sqlite":
        assert Path(connection.settings_dict["NAME"]).is_file()
    ended = timezone.localdate() - dt.timedelta(days=1)
    Challenge.objects.bulk_create(Challenge(title=f"c{n}", end_date=ended) for n in range(ROWS))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(connection.settings_dict["NAME"])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        assert out.startswith(f"{ROWS} rows, {2 * ROWS} events, "), out

    handled = Counter(
        HandlerLog.objects.filter(handler="log_challenge_event").values_list("key", flat=True)
    )
    assert len(handled) == 2 * ROWS
    assert set(handled.values()) == {1}
    assert EventRecord.objects.count() == 2 * ROWS
    assert set(all_calls().values()) == {"done"}
    new = sum(int(out.split(" new,")[0].rsplit(" ", 1)[1]) for out, _ in outputs)
    assert new == 2 * ROWS


@pytest.mark.django_db
def test_seen_keys_reads_any_number_of_keys_with_one_query() -> None:
    claimed = [f"k{i}" for i in range(0, 3000, 2)]
    list(only_new_events(event("g", key) for key in claimed))
    # Keys with quotes, backslashes and non-ASCII travel intact in the JSON array.
    odd = ['g_"quoted"', "g_back\\slash", "g_ünï", "g_,comma"]
    list(only_new_events(event("g", key[2:]) for key in odd))
    asked = [f"g_k{i}" for i in range(3000)] + odd + ["g_never"]
    with CaptureQueriesContext(connection) as context:
        seen = seen_keys(asked)
    assert len(context.captured_queries) == 1
    assert seen == {f"g_{key}" for key in claimed} | set(odd)
    assert seen_keys([]) == set()


# -- a consumer that stops: nothing claimed that it never got -----------------------------

# django-spark's keyword and the declarative name share the behaviour.
ONLY_NEW_EVENTS: list[Callable[[list[Event[dict[str, Any]]]], Iterator[Event[dict[str, Any]]]]]
ONLY_NEW_EVENTS = [only_new_events, api.only_new_events]
ONLY_NEW_EVENTS_IDS = ["spark_decl", "api"]


def claimed_keys() -> list[str]:
    return sorted(EventRecord.objects.values_list("key", flat=True))


def take_one(events: Iterator[Event[dict[str, Any]]], stop: str) -> str:
    """The key of the first event, the consumer then stopping as ``stop`` says."""
    if stop == "close":
        assert isinstance(events, Generator)
        first: Event[dict[str, Any]] = next(events)
        events.close()
        return first["key"]
    for new in events:
        return new["key"]  # the for loop's break
    raise AssertionError("nothing was yielded")


@pytest.mark.parametrize("only_new", ONLY_NEW_EVENTS, ids=ONLY_NEW_EVENTS_IDS)
@pytest.mark.parametrize("stop", ["break", "close"])
@pytest.mark.django_db(transaction=True)
def test_a_consumer_that_stops_after_one_event_leaves_the_rest_new(
    recorder: list[str],
    only_new: Callable[[list[Event[dict[str, Any]]]], Iterator[Event[dict[str, Any]]]],
    stop: str,
) -> None:
    events = [event("g", n) for n in range(4)]
    assert take_one(only_new(events), stop) == "g_0"
    assert claimed_keys() == ["g_0"]
    # The event the consumer got owes its handler call, which the retry makes.
    assert handler_statuses("g_0") == {"tests.test_claims.recorder.<locals>.record": "pending"}
    call_command("retry_spark_events", "--stale-after", "0", stdout=StringIO())
    assert recorder == ["g_0"]
    assert [new["key"] for new in only_new(events)] == ["g_1", "g_2", "g_3"]


@pytest.mark.parametrize("only_new", ONLY_NEW_EVENTS, ids=ONLY_NEW_EVENTS_IDS)
@pytest.mark.django_db(transaction=True)
def test_a_consumer_that_raises_leaves_the_rest_new(
    only_new: Callable[[list[Event[dict[str, Any]]]], Iterator[Event[dict[str, Any]]]],
) -> None:
    events = [event("g", n) for n in range(4)]

    def fail_on_the_second() -> None:
        for new in only_new(events):
            if new["key"] == "g_1":
                raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_on_the_second()
    assert claimed_keys() == ["g_0", "g_1"]
    assert [new["key"] for new in only_new(events)] == ["g_2", "g_3"]


@pytest.mark.django_db(transaction=True)
def test_a_consumer_that_stops_inside_a_transaction_commits_only_what_it_got(
    settings: Settings,
) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 3}
    events = [event("g", n) for n in range(5)]
    with transaction.atomic():
        new = only_new_events(events)
        assert [next(new)["key"], next(new)["key"]] == ["g_0", "g_1"]
    assert claimed_keys() == ["g_0", "g_1"]


@pytest.mark.django_db(transaction=True)
def test_a_key_claimed_elsewhere_after_the_chunk_was_read_is_not_yielded() -> None:
    new = only_new_events([event("g", n) for n in range(4)])
    assert next(new)["key"] == "g_0"
    # Another claimer takes g_2 while the consumer works on g_0: the unique key decides.
    assert [e["key"] for e in only_new_events([event("g", 2)])] == ["g_2"]
    assert [e["key"] for e in new] == ["g_1", "g_3"]


@pytest.mark.django_db(transaction=True)
def test_seen_keys_cost_one_read_per_chunk_and_no_claim(settings: Settings) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 10}
    list(only_new_events([event("g", n) for n in range(0, 20, 2)]))
    table = EventRecord._meta.db_table
    with CaptureQueriesContext(connection) as context:
        new = [e["key"] for e in only_new_events([event("g", n) for n in range(20)])]
    assert new == [f"g_{n}" for n in range(1, 20, 2)]
    statements = [query["sql"] for query in context.captured_queries]
    assert sum(sql.startswith("SELECT") and table in sql for sql in statements) == 2
    assert sum(sql.startswith(f'INSERT INTO "{table}"') for sql in statements) == 10


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "atomic"])
@pytest.mark.django_db(transaction=True)
def test_process_events_of_only_new_events_handles_each_event_once(
    recorder: list[str], settings: Settings, in_transaction: bool
) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 2}
    events = [event("g", n) for n in (1, 2, 1, 3, 2, 4, 5)]
    for _ in range(2):
        with transaction.atomic() if in_transaction else nullcontext():
            process_events(only_new_events(events))
    assert recorder == ["g_1", "g_2", "g_3", "g_4", "g_5"]
    assert set(all_calls().values()) == {"done"}


@pytest.mark.django_db(transaction=True)
def test_a_claim_in_a_transaction_of_its_own_is_made_again_after_a_deadlock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = FailStatements(times=2)
    with connection.execute_wrapper(failing):
        claimed = list(only_new_events([event("g", 2), event("g", 1)]))
    assert [e["key"] for e in claimed] == ["g_2", "g_1"]
    # only_new_events claims one event at a time: g_2 twice in vain, then g_2 and g_1.
    assert failing.seen == 4
    assert sorted(EventRecord.objects.values_list("key", flat=True)) == ["g_1", "g_2"]
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2
    assert "g_2" in warnings[0]
    assert "40P01" in warnings[0]


@pytest.mark.django_db(transaction=True)
def test_a_claim_that_keeps_failing_gives_up_after_a_few_attempts() -> None:
    failing = FailStatements(times=100, sqlstate="40001")
    with pytest.raises(OperationalError), connection.execute_wrapper(failing):
        list(only_new_events([event("g", 1)]))
    assert failing.seen == claims.CLAIM_ATTEMPTS > 1
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_deadlock_inside_the_callers_transaction_propagates_as_a_database_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing can be retried inside a transaction that is not spark_decl's: the whole
    transaction is aborted, so the error is the caller's, as any query's would be."""
    failing = FailStatements()
    with (
        pytest.raises(OperationalError, match="deadlock detected"),
        connection.execute_wrapper(failing),
        transaction.atomic(),
    ):
        list(only_new_events([event("g", 1)]))
    assert failing.seen == 1
    assert retry_warnings(caplog) == []
    assert not EventRecord.objects.exists()
