"""Metrics: the ``events_claimed`` and ``call_finished`` signals, spark_decl.opentelemetry,
and docs/metrics.rst's Prometheus recipe (tests/testapp/metrics.py), scraped."""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.test.utils import override_settings
from django.urls import path
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl import opentelemetry as spark_otel
from spark_decl.registry import Registry
from spark_decl.signals import call_finished, events_claimed
from tests.conftest import CHALLENGE_HANDLER, handler_statuses, logged_keys
from tests.settings import BASE_DIR
from tests.testapp.models import Challenge, HandlerLog

FLAKY = "tests.test_metrics.flaky"
BROKEN = "tests.test_metrics.broken"
WELCOME = "tests.test_metrics.send_welcome"

# flaky() fails while this holds the key of the event it is called for.
failing_keys: set[str] = set()


# Module-level handlers, as users write them in spark.py: background tasks and retries
# find them by name.
def flaky(event: Event[Any]) -> None:
    HandlerLog.objects.create(handler="flaky", key=event["key"])
    if event["key"] in failing_keys:
        raise RuntimeError(f"flaky failed for {event['key']}")


def broken(event: Event[Any]) -> None:
    raise RuntimeError("broken")


def send_welcome(event: Event[Any]) -> None:
    HandlerLog.objects.create(handler="send_welcome", key=event["key"])


@pytest.fixture
def claimed() -> Iterator[list[dict[str, int]]]:
    received: list[dict[str, int]] = []

    def receiver(sender: object, counts: dict[str, int], **kwargs: Any) -> None:
        assert sender is None
        received.append(counts)

    events_claimed.connect(receiver)
    yield received
    events_claimed.disconnect(receiver)


@pytest.fixture
def finished() -> Iterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        assert sender is None
        received.append(kwargs)

    call_finished.connect(receiver)
    yield received
    call_finished.disconnect(receiver)


@pytest.fixture
def flaky_handler(isolated_registry: Registry) -> Iterator[None]:
    handles(r"^job_")(flaky)
    yield
    failing_keys.clear()


def summary(calls: list[dict[str, Any]]) -> list[tuple[str, str, str, int, bool]]:
    return [
        (c["event"]["key"], c["handler"], c["status"], c["attempt"], c["background"])
        for c in calls
    ]


# -- events_claimed ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_claimed_counts_new_keys_per_group(claimed: list[dict[str, int]]) -> None:
    first = Challenge.objects.create(title="a")
    assert claimed == [{"challenge_created": 1}]

    first.save()  # its key is claimed already
    Challenge.objects.create(title="b")
    assert claimed == [{"challenge_created": 1}, {"challenge_created": 1}]


@pytest.mark.django_db(transaction=True)
def test_claimed_counts_a_batch_chunk_by_group_without_keys_seen_before(
    claimed: list[dict[str, int]],
) -> None:
    past = dt.date.today() - dt.timedelta(days=3)
    challenges = [Challenge.objects.create(title=title) for title in "abc"]
    Challenge.objects.filter(pk__in=[c.pk for c in challenges[:2]]).update(end_date=past)
    claimed.clear()

    call_command("process_spark_sources", verbosity=0)
    # One chunk, one claim: the three challenge_created keys were claimed by the saves.
    assert claimed == [{"challenge_ended": 2}]
    call_command("process_spark_sources", verbosity=0)
    assert claimed == [{"challenge_ended": 2}]


@pytest.mark.django_db(transaction=True)
def test_claimed_is_sent_once_the_claiming_transaction_commits(
    claimed: list[dict[str, int]],
) -> None:
    with transaction.atomic():
        keys = [e["key"] for e in only_new_events([event("job_a", 1), event("job_b", 1)])]
        assert keys == ["job_a_1", "job_b_1"]
        assert claimed == []
    assert claimed == [{"job_a": 1}, {"job_b": 1}]


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_claim_is_not_counted(claimed: list[dict[str, int]]) -> None:
    class Rollback(Exception):
        pass

    def claim_and_roll_back() -> None:
        with transaction.atomic():
            list(only_new_events([event("job_a", 1)]))
            Challenge.objects.create(title="a")
            raise Rollback

    with pytest.raises(Rollback):
        claim_and_roll_back()
    assert claimed == []


