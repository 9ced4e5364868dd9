"""What is registered and what is stored: the data behind ``manage.py spark_inspect``.

:func:`inspect_spark` reads the registry, spark_decl's signals' receivers and, with two
aggregate queries, the stored groups and the handler calls by status.
:meth:`Inspection.as_dict` is the ``--json`` document; its keys are documented in
``docs/introspection.rst`` and only ever gain new ones (``version`` changes if one is
removed or changes meaning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Count

from . import signals
from .outcomes import STATUSES
from .registry import function_name, registry

if TYPE_CHECKING:
    from django.dispatch import Signal

JSON_VERSION = 1
SIGNALS = ("event_dispatched", "handler_failed", "events_claimed", "call_finished")


@dataclass(frozen=True)
class SourceInfo:
    model: str
    name: str
    on_save: bool
    queryset: str | None


@dataclass(frozen=True)
class HandlerInfo:
    name: str
    patterns: list[str]
    background: bool
    is_async: bool
    groups: list[str]
    outcomes: dict[str, int]


@dataclass(frozen=True)
class GroupInfo:
    name: str
    events: int
    handlers: list[str]


@dataclass(frozen=True)
class Inspection:
    """Everything ``spark_inspect`` shows, for one database alias."""

    database: str
    sources: list[SourceInfo]
    handlers: list[HandlerInfo]
    groups: list[GroupInfo]
    # Outcome counts stored under names no registered handler has (renamed or removed
    # handlers): retry_spark_events cannot run those calls.
    unregistered_outcomes: dict[str, dict[str, int]]
    receivers: dict[str, list[str]]

    @property
    def unhandled_groups(self) -> list[str]:
        return [group.name for group in self.groups if not group.handlers]

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "version": JSON_VERSION,
            "database": self.database,
            "sources": [
                {
                    "model": source.model,
                    "name": source.name,
                    "on_save": source.on_save,
                    "queryset": source.queryset,
                }
                for source in self.sources
            ],
            "handlers": [
                {
                    "name": handler.name,
                    "patterns": handler.patterns,
                    "background": handler.background,
                    "async": handler.is_async,
                    "groups": handler.groups,
                    "outcomes": handler.outcomes,
                }
                for handler in self.handlers
            ],
            "groups": [
                {"name": group.name, "events": group.events, "handlers": group.handlers}
                for group in self.groups
            ],
            "unhandled_groups": self.unhandled_groups,
            "unregistered_handlers": [
                {"name": name, "outcomes": outcomes}
                for name, outcomes in self.unregistered_outcomes.items()
            ],
            "receivers": self.receivers,
        }


def inspect_spark(*, using: str = DEFAULT_DB_ALIAS) -> Inspection:
    """Describe the registered sources and handlers, the stored groups and the handler
    outcomes on the database ``using``, and the signals' receivers.

    Sources and handlers are listed in registration order (handlers run in that order);
    groups and unregistered handler names alphabetically.
    """
    from .models import EventRecord, HandlerOutcome

    handlers = registry.handlers()
    group_counts = (
        EventRecord.objects.using(using)
        .order_by("group")
        .values_list("group")
        .annotate(events=Count("pk"))
    )
    groups = [
        GroupInfo(
            name=group,
            events=events,
            handlers=[spec.name for spec in handlers if spec.matches(group)],
        )
        for group, events in group_counts
    ]
    outcomes: dict[str, dict[str, int]] = {}
    outcome_counts = (
        HandlerOutcome.objects.using(using)
        .order_by()
        .values_list("handler", "status")
        .annotate(calls=Count("pk"))
    )
    for name, status, calls in outcome_counts:
        outcomes.setdefault(name, dict.fromkeys(STATUSES, 0))[status] = calls
    return Inspection(
        database=using,
        sources=[
            SourceInfo(
                model=spec.model._meta.label,
                name=spec.name,
                on_save=spec.on_save,
                queryset=function_name(spec.queryset) if spec.queryset is not None else None,
            )
            for spec in registry.sources()
        ],
        handlers=[
            HandlerInfo(
                name=spec.name,
                patterns=[pattern.pattern for pattern in spec.patterns],
                background=spec.background,
                is_async=spec.is_async,
                groups=[group.name for group in groups if spec.name in group.handlers],
                outcomes=outcomes.get(spec.name) or dict.fromkeys(STATUSES, 0),
            )
            for spec in handlers
        ],
        groups=groups,
        unregistered_outcomes={
            name: counts
            for name, counts in sorted(outcomes.items())
            if registry.get_handler(name) is None
        },
        receivers={name: receiver_names(getattr(signals, name)) for name in SIGNALS},
    )


def receiver_names(signal: Signal) -> list[str]:
    """The dotted names of the live receivers ``signal.send(sender=None, ...)`` would call.

    spark_decl always sends with ``sender=None``, so receivers connected for a particular
    sender are never called and are not listed.
    """
    # Django has no public API listing receivers; _live_receivers() is what send() uses
    # (it resolves weak references and drops dead ones).
    sync_receivers, async_receivers = signal._live_receivers(None)
    return [function_name(receiver) for receiver in (*sync_receivers, *async_receivers)]
