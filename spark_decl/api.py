"""django-spark compatibility: code written for ``from spark import api`` keeps working.

::

    from spark_decl import api

    api.register_group_handler(handler=send_challenge_mails, group=r"^challenge")
    api.register_model_event_source(sender=Challenge, source=events_from_challenge)

    for model, sources in api.MODEL_SOURCES.items():
        for instance in model.objects.all():
            for source in sources:
                api.process_events(api.only_new_events(source(instance)))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .claims import only_new_events
from .dispatch import process_events
from .registry import registry
from .types import Event, event

if TYPE_CHECKING:
    from django.db.models import Model

M = TypeVar("M", bound="Model")

__all__ = [
    "MODEL_SOURCES",
    "Event",
    "event",
    "only_new_events",
    "process_events",
    "register_group_handler",
    "register_model_event_source",
]


def register_group_handler(
    *, group: str | re.Pattern[str], handler: Callable[[Event[Any]], object]
) -> None:
    """Call ``handler`` for every event whose group matches the regex ``group``."""
    registry.add_handler(group, handler)


def register_model_event_source(
    *, sender: type[M], source: Callable[[M], Iterable[Mapping[str, Any]] | None]
) -> None:
    """Run ``source`` over every saved ``sender`` instance (and in the batch command).

    Typed like ``@event_source``: a ``source`` that cannot take a ``sender`` is a mypy error.
    """
    registry.add_source(sender, source)


class _ModelSources(Mapping["type[Model]", "list[Callable[[Any], Any]]"]):
    """A live, read-only view of the registry: model -> list of its source functions."""

    def __getitem__(self, model: type[Model]) -> list[Callable[[Any], Any]]:
        sources = registry.sources(model)
        if not sources:
            raise KeyError(model)
        return [spec.function for spec in sources]

    def __iter__(self) -> Iterator[type[Model]]:
        return iter(registry.models())

    def __len__(self) -> int:
        return len(registry.models())

    def __repr__(self) -> str:
        return f"MODEL_SOURCES({dict(self.items())!r})"


MODEL_SOURCES: Mapping[type[Model], list[Callable[[Any], Any]]] = _ModelSources()
