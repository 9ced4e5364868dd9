"""Once per key under real concurrency (semantic 1): processes racing on one database.

Every worker is a separate Python process (``tests/workers.py``) against the test database
(a SQLite file or PostgreSQL). Workers wait at a start line until all of them are ready,
then race. Each test counts the handlers' database writes per key: exactly one each.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import psycopg
import pytest
from django.db import connection, connections, transaction
from psycopg import sql

from spark_decl import Event, event, process_queryset
from spark_decl.claims import claim_events
from spark_decl.models import EventRecord
from spark_decl.types import BatchResult
from spark_decl.validation import validate_event
from tests.conftest import all_calls, logged_keys, retry_warnings
from tests.testapp.models import Challenge, HandlerLog
from tests.workers import (
    TIMEOUT,
    Worker,
    Workers,
    assert_all_handled_once,
    assert_consistent,
    key,
)

# PostgreSQL is what several machines share; SQLite has one writer at a time.
SCALE = {"postgresql": (8, 10_000), "sqlite": (4, 2_000)}
ONE_HANDLER = ("first",)
T = TypeVar("T")


@pytest.fixture
def pool(tmp_path: Path, transactional_db: None) -> Iterator[Workers]:
    pool = Workers(tmp_path, handlers=ONE_HANDLER)
    yield pool
    pool.stop_all()


def make_rows(count: int) -> list[int]:
    Challenge.objects.bulk_create(
        (Challenge(title=f"c{n}") for n in range(count)), batch_size=2000
    )
    return list(Challenge.objects.order_by("pk").values_list("pk", flat=True))


def start_together(workers: list[Worker]) -> None:
    """Release workers started with ``pause_at=["start:1"]`` once all are ready."""
    for worker in workers:
        worker.wait_paused()
    for worker in workers:
        worker.resume()


def summary(output: str) -> dict[str, int]:
    """The numbers of ``process_spark_sources``' summary line."""
    match = re.match(
        r"(?P<rows>\d+) rows, (?P<events>\d+) events, (?P<new>\d+) new, "
        r"(?P<handled>\d+) handled, (?P<failed>\d+) failed in ",
        output,
    )
    assert match is not None, output
    return {name: int(value) for name, value in match.groupdict().items()}


def test_batch_workers_racing_over_the_same_rows_handle_each_key_once(
    pool: Workers,
) -> None:
    """8 workers x 10,000 keys on PostgreSQL, 4 x 2,000 on a SQLite file."""
    count, rows = SCALE[connection.vendor]
    pks = make_rows(rows)
    racing = [
        pool.start(
            "command",
            "process_spark_sources",
            settings={"CHUNK_SIZE": 250},
            pause_at=["start:1"],
        )
        for _ in range(count)
    ]
    start_together(racing)
    results = [summary(worker.succeed()) for worker in racing]

    for result in results:
        assert (result["rows"], result["events"], result["failed"]) == (rows, rows, 0)
        assert result["handled"] == result["new"]
    assert sum(result["new"] for result in results) == rows
    assert_all_handled_once(pks, ONE_HANDLER)


def test_retry_runs_racing_batch_workers_run_each_call_once(pool: Workers) -> None:
    """``retry_spark_events --stale-after 0`` in a loop while batch workers run: calls
    claimed by a batch worker but not yet run are taken by whichever process gets there
    first, never by both."""
    pks = make_rows(2_000)
    # One commit per call: claims are committed long before their calls run.
    settings = {"CHUNK_SIZE": 100, "TRANSACTION_SECONDS": 0}
    stop = pool.sync / "stop-retrying"
    batches = [
        pool.start("command", "process_spark_sources", settings=settings, pause_at=["start:1"])
        for _ in range(2)
    ]
    retries = [
        pool.start(
            "command",
            "retry_spark_events",
            "--stale-after",
            "0",
            settings=settings,
            pause_at=["start:1"],
            repeat_until=stop,
        )
        for _ in range(2)
    ]
    start_together(batches + retries)
    for worker in batches:
        assert summary(worker.succeed())["failed"] == 0
    stop.touch()
    for worker in retries:
        worker.succeed()

    pool.retry()
    assert_all_handled_once(pks, ONE_HANDLER)


