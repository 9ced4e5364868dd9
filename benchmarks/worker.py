"""One measurement of one package in a fresh interpreter: ``python -m benchmarks.worker``.

Started by :mod:`benchmarks.run`, never by hand (though it can be, for profiling)::

    BENCH_DB_NAME=$PWD/benchmarks/.work/p.sqlite3 PYTHONPATH=$PWD \\
        .venv-bench/bin/python -P -m benchmarks.worker spark_decl batch --profile p.prof

It creates its own database (deleting the SQLite file, or dropping and creating the
PostgreSQL database), migrates, runs the measurement and prints one JSON object as the last
line of its standard output.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .packages import Package

MEASURES = ("bare", "batch", "dispatch", "save_autocommit", "save_atomic", "memory")
# Diagnostics, run by hand (not by benchmarks/run.py).
DIAGNOSTICS = ("save_floor",)
POPULATE_BATCH = 2_000
ITERATOR_CHUNK = 2_000
UNMATCHED_PATTERNS = 100
WARMUP_SAVES = 50

Result = dict[str, Any]


# -- database ---------------------------------------------------------------------------------


def create_database(vendor: str, name: str) -> None:
    """Start from nothing: no SQLite file, or a freshly created PostgreSQL database."""
    if vendor == "sqlite":
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(name + suffix).unlink(missing_ok=True)
    else:
        postgres_admin(name, "DROP DATABASE IF EXISTS {} WITH (FORCE)", "CREATE DATABASE {}")


def drop_database(vendor: str, name: str) -> None:
    from django.db import connections

    connections.close_all()
    if vendor == "sqlite":
        create_database(vendor, name)  # deletes the file
    else:
        postgres_admin(name, "DROP DATABASE IF EXISTS {} WITH (FORCE)")


def postgres_admin(name: str, *statements: str) -> None:
    """Run ``statements`` (``{}`` standing for the quoted ``name``) on the server's
    ``postgres`` database, connecting as libpq's ``PG*`` environment variables say."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dbname="postgres", autocommit=True) as conn:
        for statement in statements:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))


