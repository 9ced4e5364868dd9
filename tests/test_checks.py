"""System check ``spark_decl.E001``: a database that cannot claim keys atomically."""

from __future__ import annotations

import pytest
from django.core.checks import Error, run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection

import spark_decl.claims
from spark_decl import event, only_new_events
from spark_decl.exceptions import UnsupportedDatabase
from spark_decl.models import EventRecord


def spark_errors() -> list[Error]:
    # Every check runs (Django's JSONField check asks the database about its features).
    return [e for e in run_checks() if isinstance(e, Error) and e.id == "spark_decl.E001"]


@pytest.mark.django_db
def test_no_error_on_the_test_database() -> None:
    assert spark_errors() == []


@pytest.mark.django_db
def test_old_sqlite_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "vendor", "sqlite")
    monkeypatch.setattr(spark_decl.claims, "MIN_SQLITE", (99, 0, 0))
    (error,) = spark_errors()
    assert error.obj == "default"
    assert "SQLite >= 99.0.0" in error.msg
    assert error.hint is not None
    assert "PostgreSQL" in error.hint


@pytest.mark.django_db
def test_another_vendor_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "vendor", "oracle")
    (error,) = spark_errors()
    assert "'default' is oracle" in error.msg
    with pytest.raises(SystemCheckError, match=r"spark_decl\.E001"):
        call_command("check")


@pytest.mark.django_db
def test_claiming_on_an_unsupported_database_raises_before_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "vendor", "sqlite")
    monkeypatch.setattr(spark_decl.claims, "MIN_SQLITE", (99, 0, 0))
    with pytest.raises(UnsupportedDatabase, match=r"SQLite >= 99\.0\.0"):
        list(only_new_events([event("g", 1)]))
    monkeypatch.undo()
    assert not EventRecord.objects.exists()
