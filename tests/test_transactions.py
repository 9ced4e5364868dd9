"""spark_decl.transactions, and the Django internals it relies on, pinned.

Each ``test_django_*`` test states one attribute or behaviour of Django's transaction
handling that :class:`~spark_decl.transactions.CallSavepoint` reads or mutates. They run on
every Django line CI tests (5.2 and 6.x): a release that changes one fails here, by name,
instead of silently breaking "each call atomic" elsewhere.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.transaction import Atomic, TransactionManagementError

import spark_decl
from spark_decl.transactions import after_commit, call_savepoints
from tests.testapp.models import HandlerLog


class Boom(Exception):
    pass


# Django's private transaction state, as attributes of a connection or a block.
PRIVATE = {
    "atomic_blocks",
    "needs_rollback",
    "run_on_commit",
    "savepoint_ids",
    "savepoint_state",
    "_from_testcase",
}


def test_djangos_private_transaction_state_is_touched_in_one_module_only() -> None:
    package = Path(spark_decl.__file__).parent
    touching = {
        f"{path.relative_to(package)}: {node.attr}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE
    }
    assert touching
    assert {entry.partition(":")[0] for entry in touching} == {"transactions.py"}


# -- what Django keeps, and CallSavepoint keeps the same way --------------------------------


@pytest.mark.django_db(transaction=True)
def test_django_keeps_savepoint_ids_atomic_blocks_and_a_savepoint_counter() -> None:
    with transaction.atomic():
        assert connection.savepoint_ids == []
        assert len(connection.atomic_blocks) == 1
        assert isinstance(connection.atomic_blocks[0], Atomic)
        state = connection.savepoint_state
        with transaction.atomic():
            assert len(connection.savepoint_ids) == 1
            assert len(connection.atomic_blocks) == 2
            assert connection.savepoint_state == state + 1
        assert connection.savepoint_ids == []
        assert connection.needs_rollback is False


@pytest.mark.django_db(transaction=True)
def test_django_files_on_commit_callbacks_under_the_open_savepoint_ids() -> None:
    def callback() -> None:
        pass

    with transaction.atomic():
        with transaction.atomic():
            sid = connection.savepoint_ids[-1]
            transaction.on_commit(callback)
        # (savepoint ids, callback, robust); django-stubs knows the first two.
        entry: tuple[Any, ...] = tuple(connection.run_on_commit[-1])
        assert len(entry) == 3
        sids, func, robust = entry
        assert sid in sids
        assert func is callback
        assert robust is False


@pytest.mark.django_db(transaction=True)
def test_django_drops_the_on_commit_callbacks_of_a_rolled_back_savepoint() -> None:
    ran: list[str] = []
    with transaction.atomic():
        transaction.on_commit(lambda: ran.append("kept"))
        with suppress(Boom), transaction.atomic():
            transaction.on_commit(lambda: ran.append("dropped"))
            raise Boom
    assert ran == ["kept"]


@pytest.mark.django_db(transaction=True)
def test_django_atomic_takes_using_savepoint_and_durable() -> None:
    block = Atomic("default", savepoint=True, durable=False)
    # django-stubs does not declare durable.
    assert (block.using, block.savepoint, getattr(block, "durable")) == ("default", True, False)  # noqa: B009


@pytest.mark.django_db(transaction=True)
def test_django_refuses_a_durable_block_inside_any_atomic_block() -> None:
    with (
        transaction.atomic(),
        call_savepoints(connection) as savepoint,
        savepoint,
        pytest.raises(RuntimeError, match="durable"),
        transaction.atomic(durable=True),
    ):
        pass


# -- CallSavepoint ---------------------------------------------------------------------------


@contextmanager
def savepoint_statements() -> Iterator[list[str]]:
    """The savepoint statements SQLite executes in the block, raw cursors' included (the
    driver's trace sees what Django's query log does not)."""
    found: list[str] = []
    connection.ensure_connection()
    connection.connection.set_trace_callback(
        lambda sql: found.append(sql) if "SAVEPOINT spark_decl_call" in sql else None
    )
    try:
        yield found
    finally:
        connection.connection.set_trace_callback(None)


sqlite_only = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="the statement trace is sqlite3's"
)


def run_as_call(work: Callable[[], Any]) -> BaseException | None:
    """Run ``work`` as one handler call in an open transaction; return what it raised."""
    with call_savepoints(connection) as savepoint:
        try:
            with savepoint:
                work()
        except Exception as exc:
            return exc
    return None


@sqlite_only
@pytest.mark.django_db(transaction=True)
def test_a_call_without_a_query_costs_no_statement() -> None:
    with savepoint_statements() as executed, transaction.atomic():
        assert run_as_call(lambda: None) is None
    assert executed == []


@pytest.mark.django_db(transaction=True)
def test_a_call_that_writes_and_raises_leaves_nothing_and_its_neighbours_stand() -> None:
    def fails() -> None:
        HandlerLog.objects.create(handler="fails", key="k")
        raise Boom

    with transaction.atomic():
        run_as_call(lambda: HandlerLog.objects.create(handler="before", key="k"))
        assert isinstance(run_as_call(fails), Boom)
        run_as_call(lambda: HandlerLog.objects.create(handler="after", key="k"))
    assert sorted(HandlerLog.objects.values_list("handler", flat=True)) == ["after", "before"]


@sqlite_only
@pytest.mark.django_db(transaction=True)
def test_a_calls_savepoint_is_sent_before_its_first_query_and_only_then() -> None:
    def fails() -> None:
        HandlerLog.objects.create(handler="fails", key="k")
        raise Boom

    with savepoint_statements() as executed, transaction.atomic():
        run_as_call(lambda: HandlerLog.objects.create(handler="before", key="k"))
        run_as_call(fails)
        run_as_call(lambda: None)
        run_as_call(lambda: HandlerLog.objects.create(handler="after", key="k"))
    assert [sql.split()[0] for sql in executed] == [
        "SAVEPOINT",
        "RELEASE",
        "SAVEPOINT",
        "ROLLBACK",
        "RELEASE",
        "SAVEPOINT",
        "RELEASE",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_failing_calls_on_commit_callbacks_are_dropped_and_the_others_kept() -> None:
    ran: list[str] = []

    def fails() -> None:
        transaction.on_commit(lambda: ran.append("failing"))
        raise Boom

    with transaction.atomic():
        run_as_call(fails)
        run_as_call(lambda: transaction.on_commit(lambda: ran.append("succeeding")))
    assert ran == ["succeeding"]


@pytest.mark.django_db(transaction=True)
def test_a_call_that_swallows_a_database_error_fails_and_keeps_no_writes() -> None:
    def swallows() -> None:
        HandlerLog.objects.create(handler="swallows", key="k")
        transaction.set_rollback(True)

    with transaction.atomic():
        error = run_as_call(swallows)
        assert connection.needs_rollback is False
    assert isinstance(error, TransactionManagementError)
    assert "marked for rollback" in str(error)
    assert not HandlerLog.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_calls_keep_djangos_bookkeeping_as_they_found_it() -> None:
    with transaction.atomic():
        before = (list(connection.savepoint_ids), list(connection.atomic_blocks))
        run_as_call(lambda: HandlerLog.objects.create(handler="x", key="k"))
        run_as_call(lambda: (_ for _ in ()).throw(Boom()))
        assert (list(connection.savepoint_ids), list(connection.atomic_blocks)) == before


# -- after_commit --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_first_callback_of_a_commit_runs_every_later_ones_items_once() -> None:
    runs: list[list[int]] = []
    with transaction.atomic():
        after_commit([1], runs.append, using="default")
        with transaction.atomic():
            after_commit([2], runs.append, using="default")
        after_commit([3], runs.append, using="default")
    assert runs == [[1, 2, 3]]


@pytest.mark.django_db(transaction=True)
def test_the_items_of_a_rolled_back_savepoint_may_be_given_to_run() -> None:
    """What after_commit() promises ``run``: every item of the commit, perhaps some whose
    savepoint rolled back (``run`` checks what the database kept), never one of a
    transaction that rolled back."""
    runs: list[list[int]] = []
    with suppress(Boom), transaction.atomic():
        after_commit([0], runs.append, using="default")
        raise Boom
    with transaction.atomic():
        after_commit([1], runs.append, using="default")
        with suppress(Boom), transaction.atomic():
            after_commit([2], runs.append, using="default")
            raise Boom
    assert runs in ([[1, 2]], [[1]])
    assert all(0 not in run for run in runs)


@pytest.mark.django_db
def test_in_a_block_that_runs_only_its_own_callbacks_only_its_items_run(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """A TestCase: callbacks registered before the block never run, nor their items."""
    runs: list[list[int]] = []
    after_commit([1], runs.append, using="default")
    with django_capture_on_commit_callbacks(execute=True):
        after_commit([2], runs.append, using="default")
        after_commit([3], runs.append, using="default")
    assert runs == [[2, 3]]