def execute(*statements: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def reset(tables: list[str], *, items: bool = False) -> None:
    """Empty the package's tables of seen keys (and the items): fresh state for a repeat."""
    from django.db import connection

    from .benchapp.models import Item, PlainItem

    if items:
        tables = [*tables, Item._meta.db_table, PlainItem._meta.db_table]
    quote = connection.ops.quote_name
    if connection.vendor == "postgresql":
        execute(f"TRUNCATE {', '.join(map(quote, tables))} RESTART IDENTITY")
    else:
        execute(*(f"DELETE FROM {quote(table)}" for table in tables), "VACUUM")


def populate(rows: int) -> None:
    """Insert ``rows`` items with ``bulk_create`` (not through ``post_save``)."""
    from django.db import connection, transaction

    from .benchapp.models import Item

    start = dt.date(2026, 1, 1)
    with transaction.atomic():
        for offset in range(0, rows, POPULATE_BATCH):
            Item.objects.bulk_create(
                Item(name=f"item {i}", created=start + dt.timedelta(days=i % 365))
                for i in range(offset, min(offset + POPULATE_BATCH, rows))
            )
    if connection.vendor == "postgresql":
        execute("ANALYZE")


# -- timing -----------------------------------------------------------------------------------


PROFILER: cProfile.Profile | None = None
"""Set by ``--profile``: collects the timed blocks marked ``profiled``."""


@contextmanager
def stopwatch(runs: list[float], *, profiled: bool = True) -> Iterator[None]:
    """Time the block into ``runs`` (and profile it under ``--profile``)."""
    profiler = PROFILER if profiled else None
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    try:
        yield
    finally:
        runs.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.disable()


def summary(runs: list[float], **extra: Any) -> Result:
    return {"seconds": min(runs), "runs": runs, **extra}


def batch_command() -> None:
    from django.core.management import call_command

    call_command("process_spark_sources", stdout=io.StringIO())


def expect(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected}, got {actual}")


# -- the measurements -------------------------------------------------------------------------


def more(runs: list[float], args: argparse.Namespace) -> bool:
    """Best of ``--repeats`` runs, but no further run once one took ``--slow`` seconds."""
    return len(runs) < args.repeats and not (runs and runs[-1] >= args.slow)


def bare_pass(rows: int) -> float:
    """Iterate every row and call the source on it; return the seconds it took."""
    from .benchapp.models import Item
    from .benchapp.workload import item_events

    events = 0
    start = time.perf_counter()
    for item in Item.objects.all().iterator(chunk_size=ITERATOR_CHUNK):
        for _event in item_events(item):
            events += 1
    seconds = time.perf_counter() - start
    expect(events, rows, "events produced")
    return seconds


def measure_bare(package: Package, args: argparse.Namespace) -> Result:
    """Iterate every row and call the source on it: what any batch has to pay."""
    populate(args.rows)
    runs: list[float] = []
    while more(runs, args):
        with stopwatch(runs):
            bare_pass(args.rows)
    return {"bare": summary(runs, rows=args.rows)}


def measure_batch(package: Package, args: argparse.Namespace) -> Result:
    """``process_spark_sources`` on unseen keys (first pass), then with every key seen.

    Each first pass is bracketed by two bare passes over the same rows in this process:
    ``over_bare`` is each first pass divided by the mean of its two, a ratio that machine
    speed drifting between processes (or minutes) does not distort.
    """
    populate(args.rows)
    package.register()
    first: list[float] = []
    over_bare: list[float] = []
    while more(first, args):
        if first:
            reset(package.event_tables())
        before = bare_pass(args.rows)
        with stopwatch(first):
            batch_command()
        after = bare_pass(args.rows)
        over_bare.append(first[-1] / ((before + after) / 2))
        expect(package.seen_keys(), args.rows, "keys seen after the first pass")
    # A re-run changes nothing, so it repeats on the state the last first pass left.
    rerun: list[float] = []
    while more(rerun, args):
        with stopwatch(rerun, profiled=False):
            batch_command()
    expect(package.seen_keys(), args.rows, "keys seen after the re-runs")
    return {
        "first_pass": summary(first, rows=args.rows, over_bare=over_bare),
        "rerun": summary(rerun, rows=args.rows),
    }


def measure_dispatch(package: Package, args: argparse.Namespace) -> Result:
    """``process_events`` over ``rows`` events with 100 non-matching patterns + 1 matching."""
    from .benchapp.workload import GROUP

    package.register_dispatch_handlers(UNMATCHED_PATTERNS)
    events = [
        {"group": GROUP, "key": f"{GROUP}_{i}", "context": {"n": i}} for i in range(args.rows)
    ]
    runs: list[float] = []
    while more(runs, args):
        with stopwatch(runs):
            package.process_events(events)
    return {
        "dispatch": summary(
            runs,
            events=len(events),
            patterns=UNMATCHED_PATTERNS + 1,
            per_event_us=min(runs) / len(events) * 1e6,
        )
    }


def measure_save_autocommit(package: Package, args: argparse.Namespace) -> Result:
    """Figure 5: ``--saves`` creates of an :class:`Item` (the source and handler registered)
    alternating one by one (ABBA...) with as many of a :class:`PlainItem` (nothing
    registered), each timed on its own, in autocommit mode.

    A run's overhead is the median registered save over the median plain save. Alternating
    saves, not runs, matters here: each save waits for the disk (two commits with the
    package, one without), and the disk's latency drifts within seconds, by more than the
    difference between the packages (whole plain and registered runs of the same code gave
    overheads from 1.85x to 2.68x). ``seconds`` are each run's sums.
    """
    from .benchapp.models import Item, PlainItem

    count = args.saves
    tables = package.event_tables()
    today = dt.date(2026, 11, 26)
    package.register()

    def save(model: type[Item | PlainItem], i: int, times: list[float]) -> None:
        profiler = PROFILER if model is Item else None
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        model.objects.create(name=f"saved {i}", created=today)
        times.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.disable()

    for i in range(WARMUP_SAVES):
        save(PlainItem, i, [])
        save(Item, i, [])
    plain_runs: list[float] = []
    registered_runs: list[float] = []
    overheads: list[float] = []
    while more(registered_runs, args):
        reset(tables, items=True)
        plain: list[float] = []
        registered: list[float] = []
        for i in range(count):
            if i % 2 == 0:
                save(PlainItem, i, plain)
                save(Item, i, registered)
            else:
                save(Item, i, registered)
                save(PlainItem, i, plain)
        expect(package.seen_keys(), count, "keys seen by the saves")
        plain_runs.append(sum(plain))
        registered_runs.append(sum(registered))
        overheads.append(statistics.median(registered) / statistics.median(plain))
    package.unregister()
    return {
        "plain": summary(plain_runs, saves=count, atomic=False),
        "registered": summary(registered_runs, saves=count, atomic=False),
        "overhead": statistics.median(overheads),
        "overheads": overheads,
    }


def measure_save_atomic(package: Package, args: argparse.Namespace) -> Result:
    """Figure 6: ``--saves`` creates in one ``transaction.atomic()``, with nothing
    registered (plain) and with the source and handler.

    Plain and registered runs alternate (ABBA...), each on emptied tables, so that drift in
    the machine's disk latency hits both alike (a run has one commit: there is no finer
    alternation, as in figure 5).
    """
    from django.db import transaction

    from .benchapp.models import Item

    count = args.saves
    tables = package.event_tables()
    today = dt.date(2026, 11, 26)

    def saves(n: int) -> None:
        # Timed up to and including the commit and the handlers deferred to it.
        with transaction.atomic():
            for i in range(n):
                Item.objects.create(name=f"saved {i}", created=today)

    def timed(registered: bool, runs: list[float]) -> None:
        if registered:
            package.register()
        reset(tables, items=True)
        with stopwatch(runs, profiled=registered):
            saves(count)
        expect(package.seen_keys(), count if registered else 0, "keys seen by the saves")
        if registered:
            package.unregister()

    for registered in (False, True):  # warm both paths up
        if registered:
            package.register()
        saves(WARMUP_SAVES)
        package.unregister()
    plain: list[float] = []
    with_source: list[float] = []
    while more(with_source, args):
        order = (False, True) if len(plain) % 2 == 0 else (True, False)
        for registered in order:
            timed(registered, with_source if registered else plain)
    return {
        "plain": summary(plain, saves=count, atomic=True),
        "registered": summary(with_source, saves=count, atomic=True),
        "overhead": min(with_source) / min(plain),
    }


def measure_memory(package: Package, args: argparse.Namespace) -> Result:
    """Peak memory that the batch first pass allocates (``tracemalloc``), and its duration.

    Only allocations made while tracing count: the populated rows, Django's startup and the
    migrations made before are not part of the peak.
    """
    populate(args.rows)
    package.register()
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    batch_command()
    seconds = time.perf_counter() - start
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    expect(package.seen_keys(), args.rows, "keys seen after the first pass")
    return {"memory": {"rows": args.rows, "peak_bytes": peak, "seconds_traced": seconds}}


def measure_save_floor(args: argparse.Namespace) -> Result:
    """Figure 6 with :class:`~benchmarks.packages.ClaimFloor` instead of a package: plain
    saves against saves that each make only the one ``INSERT`` any claim inside the
    saving transaction needs. Its overhead is the floor of figure 6 (spark_decl only)."""
    from .packages import ClaimFloor

    return measure_save_atomic(ClaimFloor(), args)


MEASURE_FUNCTIONS: dict[str, Callable[[Package, argparse.Namespace], Result]] = {
    "bare": measure_bare,
    "batch": measure_batch,
    "dispatch": measure_dispatch,
    "save_autocommit": measure_save_autocommit,
    "save_atomic": measure_save_atomic,
    "memory": measure_memory,
    "save_floor": lambda package, args: measure_save_floor(args),
}


# -- entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__)
    parser.add_argument("package", choices=("spark_decl", "django_spark"))
    parser.add_argument("measure", choices=MEASURES + DIAGNOSTICS)
    parser.add_argument("--rows", type=int, default=10_000, help="rows / events (default 10000)")
    parser.add_argument("--saves", type=int, default=1_000, help="saves for save_* measures")
    parser.add_argument("--repeats", type=int, default=5, help="best of at most this many")
    parser.add_argument(
        "--slow", type=float, default=5.0, help="no further repeat after a run this long (s)"
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="write a cProfile of the timed runs (batch: the first passes only; saves: the "
        "runs with a source only)",
    )
    args = parser.parse_args(argv)
    if args.measure in DIAGNOSTICS and args.package != "spark_decl":
        parser.error(f"{args.measure} measures spark_decl's tables: run it as spark_decl.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    vendor = os.environ.get("BENCH_DB_VENDOR", "sqlite")
    name = os.environ["BENCH_DB_NAME"]
    os.environ["DJANGO_SETTINGS_MODULE"] = f"benchmarks.settings.{args.package}"
    create_database(vendor, name)

    import django

    django.setup()
    from django.core.management import call_command

    from .packages import get_package

    call_command("migrate", verbosity=0)
    package = get_package(args.package)
    global PROFILER
    if args.profile:
        PROFILER = cProfile.Profile()
    try:
        result = MEASURE_FUNCTIONS[args.measure](package, args)
    finally:
        drop_database(vendor, name)
    if PROFILER is not None:
        PROFILER.dump_stats(args.profile)
    module = sys.modules["spark_decl" if args.package == "spark_decl" else "spark"]
    print(
        json.dumps(
            {
                "package": args.package,
                "measure": args.measure,
                "module_file": module.__file__,
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
