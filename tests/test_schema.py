"""What the migration creates, for the writes each claim makes and the reads that use it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.retry import due_outcomes

pytestmark = pytest.mark.django_db

Status = HandlerOutcome.Status


def fetch_text(sql: str, name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(sql, [name])
        (text,) = cursor.fetchone()
    assert isinstance(text, str)
    return text


def sqlite_schema(name: str) -> str:
    """The ``CREATE`` statement of a table or index, as SQLite keeps it."""
    return fetch_text("SELECT sql FROM sqlite_master WHERE name = %s", name)


def index_definition(name: str) -> str:
    if connection.vendor == "sqlite":
        return sqlite_schema(name)
    return fetch_text("SELECT indexdef FROM pg_indexes WHERE indexname = %s", name)


def one_call_per_status(created_at: datetime) -> None:
    """An event with one outcome row in each status, its handlers h0, h1, ..."""
    record = EventRecord.objects.create(key="k", group="g", created_at=created_at)
    for number, status in enumerate(Status):
        HandlerOutcome.objects.create(
            record=record, handler=f"h{number}", status=status, created_at=created_at
        )


@pytest.mark.parametrize("model", [EventRecord, HandlerOutcome])
def test_ids_cost_no_sequence_write(model: type[EventRecord | HandlerOutcome]) -> None:
    """SQLite: a plain rowid (no AUTOINCREMENT, whose sqlite_sequence update each claim
    would pay); PostgreSQL: the identity column every BigAutoField has."""
    table = model._meta.db_table
    if connection.vendor == "sqlite":
        sql = sqlite_schema(table)
        assert '"id" integer NOT NULL PRIMARY KEY,' in sql
        assert "AUTOINCREMENT" not in sql
    else:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT is_identity FROM information_schema.columns "
                "WHERE table_name = %s AND column_name = 'id'",
                [table],
            )
            assert cursor.fetchone() == ("YES",)


def test_due_index_leaves_out_successful_calls() -> None:
    definition = index_definition("spark_decl_due_idx")
    assert "WHERE" in definition.upper()
    assert "done" in definition


DUE_QUERIES: list[dict[str, Any]] = [
    {},
    {"stale_after": None},
    {"ignore_schedule": True, "include_given_up": True},
    {"stale_after": None, "handler": "tests.testapp.spark.greet"},
]


@pytest.mark.skipif(
    connection.vendor != "sqlite",
    reason="PostgreSQL proves a partial index's condition itself; its plans follow statistics",
)
@pytest.mark.parametrize("options", DUE_QUERIES, ids=lambda options: ",".join(options))
def test_due_query_reads_the_due_index(options: dict[str, Any]) -> None:
    """SQLite uses a partial index only for a query that states its condition: the
    retry's selection must, in each alternative of its OR, or it reads every call."""
    one_call_per_status(timezone.now())

    plan = due_outcomes(**options).explain()

    assert "spark_decl_due_idx" in plan
    assert "SCAN spark_decl_handleroutcome" not in plan


def test_due_query_selects_by_status() -> None:
    """The conditions the query restates for the index change nothing it selects."""
    one_call_per_status(timezone.now() - timedelta(days=1))

    def selected(**options: Any) -> set[str]:
        return {outcome.status for outcome in due_outcomes(**options)}

    assert selected(stale_after=60) == {Status.FAILED, Status.PENDING}
    assert selected(stale_after=None) == {Status.FAILED}
    assert selected(stale_after=None, include_given_up=True) == {
        Status.FAILED,
        Status.GIVEN_UP,
    }


def test_an_event_row_costs_the_index_writes_of_its_key_and_group_only() -> None:
    """The unique key (the claim's arbiter) and the group (retry --group, replay and the
    admin's filter), each once: no PostgreSQL "_like" index, which a field's unique=True or
    db_index=True would add. ``created_at`` has none: "newest first" is "-pk"."""
    table = EventRecord._meta.db_table
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, table)
    indexed = sorted(
        tuple(details["columns"])
        for details in constraints.values()
        if details["index"] or details["unique"] or details["primary_key"]
    )
    assert indexed == [("group",), ("id",), ("key",)]
    assert EventRecord._meta.ordering == ["-pk"]


def test_an_event_inserted_by_plain_sql_owes_nothing() -> None:
    """SQL outside spark_decl (such as the migration guide's copy of django-spark's keys)
    inserts events with the four columns it knows."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {EventRecord._meta.db_table} "
            '("key", "group", "context", "created_at") VALUES (%s, %s, %s, %s)',
            ["raw_1", "raw", "{}", timezone.now()],
        )
    record = EventRecord.objects.get(key="raw_1")
    assert record.handler_statuses() == {}
