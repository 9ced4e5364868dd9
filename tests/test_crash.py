"""Nothing lost on a crash (semantic 4): ``kill -9`` a real worker, recover, check.

Each test kills a ``process_spark_sources`` (or ``retry_spark_events``, or a saving)
process at a chosen point, checks what is committed right then (a call's database effect
exists if and only if its outcome is ``done``), then runs the recovery the guarantees page
prescribes — ``process_spark_sources`` and ``retry_spark_events --stale-after 0`` — and
checks that every key is claimed, every owed call is done, and each handler's database
effect is present exactly once. The workers are in ``tests/workers.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from spark_decl.claims import seen_keys
from spark_decl.models import EventRecord, OutboxEvent
from tests import workers
from tests.testapp.models import Challenge
from tests.workers import Workers, assert_all_handled_once, assert_consistent

ROWS = 2000
CHUNK = 100
# Two handlers per event: the n-th handler call of chunk c (from 1) is call
# c * CALLS_PER_CHUNK + n of the run.
CALLS_PER_CHUNK = len(workers.HANDLERS) * CHUNK
# One transaction per handler call: what is committed at a pause is then exact.
EACH_CALL_COMMITS = {"CHUNK_SIZE": CHUNK, "TRANSACTION_SECONDS": 0}
SHARED_TRANSACTIONS = {"CHUNK_SIZE": CHUNK}


@pytest.fixture
def rows(transactional_db: None) -> list[int]:
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(ROWS))
    return list(Challenge.objects.order_by("pk").values_list("pk", flat=True))


def status_counts() -> Counter[str]:
    return Counter(assert_consistent().values())


def recover(pool: Workers) -> None:
    """What the guarantees page says to run after a crash."""
    pool.batch()
    pool.retry()


@dataclass(frozen=True)
class KillPoint:
    """Where a batch worker is killed, and what must be committed at that moment."""

    pause_at: str
    settings: dict[str, Any]
    claimed: tuple[int, int]  # inclusive bounds on claimed keys
    done: tuple[int, int]  # inclusive bounds on done calls


KILL_POINTS = {
    # The first chunk's claims share a transaction with its first handler calls: killed
    # there, at most the first chunk is claimed, and only if a commit came early.
    "during_first_chunk_handlers": KillPoint("handler:7", SHARED_TRANSACTIONS, (0, CHUNK), (0, 6)),
    # Chunks 0-6 are finished (each chunk's calls all run before the next chunk is read).
    "mid_batch": KillPoint(
        f"handler:{7 * CALLS_PER_CHUNK + 51}",
        SHARED_TRANSACTIONS,
        (7 * CHUNK, 8 * CHUNK),
        (7 * CALLS_PER_CHUNK, 7 * CALLS_PER_CHUNK + 50),
    ),
    # Chunk 2's claims and first call committed together; its other calls are pending.
    "after_claims_committed_before_handlers": KillPoint(
        f"handler:{2 * CALLS_PER_CHUNK + 2}",
        EACH_CALL_COMMITS,
        (3 * CHUNK, 3 * CHUNK),
        (2 * CALLS_PER_CHUNK + 1, 2 * CALLS_PER_CHUNK + 1),
    ),
    # Chunk 2's keys are inserted, and none of its calls has run.
    "between_claims_and_their_calls": KillPoint(
        "claimed:3", SHARED_TRANSACTIONS, (2 * CHUNK, 2 * CHUNK), (2 * CALLS_PER_CHUNK,) * 2
    ),
    # Call 5 of chunk 2 is marked done (uncommitted) and its handler has not run yet. (A
    # chunk's first call has no row to take: it runs in its claim's transaction, which
    # writes its row with its result.)
    "after_a_call_is_taken_before_its_handler_runs": KillPoint(
        f"taken:{2 * (CALLS_PER_CHUNK - 1) + 4}",
        EACH_CALL_COMMITS,
        (3 * CHUNK, 3 * CHUNK),
        (2 * CALLS_PER_CHUNK + 4, 2 * CALLS_PER_CHUNK + 4),
    ),
    # Between a commit and whatever spark_decl does next.
    "right_after_a_commit": KillPoint(
        f"committed:{2 * CALLS_PER_CHUNK + 10}",
        EACH_CALL_COMMITS,
        (3 * CHUNK, 3 * CHUNK),
        (2 * CALLS_PER_CHUNK + 10, 2 * CALLS_PER_CHUNK + 10),
    ),
    # Chunk 5's rows are being run through the source: nothing of it is claimed yet.
    "while_sources_run": KillPoint(
        f"source:{5 * CHUNK + 30}",
        SHARED_TRANSACTIONS,
        (5 * CHUNK, 5 * CHUNK),
        (5 * CALLS_PER_CHUNK, 5 * CALLS_PER_CHUNK),
    ),
}


@pytest.mark.parametrize("point", list(KILL_POINTS.values()), ids=list(KILL_POINTS))
def test_a_batch_killed_at_any_point_is_completed_by_rerun_and_retry(
    pool: Workers, rows: list[int], point: KillPoint
) -> None:
    worker = pool.start(
        "command", "process_spark_sources", settings=point.settings, pause_at=[point.pause_at]
    )
    worker.wait_paused()
    worker.kill()

    claimed = EventRecord.objects.count()
    statuses = status_counts()
    assert point.claimed[0] <= claimed <= point.claimed[1]
    assert point.done[0] <= statuses["done"] <= point.done[1]
    assert claimed < ROWS

    recover(pool)
    assert_all_handled_once(rows)


def test_a_batch_killed_at_an_arbitrary_moment_is_completed(
    pool: Workers, rows: list[int]
) -> None:
    """No pause: killed once the test sees a second chunk claimed, wherever the worker
    is then (inside a statement, a commit, a handler)."""
    worker = pool.start("command", "process_spark_sources", settings=EACH_CALL_COMMITS)
    while EventRecord.objects.count() <= CHUNK:
        assert worker.process.poll() is None, worker.stderr
        time.sleep(0.01)  # polling interval, not synchronisation
    worker.kill()
    status_counts()

    recover(pool)
    assert_all_handled_once(rows)


def test_a_retry_killed_midway_is_completed_by_the_next_retry(
    pool: Workers, rows: list[int]
) -> None:
    batch = pool.start(
        "command",
        "process_spark_sources",
        settings=EACH_CALL_COMMITS,
        pause_at=[f"handler:{CALLS_PER_CHUNK + 2}"],
    )
    batch.wait_paused()
    batch.kill()
    assert status_counts()["pending"] == CALLS_PER_CHUNK - 1
    # The rest of the batch; it leaves chunk 1's claimed calls alone.
    pool.batch()
    assert status_counts()["pending"] == CALLS_PER_CHUNK - 1

    retry = pool.start(
        "command",
        "retry_spark_events",
        "--stale-after",
        "0",
        settings=EACH_CALL_COMMITS,
        pause_at=["handler:50"],
    )
    retry.wait_paused()
    retry.kill()
    assert status_counts()["pending"] == CALLS_PER_CHUNK - 50

    pool.retry()
    assert_all_handled_once(rows)


@pytest.mark.parametrize(
    ("settings", "claimed", "done"),
    [
        # The claim and every call share one transaction: killed in it, nothing is claimed,
        # and the batch produces the events again from the committed rows.
        ({"CHUNK_SIZE": CHUNK, "TRANSACTION_SECONDS": 3600}, 0, 0),
        # The first chunk's claims committed with its first call, its other calls are
        # pending, for the retry; the later chunks are not claimed yet, for the batch.
        (EACH_CALL_COMMITS, CHUNK, 100),
    ],
    ids=["before_the_claim_commits", "after_the_claim_committed"],
)
def test_a_process_killed_while_handling_its_saves_after_commit(
    pool: Workers, settings: dict[str, Any], claimed: int, done: int
) -> None:
    """Events from saves inside a transaction are written to its outbox, and claimed and
    handled after its commit: killed in between, ``process_spark_sources`` claims what was
    not, ``retry_spark_events`` finishes what was (and empties the outbox)."""
    saves = 300
    worker = pool.start("create", str(saves), settings=settings, pause_at=["handler:101"])
    worker.wait_paused()
    worker.kill()
    pks = list(Challenge.objects.values_list("pk", flat=True))
    assert len(pks) == saves
    assert EventRecord.objects.count() == claimed
    assert status_counts()["done"] == done

    assert pool.batch().startswith(f"{saves} rows, {saves} events, {saves - claimed} new, ")
    pool.retry()
    assert_all_handled_once(pks)
    assert not OutboxEvent.objects.exists()


@pytest.mark.parametrize("function", ["spark_decl", "api", "aio"])
def test_a_consumer_of_only_new_events_killed_midway_leaves_the_rest_new(
    pool: Workers, function: str
) -> None:
    """``only_new_events`` claims an event only as it hands it over: killed while its
    consumer handles the first event, the others were never claimed, and the first one's
    calls are pending for the retry."""
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(5))
    pks = list(Challenge.objects.order_by("pk").values_list("pk", flat=True))
    worker = pool.start("consume", function, pause_at=["handler:1"])
    worker.wait_paused()
    worker.kill()

    first = workers.key(pks[0])
    assert seen_keys([workers.key(pk) for pk in pks]) == {first}
    assert assert_consistent() == {(handler, first): "pending" for handler in workers.HANDLERS}

    pool.retry()
    assert workers.effects() == {(handler, first): 1 for handler in workers.HANDLERS}
    assert pool.batch().startswith(f"{len(pks)} rows, {len(pks)} events, {len(pks) - 1} new, ")
    assert_all_handled_once(pks)
