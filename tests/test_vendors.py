"""spark_decl.vendors: what SQLite and PostgreSQL do differently, behind one object."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from django.db import OperationalError, connection

from spark_decl import vendors
from spark_decl.exceptions import UnsupportedDatabase
from tests.conftest import DriverError


def test_each_supported_database_has_its_vendor() -> None:
    vendor = vendors.vendor_of(connection)
    assert vendor.name == connection.vendor
    # PostgreSQL's parameters name their type, so that rows can travel as JSON.
    assert vendor.typed_parameters is (connection.vendor == "postgresql")


def test_another_database_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "vendor", "oracle")
    with pytest.raises(UnsupportedDatabase, match="'default' is oracle"):
        vendors.vendor_of(connection)


@pytest.mark.parametrize(
    ("cause", "retryable"),
    [
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),
        (psycopg.errors.SerializationFailure("could not serialize access"), True),
        (DriverError("deadlock detected", "40P01"), True),
        (psycopg.errors.UniqueViolation("duplicate key value"), False),
        (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"), False),
        # A message is not a SQLSTATE: it changes with lc_messages.
        (Exception("deadlock detected"), False),
        (sqlite3.OperationalError("database is locked"), False),
    ],
    ids=repr,
)
def test_only_a_deadlock_or_a_serialization_failure_is_retryable(
    cause: Exception, retryable: bool
) -> None:
    error = OperationalError(str(cause))
    error.__cause__ = cause
    assert vendors.aborted_for_concurrency(error) is retryable


def test_a_psycopg2_error_is_recognised_by_its_pgcode() -> None:
    class Psycopg2Error(Exception):
        pgcode = "40P01"

    error = OperationalError("deadlock detected")
    error.__cause__ = Psycopg2Error("deadlock detected")
    assert vendors.aborted_for_concurrency(error)
