"""spark_decl.health: the numbers behind the dashboard and ``spark_inspect --health``."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.health import (
    PENDING_TOO_LONG,
    WINDOWS,
    Window,
    describe_duration,
    first_id_since,
    health,
    the_last,
)
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from spark_decl.registry import Registry
from tests.conftest import CHALLENGE_HANDLER

pytestmark = pytest.mark.django_db

# 14:20 on a Sunday: the 24h window's buckets are 15:00 yesterday ... 14:00 today.
NOW = datetime(2026, 12, 6, 14, 20, tzinfo=UTC)


def add_event(group: str, at: datetime, calls: dict[str, str] | None = None) -> EventRecord:
    """An event claimed at ``at``, with a call per handler in the given status."""
    record = EventRecord.objects.create(
        key=f"{group}_{EventRecord.objects.count()}", group=group, created_at=at
    )
    for handler, status in (calls or {}).items():
        HandlerOutcome.objects.create(
            record=record,
            handler=handler,
            status=status,
            attempts=0 if status == "pending" else 1,
            created_at=at,
        )
    return record


# -- finding a window's first row ------------------------------------------------------------


def test_first_id_since_finds_the_first_row_of_a_window_by_id() -> None:
    start = NOW - timedelta(days=10)
    records = [add_event("g", start + timedelta(hours=hours)) for hours in range(0, 240, 3)]
    # Gaps in the ids, as deletions (pruning) leave them.
    EventRecord.objects.filter(pk__in=[r.pk for r in records[10:30]]).delete()
    kept = [r for r in records if r not in records[10:30]]
    rows = EventRecord.objects.all()

    for since in (
        start - timedelta(days=1),
        start,
        start + timedelta(hours=1),
        start + timedelta(hours=31),  # inside the deleted stretch
        start + timedelta(hours=150),
        kept[-1].created_at,
    ):
        expected = min(r.pk for r in kept if r.created_at >= since)
        assert first_id_since(rows, since) == expected, since
    assert first_id_since(rows, kept[-1].created_at + timedelta(seconds=1)) is None
    assert first_id_since(EventRecord.objects.none(), start) is None


def test_first_id_since_reads_a_logarithmic_number_of_rows() -> None:
    start = NOW - timedelta(days=1)
    records = [add_event("g", start + timedelta(minutes=minute)) for minute in range(300)]
    id_range = records[-1].pk - records[0].pk
    with CaptureQueriesContext(connection) as queries:
        first_id_since(EventRecord.objects.all(), start + timedelta(minutes=123))
    # min/max, the newest row, one lookup per halving, the answer.
    assert len(queries) <= math.ceil(math.log2(id_range)) + 3
    assert all("LIMIT 1" in query["sql"] or "MAX(" in query["sql"] for query in queries)


@pytest.mark.skipif(
    connection.vendor != "sqlite",
    reason="PostgreSQL's plans follow statistics: benchmarks/health.py shows them on 10M rows",
)
def test_the_open_calls_are_counted_from_the_due_index_alone() -> None:
    add_event("g", NOW - timedelta(hours=1), {"h": "failed", "i": "done", "j": "pending"})
    with CaptureQueriesContext(connection) as queries:
        health("24h", now=NOW)
    (open_calls,) = [q["sql"] for q in queries if "NOT (" in q["sql"] and "COUNT(" in q["sql"]]

    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {open_calls}")
        plan = " ".join(str(row[-1]) for row in cursor.fetchall())

    # A covering index: the table's rows (ten million done calls, say) are not read.
    assert "USING COVERING INDEX spark_decl_due_idx" in plan, plan


# -- the window's numbers ---------------------------------------------------------------


def test_windows_are_aligned_buckets_ending_with_the_current_one() -> None:
    day = WINDOWS["24h"].starts(NOW)
    assert len(day) == 24
    assert day[-1] == datetime(2026, 12, 6, 14, tzinfo=UTC)
    assert day[0] == datetime(2026, 12, 5, 15, tzinfo=UTC)
    week = WINDOWS["7d"].starts(NOW)
    assert len(week) == 28
    assert week[-1] == datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert week[1] - week[0] == timedelta(hours=6)


def test_calls_and_events_per_handler_group_and_bucket(isolated_registry: Registry) -> None:
    send = "tests.test_health.send_reminder"
    handles(r"^reminder")(send_reminder)
    add_event("reminder_due", NOW - timedelta(days=3), {send: "done"})  # outside the 24 h
    add_event("reminder_due", NOW - timedelta(hours=5), {send: "done"})
    add_event("reminder_due", NOW - timedelta(hours=5), {send: "failed"})
    add_event("reminder_due", NOW - timedelta(minutes=30), {send: "given_up"})
    add_event("reminder_due", NOW - timedelta(minutes=10), {send: "done"})
    add_event("challenge_created", NOW - timedelta(minutes=5), {CHALLENGE_HANDLER: "pending"})

    found = health("24h", now=NOW)

    assert [group.name for group in found.groups] == ["challenge_created", "reminder_due"]
    reminders = found.groups[1]
    assert reminders.events == 4
    assert reminders.handlers == [send]
    assert reminders.timeline[-1] == 1  # 14:00 - 15:00: 14:10
    assert reminders.timeline[-2] == 1  # 13:50
    assert reminders.timeline[-6] == 2  # 09:00 - 10:00 (14:20 - 5 h = 09:20)
    assert sum(reminders.timeline) == 4
    # Their calls, by state now: "how many reminders went out".
    assert reminders.calls.as_dict() == {"pending": 0, "done": 2, "failed": 1, "given_up": 1}
    assert reminders.call_timeline[-1].as_dict() == {
        "pending": 0,
        "done": 1,
        "failed": 0,
        "given_up": 0,
    }
    assert found.groups[0].calls.as_dict() == {
        "pending": 1,
        "done": 0,
        "failed": 0,
        "given_up": 0,
    }

    by_name = {handler.name: handler for handler in found.handlers}
    # Registered handlers first, in registration order; all of them, even without calls.
    assert [handler.name for handler in found.handlers][:2] == [
        CHALLENGE_HANDLER,
        "tests.testapp.spark.log_donation",
    ]
    reminder = by_name[send]
    assert reminder.window.as_dict() == {"pending": 0, "done": 2, "failed": 1, "given_up": 1}
    assert reminder.timeline[-6].as_dict() == {"pending": 0, "done": 1, "failed": 1, "given_up": 0}
    assert reminder.timeline[-2].as_dict() == {"pending": 0, "done": 0, "failed": 0, "given_up": 1}
    assert reminder.timeline[-1].as_dict() == {"pending": 0, "done": 1, "failed": 0, "given_up": 0}
    # The last hour: one done, one given up.
    assert reminder.recent.failure_rate == 0.5
    assert reminder.first_failure == NOW - timedelta(hours=5)
    assert reminder.last_failure == NOW - timedelta(minutes=30)
    # Open calls count whenever they were claimed.
    assert (reminder.open.failed, reminder.open.given_up, reminder.open.pending) == (1, 1, 0)
    assert reminder.open.oldest_failed == NOW - timedelta(hours=5)
    challenge = by_name[CHALLENGE_HANDLER]
    assert challenge.open.pending == 1
    assert challenge.open.oldest_pending == NOW - timedelta(minutes=5)
    assert challenge.recent.failure_rate is None  # nothing ran yet
    assert found.totals.as_dict() == {"pending": 1, "done": 2, "failed": 1, "given_up": 1}
    assert found.oldest_pending == NOW - timedelta(minutes=5)

    problems = found.problems()
    assert problems[0] == (
        f"{send}: 1 of 2 calls of the last hour failed, since 2026-12-06 09:20 UTC"
    )
    assert f"{send}: 1 calls given up in the last day" in problems
    # Pending for 5 minutes is normal.
    assert not any("pending" in problem for problem in problems)


def test_the_7_day_window_merges_hours_into_its_buckets() -> None:
    add_event("g", NOW - timedelta(days=8), {"h": "done"})
    add_event("g", NOW - timedelta(days=6), {"h": "done"})
    add_event("g", datetime(2026, 12, 6, 13, 59, tzinfo=UTC), {"h": "failed"})
    add_event("g", datetime(2026, 12, 6, 12, 1, tzinfo=UTC), {"h": "done"})

    found = health("7d", now=NOW)

    (group,) = found.groups
    assert group.events == 3
    assert group.timeline[-1] == 2  # 12:00 - 18:00
    (handler,) = [h for h in found.handlers if h.name == "h"]
    assert not handler.registered
    assert handler.timeline[-1].as_dict() == {"pending": 0, "done": 1, "failed": 1, "given_up": 0}
    assert handler.window.total == 3


def test_a_stuck_call_an_unregistered_handler_and_a_stale_outbox_are_problems() -> None:
    add_event("g", NOW - PENDING_TOO_LONG - timedelta(minutes=1), {"gone.handler": "pending"})
    add_event("g", NOW - timedelta(days=30), {"gone.handler": "pending"})
    OutboxEvent.objects.create(key="k", group="g", context={})
    OutboxEvent.objects.update(created_at=NOW - timedelta(hours=2))

    found = health("24h", now=NOW)

    assert found.problems() == [
        "gone.handler: 2 calls pending, the oldest for 30 days",
        "gone.handler: 2 open calls of a handler that is not registered (renamed or removed?)",
        "1 saved events not claimed for 2 h (a crash after a commit?): run retry_spark_events",
    ]
    assert (found.outbox, found.oldest_outbox) == (1, NOW - timedelta(hours=2))


def test_nothing_stored_is_healthy_and_serialisable() -> None:
    found = health("24h", now=NOW)
    assert found.problems() == []
    assert found.groups == []
    assert all(handler.window.total == 0 for handler in found.handlers)
    document = json.loads(json.dumps(found.as_dict()))
    assert document["window"] == "24h"
    assert len(document["buckets"]) == 24
    assert document["handlers"][0]["timeline"][0] == {
        "pending": 0,
        "done": 0,
        "failed": 0,
        "given_up": 0,
    }


def test_an_unknown_window_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown window '1y': choose one of 24h, 7d\."):
        health("1y")


def test_a_custom_window() -> None:
    add_event("g", NOW - timedelta(minutes=50), {"h": "done"})
    found = health(Window("1h", timedelta(hours=1), timedelta(minutes=10)), now=NOW)
    assert len(found.starts) == 6
    (group,) = found.groups
    # TruncHour puts the event in the 13:00 hour: before this window's first bucket
    # (13:30) its events are counted, not placed.
    assert group.events == 1


@pytest.mark.django_db(transaction=True)
def test_real_claims_and_failures(isolated_registry: Registry) -> None:
    handles(r"^order")(refuse_orders)
    process_events(only_new_events([event("order_paid", n) for n in range(3)]))

    found = health()

    (group,) = [g for g in found.groups if g.name == "order_paid"]
    assert group.events == 3
    assert group.timeline[-1] == 3
    (refuse,) = [h for h in found.handlers if h.name == "tests.test_health.refuse_orders"]
    assert refuse.window.failed == 3
    assert refuse.recent.failure_rate == 1.0
    assert refuse.first_failure is not None
    assert found.problems()[0].startswith(
        "tests.test_health.refuse_orders: 3 of 3 calls of the last hour failed, since "
    )


def test_the_last() -> None:
    assert the_last(timedelta(hours=1)) == "the last hour"
    assert the_last(timedelta(hours=6)) == "the last 6 hours"
    assert the_last(timedelta(days=1)) == "the last day"
    assert the_last(timedelta(days=7)) == "the last 7 days"
    assert the_last(timedelta(minutes=90)) == "the last 1 h 30 min"


def test_describe_duration() -> None:
    assert describe_duration(timedelta(seconds=40)) == "40 s"
    assert describe_duration(timedelta(minutes=3, seconds=2)) == "3 min"
    assert describe_duration(timedelta(hours=3, minutes=5)) == "3 h 5 min"
    assert describe_duration(timedelta(hours=2)) == "2 h"
    assert describe_duration(timedelta(days=2, hours=4)) == "2 days 4 h"
    assert describe_duration(timedelta(days=1)) == "1 day"


def send_reminder(event: Event[Any]) -> None:
    pass


def refuse_orders(event: Event[Any]) -> None:
    raise RuntimeError("out of stock")