@pytest.mark.django_db(transaction=True)
def test_the_events_of_a_save_in_a_transaction_are_counted_after_its_commit(
    claimed: list[dict[str, int]],
) -> None:
    with transaction.atomic():
        Challenge.objects.create(title="a")
        Challenge.objects.create(title="b")
        assert claimed == []
    # The transaction's outbox is claimed in one statement.
    assert claimed == [{"challenge_created": 2}]


# -- call_finished -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_call_that_succeeded(finished: list[dict[str, Any]]) -> None:
    challenge = Challenge.objects.create(title="a")
    key = f"challenge_created_{challenge.pk}"
    assert summary(finished) == [(key, CHALLENGE_HANDLER, "done", 1, False)]
    assert finished[0]["group"] == "challenge_created"
    assert finished[0]["event"]["context"]["challenge"] is challenge
    assert isinstance(finished[0]["duration"], float)
    assert finished[0]["duration"] >= 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("flaky_handler")
def test_a_failed_call_and_its_retries(
    settings: Any, finished: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    settings.SPARK_DECL = {"MAX_ATTEMPTS": 3}
    failing_keys.update({"job_a_1", "job_a_2"})
    with caplog.at_level(logging.CRITICAL, logger="spark_decl"):
        process_events(only_new_events([event("job_a", 1), event("job_a", 2)]))
        assert summary(finished) == [
            ("job_a_1", FLAKY, "failed", 1, False),
            ("job_a_2", FLAKY, "failed", 1, False),
        ]
        finished.clear()

        failing_keys.discard("job_a_2")
        call_command("retry_spark_events", verbosity=0)
        assert summary(finished) == [
            ("job_a_1", FLAKY, "failed", 2, False),
            ("job_a_2", FLAKY, "done", 2, False),
        ]
        finished.clear()

        call_command("retry_spark_events", "--all", verbosity=0)  # not waiting out the backoff
    assert summary(finished) == [("job_a_1", FLAKY, "given_up", 3, False)]
    assert handler_statuses("job_a_1") == {FLAKY: "given_up"}
    assert all(call["duration"] >= 0 for call in finished)


@pytest.mark.django_db(transaction=True)
def test_a_call_that_failed_on_its_only_attempt_is_given_up(
    isolated_registry: Registry, settings: Any, finished: list[dict[str, Any]]
) -> None:
    settings.SPARK_DECL = {"MAX_ATTEMPTS": 1}
    handles(r"^job_")(broken)
    process_events(only_new_events([event("job_a", 1)]))
    assert summary(finished) == [("job_a_1", BROKEN, "given_up", 1, False)]
    assert handler_statuses("job_a_1") == {BROKEN: "given_up"}


@pytest.mark.django_db(transaction=True)
def test_a_failed_call_of_an_unclaimed_event_stays_failed(
    isolated_registry: Registry, settings: Any, finished: list[dict[str, Any]]
) -> None:
    settings.SPARK_DECL = {"MAX_ATTEMPTS": 1}
    handles(r"^job_")(broken)
    process_events([event("job_a", 1)])  # no claim, no row: nothing gives it up
    assert summary(finished) == [("job_a_1", BROKEN, "failed", 1, False)]


@pytest.mark.django_db(transaction=True)
def test_a_background_call_run_by_the_tasks_framework(
    isolated_registry: Registry, finished: list[dict[str, Any]]
) -> None:
    handles(r"^challenge_created$", background=True)(send_welcome)
    challenge = Challenge.objects.create(title="a")
    key = f"challenge_created_{challenge.pk}"
    # The immediate backend runs the task in this process, once the claim commits.
    assert sorted(summary(finished), key=lambda call: call[4]) == [
        (key, CHALLENGE_HANDLER, "done", 1, False),
        (key, WELCOME, "done", 1, True),
    ]
    assert logged_keys("send_welcome") == [key]


@pytest.mark.django_db(transaction=True)
def test_raising_receivers_break_no_claim_and_no_call(
    finished: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    def bad_receiver(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver broke")

    events_claimed.connect(bad_receiver)
    call_finished.connect(bad_receiver)
    try:
        with caplog.at_level(logging.ERROR):
            first = Challenge.objects.create(title="a")
            with transaction.atomic():
                second = Challenge.objects.create(title="b")
    finally:
        events_claimed.disconnect(bad_receiver)
        call_finished.disconnect(bad_receiver)
    keys = [f"challenge_created_{first.pk}", f"challenge_created_{second.pk}"]
    assert logged_keys() == keys
    assert [handler_statuses(key) for key in keys] == [{CHALLENGE_HANDLER: "done"}] * 2
    # The receiver connected before the raising one got every call.
    assert [call["event"]["key"] for call in finished] == keys
    # Logged by Django's send_robust(), once per signal sent.
    errors = [r for r in caplog.records if r.name == "django.dispatch"]
    assert len(errors) == 4
    assert all("bad_receiver" in r.getMessage() for r in errors)


@pytest.mark.django_db(transaction=True)
def test_a_receiver_that_breaks_the_database_breaks_no_call(
    finished: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Receivers run after spark_decl's transaction: a failed query of theirs cannot make it
    roll back (on PostgreSQL a failed statement aborts the transaction it is in)."""

    def bad_query(sender: object, **kwargs: Any) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")

    call_finished.connect(bad_query)
    try:
        with caplog.at_level(logging.CRITICAL):
            challenge = Challenge.objects.create(title="a")
    finally:
        call_finished.disconnect(bad_query)
    key = f"challenge_created_{challenge.pk}"
    assert logged_keys() == [key]
    assert handler_statuses(key) == {CHALLENGE_HANDLER: "done"}


# -- spark_decl.opentelemetry ----------------------------------------------------------------


@pytest.fixture
def otel() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    spark_otel.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    yield reader
    spark_otel.uninstrument()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Each metric's data points (the SDK's cumulative sums and histograms), by name."""
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    if data is None:  # nothing recorded
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "spark_decl"
            for metric in scope_metrics.metrics:
                found[metric.name] = list(metric.data.data_points)
    return found


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("flaky_handler")
def test_opentelemetry_records_claims_calls_and_durations(
    otel: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    failing_keys.add("job_a_1")
    with caplog.at_level(logging.CRITICAL, logger="spark_decl"):
        Challenge.objects.create(title="a")
        process_events(only_new_events([event("job_a", 1), event("job_a", 2)]))
        call_command("retry_spark_events", verbosity=0)

    found = points(otel)
    claimed = {p.attributes["group"]: p.value for p in found["spark_decl.events.claimed"]}
    assert claimed == {"challenge_created": 1, "job_a": 2}
    calls = {
        (p.attributes["handler"], p.attributes["status"], p.attributes["retry"]): p.value
        for p in found["spark_decl.calls"]
    }
    assert calls == {
        (CHALLENGE_HANDLER, "done", False): 1,
        (FLAKY, "done", False): 1,
        (FLAKY, "failed", False): 1,
        (FLAKY, "failed", True): 1,
    }
    durations = found["spark_decl.call.duration"]
    by_status = {(p.attributes["handler"], p.attributes["status"]): p for p in durations}
    assert {key: p.count for key, p in by_status.items()} == {
        (CHALLENGE_HANDLER, "done"): 1,
        (FLAKY, "done"): 1,
        (FLAKY, "failed"): 2,
    }
    assert all(p.sum >= 0 for p in durations)
    assert durations[0].explicit_bounds[0] == 0.005  # seconds, not the SDK's milliseconds


@pytest.mark.django_db(transaction=True)
def test_instrumenting_again_records_on_the_new_provider_only(
    otel: InMemoryMetricReader,
) -> None:
    second = InMemoryMetricReader()
    spark_otel.instrument(meter_provider=MeterProvider(metric_readers=[second]))
    Challenge.objects.create(title="a")
    assert "spark_decl.calls" not in points(otel)
    assert [p.value for p in points(second)["spark_decl.calls"]] == [1]

    spark_otel.uninstrument()
    Challenge.objects.create(title="b")
    assert [p.value for p in points(second)["spark_decl.calls"]] == [1]


def test_without_opentelemetry_spark_decl_works_and_the_module_names_the_extra() -> None:
    # A fresh interpreter in which "import opentelemetry" fails, as where it is not installed.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["opentelemetry"] = None
        import django
        django.setup()
        import spark_decl, spark_decl.signals, spark_decl.tasks
        try:
            import spark_decl.opentelemetry
        except ImportError as exc:
            print(exc)
        """
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == (
        "spark_decl.opentelemetry needs the OpenTelemetry API, which the extra "
        "spark_decl[opentelemetry] installs: pip install 'spark-decl[opentelemetry]'"
    )


# -- the Prometheus recipe (docs/metrics.rst) ----------------------------------------------


@pytest.fixture
def recipe() -> Iterator[tuple[ModuleType, CollectorRegistry]]:
    """tests/testapp/metrics.py, its receivers connected (by its import, or again) and its
    metrics emptied and registered in a registry of the test's own."""
    module = importlib.import_module("tests.testapp.metrics")
    events_claimed.connect(module.count_claimed)
    call_finished.connect(module.observe_call)
    registry = CollectorRegistry()
    for metric in (module.EVENTS_CLAIMED, module.CALLS, module.CALL_DURATION):
        metric.clear()
        registry.register(metric)
    yield module, registry
    events_claimed.disconnect(module.count_claimed)
    call_finished.disconnect(module.observe_call)


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus' text format, parsed: ``{(sample name, labels): value}``."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("flaky_handler")
def test_the_prometheus_recipe(
    recipe: tuple[ModuleType, CollectorRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    _, registry = recipe
    failing_keys.add("job_a_1")
    with caplog.at_level(logging.CRITICAL, logger="spark_decl"):
        Challenge.objects.create(title="a")
        Challenge.objects.create(title="b")
        process_events(only_new_events([event("job_a", 1), event("job_a", 1)]))
        call_command("retry_spark_events", verbosity=0)

    samples = scrape(generate_latest(registry).decode())
    assert samples[("spark_decl_events_claimed_total", labels(group="challenge_created"))] == 2
    assert samples[("spark_decl_events_claimed_total", labels(group="job_a"))] == 1
    calls = {
        (dict(key)["handler"], dict(key)["status"], dict(key)["retry"]): value
        for (name, key), value in samples.items()
        if name == "spark_decl_calls_total"
    }
    assert calls == {
        (CHALLENGE_HANDLER, "done", "false"): 2,
        (FLAKY, "failed", "false"): 1,
        (FLAKY, "failed", "true"): 1,
    }
    done = labels(handler=CHALLENGE_HANDLER, group="challenge_created", status="done")
    assert samples[("spark_decl_call_duration_seconds_count", done)] == 2
    assert samples[("spark_decl_call_duration_seconds_sum", done)] >= 0
    assert samples[("spark_decl_call_duration_seconds_bucket", done | {("le", "+Inf")})] == 2


def metrics_view(request: HttpRequest) -> HttpResponse:
    # Imported when called: importing the recipe connects its receivers.
    view = importlib.import_module("tests.testapp.metrics").metrics_view
    response: HttpResponse = view(request)
    return response


urlpatterns = [path("metrics", metrics_view)]


@pytest.mark.django_db(transaction=True)
@override_settings(ROOT_URLCONF="tests.test_metrics")
def test_the_prometheus_recipe_view_serves_the_metrics(
    recipe: tuple[ModuleType, CollectorRegistry], client: Client
) -> None:
    Challenge.objects.create(title="a")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    handled = labels(
        handler=CHALLENGE_HANDLER, group="challenge_created", status="done", retry="false"
    )
    assert scrape(response.content.decode())[("spark_decl_calls_total", handled)] == 1
