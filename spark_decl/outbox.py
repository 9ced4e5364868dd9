"""The outbox: the events of saves made inside a transaction, written in it.

A save inside a transaction does not claim its events there: a claim inserts the event's
key into a unique index, where a transaction of many saves, holding the keys of its first
saves while it waits for a key a batch worker holds, would deadlock with that worker (on
PostgreSQL; a save cannot take its keys in the order the batch does). It writes them to
:class:`~spark_decl.models.OutboxEvent` instead, a table nothing else writes keys to:
they commit or roll back with the save. Once the transaction commits, its outbox rows are
taken (:func:`take`, in the claiming transaction) and claimed like a batch chunk, in a
transaction of spark_decl's own that is run again after a deadlock. A crash between the
commit and the claim leaves the rows; ``retry_spark_events --stale-after`` claims them
(:func:`stale`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone

from .vendors import MAX_PARAMETERS, column_of, quote, vendor_of

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .types import Event

FIELDS = ("key", "group", "context")  # created_at: the database's default, now()


def write(
    events: Sequence[Event[Any]], contexts: Mapping[str, str], *, using: str
) -> dict[str, int]:
    """Write ``events`` (each key once; their contexts converted for storage, by key) to
    the outbox, in the open transaction; return their row ids by key.

    Through the driver's cursor (:meth:`~spark_decl.vendors.Vendor.insert_each`): every
    save inside a transaction makes this statement, and through Django's cursor it cost
    as much again (``benchmarks/README.md``, figure 6)."""
    from .models import OutboxEvent

    connection = connections[using]
    rows = [(event["key"], event["group"], contexts[event["key"]]) for event in events]
    ids = vendor_of(connection).insert_each(connection, OutboxEvent, FIELDS, rows, "id")
    return {row[0]: pk for row, pk in zip(rows, ids, strict=True)}


def take(connection: BaseDatabaseWrapper, entries: Mapping[int, str]) -> set[int]:
    """Delete the outbox rows ``entries`` (id -> key) that are still there, in the open
    transaction; return their ids. A row whose savepoint rolled back is not, even if
    SQLite gave its id to a later row: the key must match too."""
    from .models import OutboxEvent

    column = {name: column_of(OutboxEvent, name) for name in ("id", "key")}
    sql = f"DELETE FROM {quote(OutboxEvent._meta.db_table)} WHERE {column['id']} IN "
    ids = sorted(entries)
    taken: set[int] = set()
    with connection.cursor() as cursor:
        for start in range(0, len(ids), MAX_PARAMETERS):
            batch = ids[start : start + MAX_PARAMETERS]
            cursor.execute(
                f"{sql}({', '.join(['%s'] * len(batch))}) "
                f"RETURNING {column['id']}, {column['key']}",
                batch,
            )
            taken.update(pk for pk, key in cursor.fetchall() if entries[pk] == key)
    return taken


def stale(
    older_than: float, *, chunk_size: int, using: str = DEFAULT_DB_ALIAS
) -> Iterator[list[tuple[int, str, str, str]]]:
    """The outbox rows written at least ``older_than`` seconds ago, oldest first,
    ``chunk_size`` at a time: what a process that died after its transaction committed
    left unclaimed. Each as (id, key, group, context as stored JSON text)."""
    from .models import OutboxEvent

    cutoff = timezone.now() - timedelta(seconds=older_than)
    rows = (
        OutboxEvent.objects.using(using)
        .filter(created_at__lte=cutoff)
        .annotate(text=Cast("context", output_field=TextField()))
        .order_by("pk")
        .values_list("pk", "key", "group", "text")
    )
    last = 0
    while chunk := list(rows.filter(pk__gt=last)[:chunk_size]):
        yield chunk
        last = chunk[-1][0]
