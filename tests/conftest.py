"""Fixtures and helpers shared by the test modules (imported as ``tests.conftest``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import OperationalError
from django.test import Client

from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry, registry
from tests.testapp.models import HandlerLog
from tests.workers import Workers

CHALLENGE_HANDLER = "tests.testapp.spark.log_challenge_event"


@pytest.fixture
def pool(tmp_path: Path, transactional_db: None) -> Iterator[Workers]:
    """Worker subprocesses on the test database (tests/workers.py), all stopped afterwards."""
    pool = Workers(tmp_path)
    yield pool
    pool.stop_all()


@pytest.fixture
def isolated_registry() -> Iterator[Registry]:
    """The real registry (autodiscovered testapp.spark included); registrations made in the
    test are dropped afterwards."""
    with registry.isolated() as isolated:
        yield isolated


def staff(*permissions: str) -> Client:
    """A logged-in staff user (not a superuser) holding ``permissions`` (codenames)."""
    user = User.objects.create_user(username=f"staff_{'_'.join(permissions)}", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="spark_decl", codename__in=permissions)
    )
    client = Client()
    client.force_login(user)
    return client


def clear_tables() -> None:
    """Empty what handlers and claims write; for hypothesis examples sharing one test DB."""
    HandlerOutcome.objects.all().delete()
    EventRecord.objects.all().delete()
    HandlerLog.objects.all().delete()


def logged_keys(handler: str = "log_challenge_event") -> list[str]:
    """Keys the test app's handler ``handler`` wrote to HandlerLog, in write order."""
    return list(
        HandlerLog.objects.filter(handler=handler).order_by("pk").values_list("key", flat=True)
    )


def handler_statuses(key: str) -> dict[str, str]:
    """Each handler's status for the event ``key``: its outcome row's."""
    return EventRecord.objects.get(key=key).handler_statuses()


def all_calls() -> dict[tuple[str, str], str]:
    """Every recorded handler call, ``(key, handler) -> status``."""
    return {
        (key, handler): status
        for key, handler, status in HandlerOutcome.objects.values_list(
            "record__key", "handler", "status"
        )
    }


# What a claim sends: the INSERT of its keys into EventRecord.
CLAIM_STATEMENT = 'INSERT INTO "spark_decl_eventrecord"'


class DriverError(Exception):
    """An error as the database driver raises it: psycopg 3 gives its SQLSTATE as
    ``sqlstate`` (psycopg2 as ``pgcode``)."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class FailStatements:
    """An execute wrapper (``connection.execute_wrapper(FailStatements())``) that fails the
    first ``times`` statements starting with ``prefix`` as PostgreSQL fails the victim of a
    deadlock (SQLSTATE 40P01, or e.g. 40001 for a serialization failure): Django's
    ``OperationalError``, caused by the driver's error. ``seen`` counts those statements.
    On SQLite too, which never fails a transaction so."""

    def __init__(
        self, prefix: str = CLAIM_STATEMENT, *, times: int = 1, sqlstate: str = "40P01"
    ) -> None:
        self.prefix = prefix
        self.times = times
        self.sqlstate = sqlstate
        self.seen = 0

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if sql.startswith(self.prefix):
            self.seen += 1
            if self.seen <= self.times:
                cause = DriverError("deadlock detected", self.sqlstate)
                raise OperationalError("deadlock detected") from cause
        return execute(sql, params, many, context)


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages with which spark_decl announced that it runs a claim again."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "spark_decl" and record.levelno == logging.WARNING
    ]