def test_a_retry_takes_the_calls_a_paused_batch_worker_owes_and_it_skips_them(
    pool: Workers,
) -> None:
    """The same race, made deterministic: the batch worker stops right after committing
    a chunk's claims with its first call; a retry run does the chunk's other calls; the
    batch worker then finds them taken and skips them."""
    pks = make_rows(300)
    settings = {"CHUNK_SIZE": 100, "TRANSACTION_SECONDS": 0}
    batch = pool.start(
        "command", "process_spark_sources", settings=settings, pause_at=["committed:1"]
    )
    batch.wait_paused()
    assert Counter(assert_consistent(ONE_HANDLER).values()) == {"done": 1, "pending": 99}
    pool.retry()
    assert Counter(assert_consistent(ONE_HANDLER).values()) == {"done": 100}
    batch.resume()
    assert summary(batch.succeed()) == {
        "rows": 300,
        "events": 300,
        "new": 300,
        "handled": 201,
        "failed": 0,
    }
    assert_all_handled_once(pks, ONE_HANDLER)


@pytest.mark.parametrize(
    "where", ["fetched_before_the_transaction", "fetched_inside_the_transaction"]
)
def test_two_processes_saving_the_same_object_at_once_handle_its_event_once(
    pool: Workers, where: str
) -> None:
    """Both saves produce the event; one claim wins. The first process saves and holds its
    transaction open (claim not committed); the second then saves the same object.

    Fetching inside the transaction makes it read before it writes; on SQLite the workers
    then use ``transaction_mode: IMMEDIATE``, as docs/guarantees.rst ("SQLite with several
    workers") recommends: a deferred transaction that read first fails with "database is
    locked" at once when another connection holds the write lock, whatever the timeout.
    """
    (pk,) = make_rows(1)
    inside = where == "fetched_inside_the_transaction"
    args = [str(pk), "inside"] if inside else [str(pk)]
    options = {"transaction_mode": "IMMEDIATE"} if inside and connection.vendor == "sqlite" else {}
    holder = pool.start("save", *args, pause_at=["saved:1"], database_options=options)
    second = pool.start("save", *args, pause_at=["start:1"], database_options=options)
    holder.wait_paused()
    second.wait_paused()
    second.resume()
    if connection.vendor == "postgresql":
        # The second save is really waiting on the first transaction's locks. SQLite shows
        # no such thing: there the second save may also start only after the first commit
        # (with one writer at a time, the two transactions run one after the other anyway).
        wait_for_a_lock_wait(second)
    holder.resume()
    holder.succeed()
    second.succeed()
    assert_all_handled_once([pk], ONE_HANDLER)


def wait_for_a_lock_wait(worker: Worker) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            (waiting,) = cursor.fetchone()
        if waiting:
            return
        assert worker.process.poll() is None, worker.stderr
        assert time.monotonic() < deadline, "the second save never waited for a lock"
        time.sleep(0.01)  # polling interval, not synchronisation


# -- deadlocks on PostgreSQL ----------------------------------------------------------------

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="SQLite has one writer at a time: its claims never wait for each other's locks",
)


class InThread(Generic[T]):
    """Runs ``function`` in a thread of its own, so on a database connection of its own
    (Django's are per thread, and closed here when it ends); :meth:`result` returns what
    it returned, or raises what it raised."""

    def __init__(self, function: Callable[[], T]) -> None:
        self.function = function
        self.outcome: tuple[T] | BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outcome = (self.function(),)
        except BaseException as exc:
            self.outcome = exc
        finally:
            connections.close_all()

    def result(self) -> T:
        self.thread.join(timeout=TIMEOUT)
        assert not self.thread.is_alive(), f"{self.function} never ended"
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        assert self.outcome is not None
        return self.outcome[0]


