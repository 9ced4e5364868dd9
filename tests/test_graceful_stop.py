"""Graceful stop: SIGTERM/SIGINT end ``process_spark_sources`` after the chunk in progress.

The first signal lets the chunk being handled finish (its outcomes recorded), prints the
summary with a note, and exits 0; the rows after it are left for the next run. A second
signal exits at once, as a crash would, and the usual recovery completes everything.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from io import StringIO
from types import FrameType

import pytest
from django.core.management import call_command
from django.db import connections

from spark_decl import Event, handles, process_queryset
from spark_decl.models import EventRecord
from spark_decl.registry import Registry
from tests.conftest import logged_keys
from tests.testapp.models import Challenge
from tests.workers import Workers, assert_all_handled_once, assert_consistent, key

ROWS = 500
CHUNK = 50
CALLS_PER_CHUNK = 2 * CHUNK
SETTINGS = {"CHUNK_SIZE": CHUNK}


@pytest.fixture
def rows(transactional_db: None) -> list[int]:
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(ROWS))
    return list(Challenge.objects.order_by("pk").values_list("pk", flat=True))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_batch_after_the_chunk_in_progress(
    pool: Workers, rows: list[int], signum: signal.Signals
) -> None:
    worker = pool.start(
        "command", "process_spark_sources", settings=SETTINGS, pause_at=["handler:10"]
    )
    worker.wait_paused()
    worker.signal(signum)
    # The worker sees this file only after the signal was delivered to it.
    worker.resume()

    out = worker.succeed()
    assert out.startswith(f"{CHUNK} rows, {CHUNK} events, {CHUNK} new, ")
    assert f"{CALLS_PER_CHUNK} handled, 0 failed in " in out
    assert f"Interrupted by {signum.name}: stopped after the chunk in progress" in out
    # The chunk in progress was finished and recorded; nothing after it was claimed.
    assert set(EventRecord.objects.values_list("key", flat=True)) == {
        key(pk) for pk in rows[:CHUNK]
    }
    assert Counter(assert_consistent().values()) == {"done": CALLS_PER_CHUNK}

    rerun = pool.batch()
    assert rerun.startswith(f"{ROWS} rows, {ROWS} events, {ROWS - CHUNK} new, ")
    assert "Interrupted" not in rerun
    assert_all_handled_once(rows)


def test_a_second_signal_stops_at_once_and_recovery_completes_everything(
    pool: Workers, rows: list[int]
) -> None:
    worker = pool.start(
        "command",
        "process_spark_sources",
        settings=SETTINGS,
        pause_at=["handler:10", "handler:20"],
    )
    worker.wait_paused(1)
    worker.signal(signal.SIGTERM)
    worker.resume(1)
    # Paused again, in the same chunk: the first signal has been handled by now.
    worker.wait_paused(2)
    worker.signal(signal.SIGTERM)

    assert worker.finish() == 128 + signal.SIGTERM
    statuses = Counter(assert_consistent().values())
    assert statuses["done"] < 20
    assert EventRecord.objects.count() <= CHUNK

    pool.batch()
    pool.retry()
    assert_all_handled_once(rows)


# -- in the test process ----------------------------------------------------------------------


@pytest.fixture
def challenges(transactional_db: None) -> list[int]:
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(10))
    return list(Challenge.objects.order_by("pk").values_list("pk", flat=True))


def test_process_queryset_asks_should_stop_after_each_chunk(challenges: list[int]) -> None:
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(EventRecord.objects.count())
        return len(asked) == 2

    result = process_queryset(Challenge.objects.all(), chunk_size=3, should_stop=should_stop)
    # Asked once each chunk was claimed and handled; stopped after the second.
    assert asked == [3, 6]
    assert result.rows == 6
    assert sorted(logged_keys()) == sorted(f"challenge_created_{pk}" for pk in challenges[:6])


def test_sigterm_in_the_test_process_stops_the_command_and_restores_the_handler(
    challenges: list[int], isolated_registry: Registry
) -> None:
    """The same as the subprocess test, faster: a handler signals its own process."""
    sent: list[str] = []

    @handles(r"^challenge_created$")
    def terminate_once(event: Event[object]) -> None:
        if not sent:
            sent.append(event["key"])
            os.kill(os.getpid(), signal.SIGTERM)

    # Stands for whatever handled SIGTERM before: it must neither run nor be lost.
    outside: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        outside.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        out = StringIO()
        call_command("process_spark_sources", "--chunk-size", "4", stdout=out)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)
    assert outside == []
    assert out.getvalue().startswith("4 rows, 4 events, 4 new, 8 handled, 0 failed in ")
    assert "Interrupted by SIGTERM" in out.getvalue()
    assert EventRecord.objects.count() == 4


def test_the_command_in_another_thread_installs_no_signal_handler(
    challenges: list[int],
) -> None:
    errors: list[BaseException] = []
    out = StringIO()

    def run() -> None:
        try:
            call_command("process_spark_sources", stdout=out)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []
    assert out.getvalue().startswith("10 rows, 10 events, 10 new, ")
    assert signal.getsignal(signal.SIGTERM) is before
