"""The two decorators: :func:`event_source` and :func:`handles`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .registry import check_model, compile_pattern, registry
from .types import Event

if TYPE_CHECKING:
    from django.db.models import Model, QuerySet

M = TypeVar("M", bound="Model")
# A source may return None for "no events", as the registry (and django-spark) allow.
R = TypeVar("R", bound=Iterable[Event[Any]] | None)
H = TypeVar("H", bound=Callable[[Event[Any]], object])


def event_source(
    model: type[M],
    *,
    on_save: bool = True,
    queryset: Callable[[], QuerySet[M]] | None = None,
) -> Callable[[Callable[[M], R]], Callable[[M], R]]:
    """Register a function that turns an instance of ``model`` into events.

    The source runs when an instance is saved (unless ``on_save=False``) and for every
    instance in ``manage.py process_spark_sources``. ``queryset`` restricts the rows the
    batch command scans (default: every row of the default manager)::

        @event_source(Challenge)
        def events_from_challenge(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
            yield event("challenge_created", challenge.pk, {"challenge": challenge})

    The function is returned unchanged.
    """
    check_model(model)

    def decorator(function: Callable[[M], R]) -> Callable[[M], R]:
        registry.add_source(model, function, on_save=on_save, queryset=queryset)
        return function

    return decorator


def handles(pattern: str | re.Pattern[str], *, background: bool = False) -> Callable[[H], H]:
    """Register a handler for every event whose group matches ``re.search(pattern, group)``.

    Stack several ``@handles`` to route more groups to one function; it still runs once per
    event. ``background=True`` runs each call through Django's tasks framework: it is
    enqueued once the claim commits (with django-tasks-db, in the claiming transaction) and
    a worker runs it, with the event's model instances fetched again (see
    :mod:`spark_decl.enqueue`). An invalid pattern raises
    :class:`~spark_decl.exceptions.InvalidPattern` here, at import time::

        @handles(r"^challenge")
        def send_challenge_mails(event: Event[ChallengeContext]) -> None: ...

    The function is returned unchanged.
    """
    # Compile now so a bad pattern fails at the decorator line, not when it is applied.
    compiled = compile_pattern(pattern, where=f"@handles({pattern!r})")

    def decorator(function: H) -> H:
        registry.add_handler(compiled, function, background=background)
        return function

    return decorator