ROUNDS = 10


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_claims_of_the_same_keys_in_opposite_orders_at_once_never_deadlock() -> None:
    """Two threads claim the same 500 keys inside their own transactions at the same
    moment, one of them listing the keys in reverse. Each claim locks its keys in key
    order: one waits for the other, neither in a cycle, and each key is claimed once."""
    # Before claims took their keys in order, a round deadlocked 12 times in 20.
    for round_ in range(ROUNDS):
        events = [validate_event(event("race", f"{round_}_{n}")) for n in range(500)]
        start = threading.Barrier(2)

        def claim(events: list[Event[Any]], start: threading.Barrier) -> list[str]:
            start.wait(timeout=TIMEOUT)
            with transaction.atomic():
                return [claimed["key"] for claimed in claim_events(events)]

        forward = InThread(partial(claim, events, start))
        backward = InThread(partial(claim, events[::-1], start))
        claimed = forward.result() + backward.result()
        assert Counter(claimed) == {each["key"]: 1 for each in events}
    assert EventRecord.objects.count() == ROUNDS * 500


def raw_connection() -> psycopg.Connection[tuple[Any, ...]]:
    """A connection to the test database of its own, outside Django."""
    params = connection.settings_dict
    return psycopg.connect(
        dbname=params["NAME"],
        user=params["USER"],
        password=params["PASSWORD"],
        host=params["HOST"],
        port=params["PORT"],
    )


GATE = 4_242  # the advisory lock of gate_before()


