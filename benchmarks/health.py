"""``health()`` and ``spark_inspect`` on PostgreSQL with ten million handler calls.

Run by hand, from the repository root (not by ``benchmarks/run.py``)::

    PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres \\
        python -m benchmarks.health [--database spark_health_10m] [--runs 5]
    python -m benchmarks.health --drop          # free the disk (2.8 GB)

The first run creates the database, migrates ``spark_decl`` and fills its tables in SQL
(``INSERT ... SELECT generate_series``, a few minutes; not through the ORM) with
``--events`` events (5,000,000) spread evenly over ``--days`` (365), each with two calls
(10,000,000), ids ascending with ``created_at`` as spark_decl writes them, then
``VACUUM ANALYZE``. Later runs reuse the tables (``--rebuild`` fills them again).

The data: 30 groups (``group_00`` ... ``group_29``, the same number of events each), 10
handlers, each event's two calls going to two of them; the calls' states are spread evenly
over the year, 95 % done, 2 % failed (waiting for a retry), 2.5 % given up, 0.5 % pending.
Half a million open calls is more than a healthy deployment keeps: a pessimistic case for
the query that reads the open calls.

It prints, with ``now`` one minute after the newest event (so a reused table still has full
windows):

* for ``health("24h")`` and ``health("7d")``: the median wall-clock time of ``--runs``
  calls and the number of queries of one call;
* ``EXPLAIN (ANALYZE, BUFFERS)`` of every aggregate query ``health()`` runs (and of one
  step of the binary search finding a window's first id);
* the median time of ``inspect_spark()`` (plain ``spark_inspect``) on the same tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, LiteralString

GROUPS = 30
HANDLERS = 10
HANDLER_PREFIX = "benchmarks.health.handler_"


def postgres_admin(name: str, *statements: LiteralString) -> None:
    """Run ``statements`` (``{}`` standing for the quoted ``name``) on the ``postgres``
    database, connecting as libpq's ``PG*`` environment variables say."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        for statement in statements:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


def database_exists(name: str) -> bool:
    import psycopg

    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
    return row is not None


def build(events: int, days: int) -> None:
    """Fill the (migrated, empty) tables: see the module docstring."""
    from django.db import connection

    end = datetime.now().astimezone().replace(microsecond=0)
    start = end - timedelta(days=days)
    step = timedelta(days=days) / events
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE spark_decl_handleroutcome, spark_decl_eventrecord, "
            "spark_decl_outboxevent RESTART IDENTITY"
        )
        cursor.execute(
            """
            INSERT INTO spark_decl_eventrecord (id, "key", "group", context, created_at)
            SELECT i, 'group_' || lpad((i %% %(groups)s)::text, 2, '0') || '_' || i,
                   'group_' || lpad((i %% %(groups)s)::text, 2, '0'), '{}'::jsonb,
                   %(start)s + (i - 1) * %(step)s
            FROM generate_series(1, %(events)s) AS i
            """,
            params(groups=GROUPS, start=start, step=step, events=events),
        )
        print(f"  {events:,} events in {time.perf_counter() - started:.0f} s", flush=True)
        # Call j belongs to event (j + 1) / 2; its handler is one of the two its group's
        # number picks; its state a permutation of j modulo 1000 (exact shares, spread).
        cursor.execute(
            """
            INSERT INTO spark_decl_handleroutcome (
                id, record_id, handler, status, attempts, last_error, traceback,
                created_at, finished_at, next_attempt_at
            )
            SELECT j, r, %(prefix)s || ((r %% %(groups)s + j %% 2) %% %(handlers)s),
                   s, CASE s WHEN 'pending' THEN 0 WHEN 'done' THEN 1
                             WHEN 'failed' THEN 2 ELSE 5 END,
                   CASE WHEN s IN ('failed', 'given_up') THEN 'RuntimeError: boom' ELSE '' END,
                   CASE WHEN s IN ('failed', 'given_up')
                        THEN 'Traceback (most recent call last): ...' ELSE '' END,
                   at,
                   CASE WHEN s = 'pending' THEN NULL ELSE at + interval '1 second' END,
                   CASE WHEN s = 'failed' THEN at + interval '1 hour' END
            FROM (
                SELECT j, (j + 1) / 2 AS r, %(start)s + ((j + 1) / 2 - 1) * %(step)s AS at,
                       CASE WHEN j * 2654435761 %% 1000 < 950 THEN 'done'
                            WHEN j * 2654435761 %% 1000 < 970 THEN 'failed'
                            WHEN j * 2654435761 %% 1000 < 995 THEN 'given_up'
                            ELSE 'pending' END AS s
                FROM generate_series(1::bigint, %(calls)s) AS j
            ) AS calls
            """,
            params(
                prefix=HANDLER_PREFIX,
                groups=GROUPS,
                handlers=HANDLERS,
                start=start,
                step=step,
                calls=2 * events,
            ),
        )
        print(f"  {2 * events:,} calls in {time.perf_counter() - started:.0f} s", flush=True)
        for table in ("spark_decl_eventrecord", "spark_decl_handleroutcome"):
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
            )
    connection.close()
    with connection.cursor() as cursor:
        # Outside a transaction (autocommit): the visibility map lets index-only scans skip
        # the heap, as it would on a table autovacuum keeps up with.
        cursor.execute("VACUUM ANALYZE spark_decl_eventrecord, spark_decl_handleroutcome")
        # Measured: right after the fill the first VACUUM left most pages not all-visible
        # (the backlog's scan then fetched 204,214 heap rows); a second one sets them.
        cursor.execute("VACUUM spark_decl_handleroutcome")
    print(f"  VACUUM ANALYZE done at {time.perf_counter() - started:.0f} s", flush=True)


