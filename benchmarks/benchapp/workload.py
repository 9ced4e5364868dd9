"""The event source and handlers of the benchmarks, identical for both packages.

The source is a plain function building the event dict itself (what ``spark_decl.event``
and django-spark's documentation build), so the *bare* reference cost is the same code in
both processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .models import Item

GROUP = "item_created"


def item_events(item: Item) -> Iterator[dict[str, Any]]:
    """The one source: one event per row, keyed by the row's primary key."""
    yield {"group": GROUP, "key": f"{GROUP}_{item.pk}", "context": {"item": item}}


def noop_handler(event: dict[str, Any]) -> None:
    """The one handler that matches: does nothing."""


def unmatched_handler(index: int) -> Callable[[dict[str, Any]], None]:
    """A distinct no-op handler for the pattern ``^group_{index}$`` (never matches).

    spark_decl identifies a handler by its dotted name, so each gets its own qualname.
    """

    def handler(event: dict[str, Any]) -> None:
        """Never called."""

    handler.__name__ = handler.__qualname__ = f"unmatched_handler_{index}"
    return handler
