"""spark_decl from async code: ``aonly_new_events`` and ``aprocess_events``.

Claims and handler calls use the ORM inside transactions, which Django only allows in sync
code: these run :func:`~spark_decl.only_new_events` and :func:`~spark_decl.process_events`
through ``sync_to_async`` (thread-sensitive, so on the thread that owns the connection).
``async def`` handlers called from there are awaited on the caller's event loop, and the
ORM calls they await (``acreate``, ``asave``, ...) come back to the thread running the
call, inside its transaction: a handler that raises leaves none of its writes behind,
exactly as in sync code.

Saving from async code needs nothing special: ``await instance.asave()`` runs
``post_save``, the sources and the claims through ``sync_to_async`` already.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS

from .claims import only_new_events
from .dispatch import process_events

E = TypeVar("E", bound="Mapping[str, Any]")


async def aonly_new_events(
    events: Iterable[E] | AsyncIterable[E], *, using: str = DEFAULT_DB_ALIAS
) -> AsyncIterator[E]:
    """:func:`~spark_decl.only_new_events` for async code.

    The events are collected first (an async iterable is consumed here); the new ones are
    yielded in input order, each claimed just before it is handed over, so a consumer
    that stops or raises leaves the rest new. ::

        await aprocess_events(aonly_new_events(events_from_challenge(challenge)))
    """
    collected = await _collect(events)
    claims = only_new_events(collected, using=using)
    step = sync_to_async(_next, thread_sensitive=True)
    while (event := await step(claims)) is not None:
        yield event


async def aprocess_events(
    events: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """:func:`~spark_decl.process_events` for async code (it does not dedupe either).

    ``async def`` handlers are awaited on the calling event loop; inside a transaction
    (``transaction.atomic`` run through ``sync_to_async``) the handlers run after it
    commits, as in sync code.
    """
    collected = await _collect(events)
    await sync_to_async(process_events, thread_sensitive=True)(collected, using=using)


async def _collect(events: Iterable[E] | AsyncIterable[E]) -> list[E]:
    if isinstance(events, AsyncIterable):
        return [event async for event in events]
    return list(events)


def _next(claims: Iterator[E]) -> E | None:
    """The next new event (an event is a mapping, never ``None``)."""
    return next(claims, None)
