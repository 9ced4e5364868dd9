"""The transaction glue: the one module that touches Django's private transaction state.

Two things need more than Django's public API, each for a measured reason:

* :class:`CallSavepoint`, a savepoint per handler call that costs no statement when the
  handler makes no query. ``transaction.atomic()`` per call sends ``SAVEPOINT`` and
  ``RELEASE`` for every call: on a batch of no-op handlers that is two statements per
  event, a third of the batch's time. It keeps the bookkeeping a nested ``Atomic`` keeps,
  in ``connection.savepoint_state``, ``savepoint_ids``, ``atomic_blocks``,
  ``needs_rollback`` and ``run_on_commit`` (whose entries are ``(savepoint ids, callback,
  robust)``), so that the rest of Django (``on_commit`` inside a handler, nested
  ``atomic()`` blocks, ``set_rollback()``) behaves as under ``atomic()``.
* Nothing else: :func:`after_commit` uses ``transaction.on_commit()`` only.

``tests/test_transactions.py`` pins every attribute and behaviour relied on here, on each
Django line CI runs.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django.db import connections, transaction
from django.db.transaction import TransactionManagementError

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger("spark_decl")

T = TypeVar("T")

SAVEPOINT = "SAVEPOINT spark_decl_call"
ROLLBACK_TO = "ROLLBACK TO SAVEPOINT spark_decl_call"
RELEASE = "RELEASE SAVEPOINT spark_decl_call"


class CallSavepoint:
    """``transaction.atomic()`` for one handler call at a time, inside an open transaction:
    ``with guard:`` around each call of a :func:`call_savepoints` block.

    * The ``SAVEPOINT`` is sent lazily, just before the handler's first query (the block's
      execute wrapper sees every query made through Django's cursors): a handler that
      never touches the database (a mail, a webhook, a no-op) costs no statement at all.
    * The statements go to one DB-API cursor reused for the whole block, always under the
      same name, so the driver's statement cache serves them (savepoints may share a
      name; ``ROLLBACK TO`` and ``RELEASE`` act on the newest). The id in
      ``savepoint_ids`` stays unique, since Django files ``on_commit`` callbacks under it.

    A handler that raises, or leaves the transaction marked for rollback (it swallowed a
    database error), has its writes and its ``on_commit`` callbacks rolled back. Writes
    made through a raw DB-API cursor bypass the wrapper and are not covered.
    """

    def __init__(self, connection: BaseDatabaseWrapper, cursor: Any) -> None:
        self.connection = connection
        self.cursor = cursor
        # Stands for the call in connection.atomic_blocks, where Django looks for the
        # innermost block (durable=False: a durable atomic() inside a handler is an error,
        # as inside any atomic block).
        self.block = transaction.Atomic(connection.alias, savepoint=True, durable=False)
        self.active = False
        self.opened = False
        self.sid = ""

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if self.active and not self.opened:
            self.opened = True
            self.cursor.execute(SAVEPOINT)
        return execute(sql, params, many, context)

    def __enter__(self) -> None:
        connection = self.connection
        if connection.needs_rollback:
            raise TransactionManagementError(
                "spark_decl: the transaction is marked for rollback; cannot run a handler."
            )
        connection.savepoint_state += 1
        self.sid = f"spark_decl_{connection.savepoint_state}"
        connection.savepoint_ids.append(self.sid)
        connection.atomic_blocks.append(self.block)
        self.opened = False
        self.active = True

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.active = False
        connection = self.connection
        connection.atomic_blocks.pop()
        connection.savepoint_ids.pop()
        if exc_type is not None:
            self._roll_back()
            return
        if connection.needs_rollback:
            # The handler swallowed a database error (or called set_rollback(True)):
            # its writes cannot be trusted, so the call counts as failed.
            self._roll_back()
            raise TransactionManagementError(
                "The handler left the transaction marked for rollback (it caught a "
                "database error or called transaction.set_rollback(True)); its writes "
                "were rolled back."
            )
        if self.opened:
            self.cursor.execute(RELEASE)

    def _roll_back(self) -> None:
        connection = self.connection
        connection.needs_rollback = False
        if self.opened:
            self.cursor.execute(ROLLBACK_TO)
            self.cursor.execute(RELEASE)
        sid = self.sid
        if connection.run_on_commit:
            connection.run_on_commit = [
                entry for entry in connection.run_on_commit if sid not in entry[0]
            ]


@contextmanager
def call_savepoints(connection: BaseDatabaseWrapper) -> Generator[CallSavepoint, None, None]:
    """Inside an open transaction, a :class:`CallSavepoint` for the handler calls made in
    the block."""
    cursor = connection.connection.cursor()
    guard = CallSavepoint(connection, cursor)
    try:
        with connection.execute_wrapper(guard):
            yield guard
    finally:
        cursor.close()


# -- after the commit ------------------------------------------------------------------------


class _AfterCommit(Generic[T]):
    """An ``on_commit()`` callback holding what one claim inside a transaction left to do
    after the commit; the first of them to run does it for all its transaction's claims.

    Each claim registers a callback of its own, so Django drops it with the claim's
    savepoint if that rolls back (and all of them with the transaction). When the first
    callback runs after a commit, the callbacks registered after it on this connection
    belong to the same transaction: it takes their items too, and ``run`` gets them all at
    once (one dispatch per transaction, not one per save). Some of those may have been
    dropped with a savepoint; ``run`` must cope, and does so by reading from the database
    what the commit kept. Callbacks registered before it never ran: their transaction rolled
    back, or a test ran only the callbacks of one block (``captureOnCommitCallbacks()``).
    """

    __slots__ = ("done", "items", "run", "using")
    # Django 5.2's on_commit() logging reads the callback's __qualname__.
    __qualname__ = "spark_decl.transactions._AfterCommit"

    def __init__(self, items: Sequence[T], run: Callable[[list[T]], object], using: str) -> None:
        self.items = items
        self.run = run
        self.using = using
        self.done = False

    def __call__(self) -> None:
        if self.done:  # an earlier callback of its transaction did it
            return
        queue = _queue(connections[self.using])
        index = next((i for i, entry in enumerate(queue) if entry is self), len(queue))
        batch = [self, *(entry for entry in queue[index + 1 :] if entry.run == self.run)]
        del queue[:]
        for entry in batch:
            entry.done = True
        try:
            self.run([item for entry in batch for item in entry.items])
        except Exception:
            # Logged here: what recovers it depends on what run() does.
            logger.exception("Could not finish the work of a committed transaction.")


# Per connection (connections are per thread): the callbacks registered and not yet run.
_QUEUES: weakref.WeakKeyDictionary[BaseDatabaseWrapper, list[_AfterCommit[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _queue(connection: BaseDatabaseWrapper) -> list[_AfterCommit[Any]]:
    try:
        return _QUEUES[connection]
    except KeyError:
        return _QUEUES.setdefault(connection, [])


def after_commit(items: Sequence[T], run: Callable[[list[T]], object], *, using: str) -> None:
    """Call ``run`` with ``items`` once the open transaction on ``using`` commits, together
    with the items of every other ``after_commit()`` with the same ``run`` in that
    transaction; never if it rolls back. ``run`` may get items whose savepoint rolled
    back: it must check against the database what is still owed."""
    callback = _AfterCommit(items, run, using)
    connection = transaction.get_connection(using)
    _queue(connection).append(callback)
    transaction.on_commit(callback, using=using, robust=True)
