"""Claiming keys: the database side of "once per key".

A key is claimed by inserting it into ``EventRecord``'s unique ``key`` column with
``INSERT ... ON CONFLICT DO NOTHING RETURNING``: the database, not Python, decides which of
several concurrent claimers wins, and one statement claims a whole chunk, its rows in key
order (so that concurrent claims never deadlock; see
:meth:`~spark_decl.vendors.Vendor.insert_rows`). A claim and the rows of the calls it owes
commit together (:mod:`spark_decl.outcomes`): ``pending`` rows written here, or, when the
caller runs the calls in the claiming transaction, their rows with their results
(:meth:`~spark_decl.calls.CallRunner.run_claimed`). A crash rolls back all of it. Once the
claiming transaction commits, ``events_claimed`` reports how many keys it claimed.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from itertools import count, islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction

from . import outcomes
from .conf import get_settings
from .context import BATCH_BYTES, dump_context_json
from .registry import registry
from .signals import events_claimed
from .validation import validate_event
from .vendors import Vendor, aborted_for_concurrency, column_of, quote, sqlstate, vendor_of

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .types import Event

E = TypeVar("E", bound="Mapping[str, Any]")
R = TypeVar("R")

logger = logging.getLogger("spark_decl")

#: How many times spark_decl runs a transaction of its own that the database aborted for a
#: deadlock or a serialization failure before the error propagates.
CLAIM_ATTEMPTS = 5
# The longest pause before the second attempt, in seconds; it doubles for each next one.
RETRY_PAUSE = 0.025

RECORD_FIELDS = ("key", "group", "context", "created_at")


class ClaimedEvent(dict[str, Any]):
    """An event this process claimed (equal to the event it was made from), with the id
    of its :class:`~spark_decl.models.EventRecord`: see :func:`record_id_of`."""

    __slots__ = ("record_id",)
    record_id: int


def record_id_of(event: Mapping[str, Any]) -> int | None:
    """The id of ``event``'s row if it is a claim this process made, else ``None``."""
    return event.record_id if isinstance(event, ClaimedEvent) else None


def claim_events(
    events: Sequence[Event[Any]],
    *,
    using: str = DEFAULT_DB_ALIAS,
    handlers: bool = True,
    run_here: bool = False,
    contexts: Mapping[str, str] | None = None,
) -> list[Event[Any]]:
    """Claim the keys of already validated ``events``; return the ones claimed now, in
    input order (duplicate keys keep their first occurrence), each a
    :class:`ClaimedEvent`.

    Every context is converted for storage first, so an unstorable context raises before
    anything is written; ``contexts`` gives them already converted
    (:func:`~spark_decl.context.dump_context_json`) by a caller that checked them earlier.

    Each claimed event owes a call to every handler its group routes to now, and gets a
    ``pending`` row for it; with ``run_here=True`` only its background handlers do: the
    caller runs the others in this transaction and writes their rows
    (:meth:`~spark_decl.calls.CallRunner.run_claimed`). ``handlers=False`` claims the
    keys owing nothing (``--mark-only``).

    Inside a transaction the claims belong to it: a rollback takes them back, and an error
    is its owner's. Outside one they get their own, run again if the database aborts it
    for a deadlock or a serialization failure (:func:`retrying`).
    """
    first: dict[str, Event[Any]] = {}
    for event in events:
        first.setdefault(event["key"], event)
    if not first:
        return []
    if contexts is None:
        contexts = {key: dump_context_json(ev["context"], key=key) for key, ev in first.items()}
    connection = connections[using]
    vendor = vendor_of(connection)

    def insert() -> list[Event[Any]]:
        claimed = _insert(
            connection, vendor, first, contexts, handlers=handlers, run_here=run_here
        )
        if claimed and events_claimed.receivers:
            # Sent once the claim is durable: on_commit() drops it with a rollback (of the
            # caller's transaction, a savepoint, or an attempt retrying() makes again).
            counts = dict(Counter(event["group"] for event in claimed))
            transaction.on_commit(partial(send_claimed, counts), using=using, robust=True)
        return claimed

    if connection.in_atomic_block:
        # An error marks the transaction for rollback, as Model.save() does (a savepoint
        # would cost more than the claim itself).
        with transaction.mark_for_rollback_on_error(using):
            return insert()
    return retrying(insert, using=using, keys=first.keys())


def send_claimed(counts: dict[str, int]) -> None:
    """Send ``events_claimed`` (Django's ``send_robust()`` logs a receiver that raises)."""
    events_claimed.send_robust(sender=None, counts=counts)


def _insert(
    connection: BaseDatabaseWrapper,
    vendor: Vendor,
    events: Mapping[str, Event[Any]],
    contexts: Mapping[str, str],
    *,
    handlers: bool,
    run_here: bool,
) -> list[Event[Any]]:
    from .models import EventRecord

    new_rows = outcomes.NewRows(connection)
    now = new_rows.stamp
    records = [(key, ev["group"], contexts[key], now) for key, ev in events.items()]
    claimed: dict[str, int] = {}
    with connection.cursor() as cursor:
        for statement in _by_context_bytes(records):
            claimed.update(
                vendor.insert_rows(
                    cursor,
                    EventRecord,
                    RECORD_FIELDS,
                    statement,
                    returning=("key", "id"),
                    skip_conflicts_on="key",
                )
            )
        result: list[Event[Any]] = []
        pending: list[tuple[Any, ...]] = []
        owed: dict[str, list[str]] = {}  # per group: the handlers whose rows are pending
        for key, event in events.items():
            record_id = claimed.get(key)
            if record_id is None:
                continue
            claimed_event = ClaimedEvent(event)
            claimed_event.record_id = record_id
            result.append(cast("Event[Any]", claimed_event))
            if not handlers:
                continue
            group = event["group"]
            names = owed.get(group)
            if names is None:
                names = owed[group] = [
                    spec.name
                    for spec in registry.handlers_for(group)
                    if spec.background or not run_here
                ]
            pending.extend(new_rows.pending(record_id, name) for name in names)
        outcomes.insert(cursor, pending)
    return result


