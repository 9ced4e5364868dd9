"""What SQLite and PostgreSQL do differently, behind one object per vendor.

The logic never asks ``connection.vendor``: it asks :func:`vendor_of` for a
:class:`Vendor` and uses its capabilities and statements, as django-tasks' backends expose
``supports_defer`` and friends. Every other database is refused here, with
:class:`~spark_decl.exceptions.UnsupportedDatabase` (system check ``spark_decl.E001``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar, cast

from .exceptions import UnsupportedDatabase

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.utils import CursorWrapper
    from django.db.models import Field, Model

MIN_SQLITE = (3, 35, 0)  # INSERT ... ON CONFLICT ... RETURNING
#: Parameters a statement spark_decl writes by hand may bind, whatever the database:
#: SQLite's historic floor (999) is below every supported backend's limit.
MAX_PARAMETERS = 999
# psycopg caches how it converts a statement with at most this many parameters, and parses
# a longer one anew every time.
CACHED_PARAMETERS = 50


class Vendor:
    """One database vendor's way of doing what spark_decl needs."""

    name: ClassVar[str]
    #: Placeholders name their column's type (``%s::timestamptz``): every value can travel
    #: as text, and many rows as one JSON document (:meth:`insert_rows`).
    typed_parameters: ClassVar[bool]
    #: Many rows whose ids are not wanted are inserted fastest by ``executemany()`` of a
    #: one-row ``INSERT`` (:meth:`insert_rows`).
    executemany_inserts: ClassVar[bool]
    #: The driver's placeholder (:meth:`insert_each` talks to the driver itself).
    placeholder: ClassVar[str]

    def check(self, connection: BaseDatabaseWrapper) -> None:
        """Raise :class:`UnsupportedDatabase` unless this database can claim keys
        atomically."""

    def parameter(self, connection: BaseDatabaseWrapper, value: datetime) -> Any:
        """An aware datetime as :meth:`insert_rows` and raw statements bind it."""
        raise NotImplementedError

    def parameter_limit(self, connection: BaseDatabaseWrapper) -> int:
        """How many parameters one statement may bind."""
        raise NotImplementedError

    def keys_in(self, placeholder: str) -> str:
        """SQL for ``column <this>``: the column is one of the str values of the JSON
        array bound to ``placeholder`` (one parameter however many keys there are)."""
        raise NotImplementedError

    def json_parameter(self, placeholder: str) -> str:
        """``placeholder`` as the value of a JSON column."""
        return placeholder

    def insert_rows(
        self,
        cursor: CursorWrapper,
        model: type[Model],
        fields: tuple[str, ...],
        rows: Sequence[Sequence[Any]],
        *,
        returning: tuple[str, ...] | None = None,
        skip_conflicts_on: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """``INSERT ... [ON CONFLICT (col) DO NOTHING] [RETURNING ...]`` of many rows;
        returns the inserted rows' ``returning`` columns, in no guaranteed order.

        Values must be ready for the database: datetimes through :meth:`parameter`, a JSON
        column's value as JSON text. With ``skip_conflicts_on`` the rows are inserted in
        the order of that column's values: a row whose key another open transaction
        inserted waits for it, holding the keys inserted before; if every claim inserts
        its keys in one order (any total order all processes share), two claims never
        wait for each other in a cycle.

        Multi-row ``VALUES``, in as few statements as the parameter limit allows; with
        :attr:`typed_parameters`, beyond :data:`CACHED_PARAMETERS` parameters the rows
        travel as one JSON document instead (``json_array_elements``): psycopg parses a
        statement with more placeholders anew every time, and quotes each element of a
        text array with a regular expression. Without ``returning``, with
        :attr:`executemany_inserts`: ``executemany()`` of one row's ``INSERT``, which on
        SQLite takes half the time of the same rows in one statement (Django rewrites
        every placeholder of a statement with a regular expression).
        """
        if not rows:
            return []
        if skip_conflicts_on is not None:
            rows = sorted(rows, key=itemgetter(fields.index(skip_conflicts_on)))
        sql = self._statement(cursor.db, model, fields, returning, skip_conflicts_on)
        if returning is None and self.executemany_inserts and len(rows) > 1:
            cursor.executemany(f"{sql.into}VALUES {sql.row}{sql.tail}", rows)
            return []
        if self.typed_parameters and len(rows) * len(fields) > CACHED_PARAMETERS:
            self._insert_json(cursor, model, fields, rows, sql)
            return cursor.fetchall() if returning is not None else []
        per_statement = max(1, self.parameter_limit(cursor.db) // len(fields))
        inserted: list[tuple[Any, ...]] = []
        for start in range(0, len(rows), per_statement):
            batch = rows[start : start + per_statement]
            params = [value for row in batch for value in row]
            values = ", ".join([sql.row] * len(batch))
            cursor.execute(f"{sql.into}VALUES {values}{sql.tail}", params)
            if returning is not None:
                inserted.extend(cursor.fetchall())
        return inserted

    def insert_each(
        self,
        connection: BaseDatabaseWrapper,
        model: type[Model],
        fields: tuple[str, ...],
        rows: Sequence[Sequence[Any]],
        returning: str,
    ) -> list[Any]:
        """Insert ``rows`` one ``INSERT`` each, through the driver's own cursor, in the
        open transaction; return each row's ``returning`` column, in order.

        For a few rows written often (a save's outbox rows): Django's cursor, its wrappers
        and its rewriting of placeholders cost as much again as the statement itself. The
        statement is not seen by ``connection.execute_wrapper()`` nor logged with the
        queries; database errors are Django's all the same.
        """
        key = ("each", self.name, model, fields, returning)
        sql = _RAW.get(key)
        if sql is None:
            parts = self._statement(connection, model, fields, (returning,), None)
            sql = _RAW[key] = f"{parts.into}VALUES {parts.row}{parts.tail}".replace(
                "%s", self.placeholder
            )
        connection.ensure_connection()
        with connection.wrap_database_errors:
            cursor = connection.connection.cursor()
            try:
                found = []
                for row in rows:
                    cursor.execute(sql, row)
                    found.append(cursor.fetchone()[0])
                return found
            finally:
                cursor.close()

    def _insert_json(
        self,
        cursor: CursorWrapper,
        model: type[Model],
        fields: tuple[str, ...],
        rows: Sequence[Sequence[Any]],
        sql: _Insert,
    ) -> None:
        """The rows as one JSON document; a column with one value in every row (a status,
        a timestamp) bound once instead: a chunk's outcome rows vary in two columns of
        nine, and the document is what PostgreSQL spends its time parsing."""
        first = rows[0]
        constant = tuple(
            all(row[index] == first[index] for row in rows) for index in range(len(fields))
        )
        key = ("json", self.name, model, fields, constant)
        select = _RAW.get(key)
        if select is None:
            types = [
                cast("Field[Any, Any]", model._meta.get_field(name)).db_type(cursor.db)
                for name in fields
            ]
            varying = iter(range(len(fields)))
            columns = [
                f"%s::{db_type}" if fixed else f"(r ->> {next(varying)})::{db_type}"
                for db_type, fixed in zip(types, constant, strict=True)
            ]
            select = _RAW[key] = (
                f"SELECT {', '.join(columns)} FROM json_array_elements(%s::json) AS r"
            )
        fixed_values = [value for value, fixed in zip(first, constant, strict=True) if fixed]
        document = json.dumps(
            [
                [value for value, fixed in zip(row, constant, strict=True) if not fixed]
                for row in rows
            ]
        )
        cursor.execute(sql.into + select + sql.tail, [*fixed_values, document])

    def _statement(
        self,
        connection: BaseDatabaseWrapper,
        model: type[Model],
        fields: tuple[str, ...],
        returning: tuple[str, ...] | None,
        skip_conflicts_on: str | None,
    ) -> _Insert:
        key = (model, fields, returning, skip_conflicts_on)
        found = _STATEMENTS.get((self.name, *key))
        if found is not None:
            return found
        meta = model._meta
        columns = {name: cast("Field[Any, Any]", meta.get_field(name)) for name in fields}
        into = (
            f"INSERT INTO {quote(meta.db_table)} "
            f"({', '.join(quote(column.column) for column in columns.values())}) "
        )
        if self.typed_parameters:
            placeholders = [f"%s::{column.db_type(connection)}" for column in columns.values()]
        else:
            placeholders = ["%s"] * len(fields)
        tail = ""
        if skip_conflicts_on is not None:
            tail += f" ON CONFLICT ({column_of(model, skip_conflicts_on)}) DO NOTHING"
        if returning is not None:
            tail += f" RETURNING {', '.join(column_of(model, name) for name in returning)}"
        sql = _Insert(into, f"({', '.join(placeholders)})", tail)
        _STATEMENTS[(self.name, *key)] = sql
        return sql


@dataclass(frozen=True, slots=True)
class _Insert:
    """The parts of :meth:`Vendor.insert_rows`' statements for one table and shape."""

    into: str  # INSERT INTO table (columns)
    row: str  # one row of VALUES: (placeholders)
    tail: str  # ON CONFLICT ... RETURNING ...


_STATEMENTS: dict[tuple[Any, ...], _Insert] = {}
_RAW: dict[tuple[Any, ...], str] = {}


class SQLite(Vendor):
    name = "sqlite"
    typed_parameters = False
    executemany_inserts = True
    placeholder = "?"
    _parameter_limit: int | None = None

    def check(self, connection: BaseDatabaseWrapper) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise UnsupportedDatabase(
                f"spark_decl needs SQLite >= {'.'.join(map(str, MIN_SQLITE))} "
                f"(INSERT ... ON CONFLICT ... RETURNING); this Python has "
                f"{sqlite3.sqlite_version}."
            )

    def parameter(self, connection: BaseDatabaseWrapper, value: datetime) -> Any:
        return connection.ops.adapt_datetimefield_value(value)

    def parameter_limit(self, connection: BaseDatabaseWrapper) -> int:
        # The same for every connection of this process (the library's compile-time
        # limit): read once.
        limit = self._parameter_limit
        if limit is None:
            connection.ensure_connection()
            limit = connection.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._parameter_limit = limit
        return limit

    def keys_in(self, placeholder: str) -> str:
        return f'IN (SELECT "value" FROM json_each({placeholder}))'


class PostgreSQL(Vendor):
    name = "postgresql"
    typed_parameters = True
    executemany_inserts = False
    placeholder = "%s"

    def parameter(self, connection: BaseDatabaseWrapper, value: datetime) -> Any:
        return value.isoformat()  # cast to timestamptz by the typed placeholder

    def parameter_limit(self, connection: BaseDatabaseWrapper) -> int:
        return 65_535  # the wire protocol counts parameters in 16 bits

    def keys_in(self, placeholder: str) -> str:
        # An array built once (an InitPlan): the key index is then probed for each key.
        return f"= ANY(ARRAY(SELECT json_array_elements_text({placeholder}::json)))"

    def json_parameter(self, placeholder: str) -> str:
        return f"{placeholder}::jsonb"


# serialization_failure, deadlock_detected: standard SQL, so no vendor method. (SQLite's
# errors carry no SQLSTATE: its writers wait for the one write lock instead.)
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def aborted_for_concurrency(exc: BaseException) -> bool:
    """Whether the database aborted a transaction with ``exc`` only because of what ran
    alongside it (a deadlock, a serialization failure), so that running it again can
    succeed. Told by the SQLSTATE, never by the message, which follows ``lc_messages``."""
    return sqlstate(exc) in RETRYABLE_SQLSTATES


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error as Django raises it: its ``__cause__`` is the
    driver's error, which names it ``sqlstate`` (psycopg 3) or ``pgcode`` (psycopg2)."""
    cause = exc.__cause__
    state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return state if isinstance(state, str) else None


VENDORS: dict[str, Vendor] = {vendor.name: vendor for vendor in (SQLite(), PostgreSQL())}


def vendor_of(connection: BaseDatabaseWrapper) -> Vendor:
    """The :class:`Vendor` of ``connection``, or :class:`UnsupportedDatabase`."""
    vendor = VENDORS.get(connection.vendor)
    if vendor is None:
        raise UnsupportedDatabase(
            f"spark_decl supports SQLite and PostgreSQL; the database {connection.alias!r} "
            f"is {connection.vendor}."
        )
    vendor.check(connection)
    return vendor


def quote(name: str) -> str:
    """An identifier quoted as both vendors quote it."""
    return name if name.startswith('"') and name.endswith('"') else f'"{name}"'


def column_of(model: type[Model], field: str) -> str:
    """The quoted column of ``model``'s field ``field``."""
    return quote(cast("Field[Any, Any]", model._meta.get_field(field)).column)