@contextmanager
def gate_before(key: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """Makes every insert of ``key`` into EventRecord wait at a gate while the yielded
    connection holds the advisory lock ``GATE`` (``SELECT pg_advisory_lock(...)``): a
    trigger that takes the lock and gives it back at once, so that an open gate holds
    nothing."""
    table = EventRecord._meta.db_table
    with raw_connection() as gatekeeper:
        gatekeeper.autocommit = True
        gatekeeper.execute(
            sql.SQL(
                """
                CREATE FUNCTION spark_decl_test_gate() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.key = {key} THEN
                        PERFORM pg_advisory_lock_shared({gate});
                        PERFORM pg_advisory_unlock_shared({gate});
                    END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER spark_decl_test_gate BEFORE INSERT ON {table}
                    FOR EACH ROW EXECUTE FUNCTION spark_decl_test_gate();
                """
            ).format(key=sql.Literal(key), gate=sql.Literal(GATE), table=sql.Identifier(table))
        )
        try:
            yield gatekeeper
        finally:
            gatekeeper.execute("SELECT pg_advisory_unlock_all()")
            gatekeeper.execute(
                sql.SQL(
                    "DROP TRIGGER spark_decl_test_gate ON {table}; "
                    "DROP FUNCTION spark_decl_test_gate()"
                ).format(table=sql.Identifier(table))
            )


def insert_key(client: psycopg.Connection[tuple[Any, ...]], key: str) -> None:
    """Claim ``key`` the way another client would, in ``client``'s open transaction."""
    client.execute(
        sql.SQL(
            'INSERT INTO {table} (key, "group", context, created_at) '
            "VALUES (%s, 'other', '{{}}', now()) ON CONFLICT (key) DO NOTHING"
        ).format(table=sql.Identifier(EventRecord._meta.db_table)),
        [key],
    )


def wait_for_a_session_waiting_on(locktype: str) -> None:
    """Until some session of this database waits for a lock of ``locktype``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                "WHERE datname = current_database() AND NOT granted AND locktype = %s",
                [locktype],
            )
            (waiting,) = cursor.fetchone()
        if waiting:
            return
        assert time.monotonic() < deadline, f"nobody ever waited for a {locktype} lock"
        time.sleep(0.01)  # polling interval, not synchronisation


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_a_batch_chunk_that_is_a_deadlock_victim_is_claimed_again_and_handled_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real deadlock between a batch chunk's claim (spark_decl's own transaction) and
    another client, B, which claims keys in its own order.

    B inserts Y in an open transaction. The chunk claims X and Y, in key order: it inserts
    X, then waits at a gate before Y. B inserts X: it waits for the chunk. The gate opens
    and the chunk waits for B: a cycle. PostgreSQL looks for one once per wait, after that
    session's ``deadlock_timeout``: 50 ms for the chunk, which started waiting last, a
    minute for B; so the chunk is the victim. B's insert then goes through and B rolls
    back. The chunk, claimed again, has both keys, each handled once. (Setting
    ``deadlock_timeout`` takes a superuser, as the test database's owner usually is.)
    """
    rows = Challenge.objects.bulk_create(Challenge(title=title) for title in "xy")
    x, y = sorted(f"challenge_created_{row.pk}" for row in rows)

    def batch() -> BatchResult:
        with connection.cursor() as cursor:
            cursor.execute("SET deadlock_timeout = '50ms'")
        return process_queryset(Challenge.objects.all())

    with gate_before(y) as gatekeeper, raw_connection() as other:
        other.execute("SET deadlock_timeout = '1min'")
        insert_key(other, y)
        gatekeeper.execute("SELECT pg_advisory_lock(%s)", [GATE])
        claimer = InThread(batch)
        wait_for_a_session_waiting_on("advisory")
        insertion = InThread(partial(insert_key, other, x))
        wait_for_a_session_waiting_on("transactionid")
        gatekeeper.execute("SELECT pg_advisory_unlock(%s)", [GATE])
        insertion.result()
        other.rollback()
        result = claimer.result()

    assert (result.new, result.dispatch.calls, result.dispatch.failed) == (2, 2, 0)
    assert Counter(logged_keys()) == {x: 1, y: 1}
    assert set(all_calls().values()) == {"done"}
    warnings = retry_warnings(caplog)
    assert warnings
    assert "40P01" in warnings[0]


SOAK_SECONDS = 6


@postgresql_only
def test_savers_and_batch_workers_running_together_never_deadlock(pool: Workers) -> None:
    """4 processes saving new rows and 3 ``process_spark_sources`` workers, for a few
    seconds, with handlers that take 5 ms (a mail server answering), so that transactions
    hold their claims a while. A transaction's saves are claimed after its commit in save
    order (here random), a batch's chunk in primary-key order: before each claim took its
    keys in one order, this deadlocked within seconds, losing the savers' events (logged
    only) and ending batch workers with an error. Chunk sizes differ, as they do between
    cron jobs, so that the workers' chunks straddle each other's."""
    stop = pool.sync / "stop"
    savers = [
        pool.start("churn", "100", repeat_until=stop, pause_at=["start:1"], handler_seconds=0.005)
        for _ in range(4)
    ]
    batches = [
        pool.start(
            "command",
            "process_spark_sources",
            settings={"CHUNK_SIZE": chunk_size},
            repeat_until=stop,
            pause_at=["start:1"],
            handler_seconds=0.005,
        )
        for chunk_size in (30, 50, 70)
    ]
    start_together(savers + batches)
    time.sleep(SOAK_SECONDS)  # how long the soak lasts, not synchronisation
    stop.touch()
    for worker in savers + batches:
        worker.succeed()
        assert "deadlock detected" not in worker.stderr + worker.stdout, worker.stderr

    pks = list(Challenge.objects.values_list("pk", flat=True))
    # Every save claimed its event (unless a batch worker did first): none was lost.
    assert set(EventRecord.objects.values_list("key", flat=True)) == {key(pk) for pk in pks}
    pool.batch()
    pool.retry()
    assert_all_handled_once(pks, ONE_HANDLER)
    # Both kinds of workers handled events: they raced.
    handled_by = set(HandlerLog.objects.values_list("pid", flat=True))
    assert handled_by & {worker.process.pid for worker in savers}
    assert handled_by & {worker.process.pid for worker in batches}