def params(**values: Any) -> dict[str, Any]:
    """Named query parameters (django-stubs' cursor types leave out timedelta)."""
    return values


def register_handlers() -> None:
    """The ten handlers the calls name, each for the groups whose calls it has."""
    from spark_decl.registry import registry

    def make(number: int) -> Callable[[object], None]:
        def handler(event: object) -> None:
            pass

        handler.__module__ = "benchmarks.health"
        handler.__name__ = handler.__qualname__ = f"handler_{number}"
        return handler

    functions = [make(number) for number in range(HANDLERS)]
    for group in range(GROUPS):
        for offset in (0, 1):
            registry.add_handler(f"^group_{group:02}$", functions[(group + offset) % HANDLERS])


@contextmanager
def captured() -> Generator[list[tuple[str, Any, float]]]:
    """The SQL, parameters and wall-clock time of every query run inside the block (the
    time of ``execute``, which with psycopg's client-side cursors includes the transfer of
    the rows)."""
    from django.db import connection

    queries: list[tuple[str, Any, float]] = []

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        started = time.perf_counter()
        result = execute(sql, params, many, context)
        queries.append((sql, params, time.perf_counter() - started))
        return result

    with connection.execute_wrapper(wrapper):
        yield queries


def timed(function: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def explain(sql: str, params: Any) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


def is_aggregate(sql: str) -> bool:
    return "GROUP BY" in sql or "COUNT(" in sql


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--database", default="spark_health_10m")
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="fill the tables again")
    parser.add_argument("--drop", action="store_true", help="drop the database and exit")
    args = parser.parse_args()

    if args.drop:
        postgres_admin(args.database, "DROP DATABASE IF EXISTS {} WITH (FORCE)")
        print(f"dropped {args.database}")
        return
    os.environ["BENCH_DB_VENDOR"] = "postgresql"
    os.environ["BENCH_DB_NAME"] = args.database
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings.spark_decl"
    fresh = not database_exists(args.database)
    if fresh:
        postgres_admin(args.database, "CREATE DATABASE {}")

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from spark_decl.health import health
    from spark_decl.inspection import inspect_spark
    from spark_decl.models import EventRecord, HandlerOutcome

    call_command("migrate", "spark_decl", verbosity=0)
    if fresh or args.rebuild or not EventRecord.objects.exists():
        print(f"Filling {args.database}: {args.events:,} events over {args.days} days")
        build(args.events, args.days)
    register_handlers()

    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        version = cursor.fetchone()[0].split(" on ")[0]
        cursor.execute("SHOW fsync")
        fsync = cursor.fetchone()[0]
        cursor.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
        size = cursor.fetchone()[0]
    newest = EventRecord.objects.order_by("-pk").values_list("created_at", flat=True)[0]
    now = newest + timedelta(minutes=1)
    calls, events = HandlerOutcome.objects.count(), EventRecord.objects.count()
    print(
        f"{version}, fsync={fsync}, database {args.database} {size}: {calls:,} calls, "
        f"{events:,} events, now = {now:%Y-%m-%d %H:%M}; {os.cpu_count()} CPUs; "
        f"median of {args.runs} runs\n"
    )

    for window in ("24h", "7d"):
        health(window, now=now)  # warm the cache: the runs are the steady state
        with captured() as queries:
            found = health(window, now=now)
        median, times = timed(lambda: health(window, now=now), args.runs)  # noqa: B023
        print(
            f'health("{window}"): {median * 1e3:.0f} ms median '
            f"({', '.join(f'{t * 1e3:.0f}' for t in times)}), {len(queries)} queries; "
            f"{found.totals.total:,} calls in the window, {len(found.problems())} problems"
        )
        lookups = [query for query in queries if not is_aggregate(query[0])]
        print(
            f"  {len(lookups)} lookups finding the windows' first ids: "
            f"{sum(query[2] for query in lookups) * 1e3:.1f} ms"
        )
        shown = [query for query in queries if is_aggregate(query[0])] + lookups[1:2]
        for sql, params, seconds in shown:
            print(f"\n  {seconds * 1e3:.1f} ms: {sql % tuple(map(repr, params or ()))}")
            print("    " + explain(sql, params).replace("\n", "\n    "))
        print()

    inspect_spark()
    median, times = timed(inspect_spark, min(args.runs, 3))
    with captured() as queries:
        inspect_spark()
    print(
        f"inspect_spark(): {median * 1e3:.0f} ms median "
        f"({', '.join(f'{t * 1e3:.0f}' for t in times)}), {len(queries)} queries"
    )
    for sql, params, seconds in queries:
        print(f"\n  {seconds * 1e3:.1f} ms: {sql}")
        print("    " + explain(sql, params).replace("\n", "\n    "))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