def _by_context_bytes(records: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    """``records`` in runs whose contexts (JSON text, the third column) total at most
    :data:`~spark_decl.context.BATCH_BYTES`: a chunk of large contexts would otherwise
    exceed what PostgreSQL takes in one statement, on every run."""
    if sum(len(record[2]) for record in records) <= BATCH_BYTES:
        yield records
        return
    run: list[tuple[Any, ...]] = []
    size = 0
    # In key order across the statements too, as each statement orders its rows: the
    # order in which a claim takes its keys is what keeps concurrent claims from deadlock.
    for record in sorted(records, key=itemgetter(0)):
        if run and size + len(record[2]) > BATCH_BYTES:
            yield run
            run, size = [], 0
        run.append(record)
        size += len(record[2])
    yield run


def retrying(
    work: Callable[[], R],
    *,
    using: str,
    keys: Iterable[str],
    may_retry: Callable[[], bool] = lambda: True,
) -> R:
    """Run ``work`` in a transaction of its own, again (up to :data:`CLAIM_ATTEMPTS` times
    in all) while the database aborts it for a deadlock or a serialization failure and
    ``may_retry()`` says nothing happened that must not happen twice (a handler ran).

    Each attempt is logged at ``WARNING`` on ``spark_decl``, naming ``keys``, after a
    random pause below a bound that doubles each time, so that the transactions that
    collided do not meet again in step.
    """
    for attempt in count(1):
        try:
            with transaction.atomic(using=using):
                return work()
        except DatabaseError as exc:
            again = attempt < CLAIM_ATTEMPTS and aborted_for_concurrency(exc) and may_retry()
            if not again:
                raise
            pause = random.uniform(0, RETRY_PAUSE * 2 ** (attempt - 1))
            shown = list(islice(keys, 4))
            logger.warning(
                "The database aborted the claim of %s (SQLSTATE %s: %s); claiming again "
                "in %d ms (attempt %d of %d).",
                ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else ""),
                sqlstate(exc),
                str(exc).partition("\n")[0],
                round(pause * 1000),
                attempt + 1,
                CLAIM_ATTEMPTS,
            )
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def seen_keys(keys: Sequence[str], *, using: str = DEFAULT_DB_ALIAS) -> set[str]:
    """The subset of ``keys`` that were claimed before, with one query however many there
    are (the keys travel as one JSON array; the unique index on ``key`` is probed for
    each)."""
    from .models import EventRecord

    if not keys:
        return set()
    connection = connections[using]
    key = column_of(EventRecord, "key")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {key} FROM {quote(EventRecord._meta.db_table)} "
            f"WHERE {key} {vendor_of(connection).keys_in('%s')}",
            [json.dumps(list(keys))],
        )
        return {found for (found,) in cursor.fetchall()}


def only_new_events(
    events: Iterable[E],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> Iterator[E]:
    """Yield the events whose keys were never seen before, claiming each as it is yielded.

    Each event is validated (:class:`~spark_decl.exceptions.InvalidEvent` on bad input) and
    only events claimed by this call are yielded, in input order, each key once. Pass the
    result to :func:`process_events`::

        process_events(only_new_events(events_from_challenge(challenge)))

    An event is claimed just before it is handed over, never earlier: a consumer that
    stops, raises or dies leaves every event it did not get new, as django-spark did.
    Claimed events owe their handler calls: those the consumer does not make (it stops
    or dies before) are finished by ``manage.py retry_spark_events``.
    """
    # Before the first read, which is written for SQLite and PostgreSQL only.
    vendor_of(connections[using])
    chunk_size = get_settings().CHUNK_SIZE
    iterator = iter(events)
    while chunk := list(islice(iterator, chunk_size)):
        first: dict[str, Event[Any]] = {}
        for candidate in chunk:
            valid = validate_event(candidate)
            first.setdefault(valid["key"], valid)
        # One read drops the keys seen before, so they cost no claim; the claims below
        # still decide races with other claimers (a key taken since is not yielded).
        seen = seen_keys(list(first), using=using)
        new = [event for key, event in first.items() if key not in seen]
        # Converted before the chunk's first claim: an unstorable context fails the chunk
        # with nothing of it written.
        contexts = {
            event["key"]: dump_context_json(event["context"], key=event["key"]) for event in new
        }
        for event in new:
            claimed = claim_events([event], using=using, contexts=contexts)
            if claimed:
                # A claimed event is a dict equal to the one passed in, so its static type
                # (and the handler-side context type, e.g. Event[ChallengeContext]) carries
                # over.
                yield cast("E", claimed[0])
