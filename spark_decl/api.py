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
from typing import TYPE_CHECKING, Any, NoReturn, Self, SupportsIndex, TypeVar, cast

from django.db import DEFAULT_DB_ALIAS

from . import claims, dispatch
from .exceptions import RegistrationError
from .registry import function_name, registry
from .types import Event, event

if TYPE_CHECKING:
    from django.db.models import Model

M = TypeVar("M", bound="Model")
E = TypeVar("E", bound="Mapping[str, Any]")

__all__ = [
    "MODEL_SOURCES",
    "Event",
    "event",
    "only_new_events",
    "process_events",
    "register_group_handler",
    "register_model_event_source",
]


def only_new_events(iterable: Iterable[E], *, using: str = DEFAULT_DB_ALIAS) -> Iterator[E]:
    """:func:`spark_decl.only_new_events`, taking django-spark's keyword too:
    ``only_new_events(iterable=source(instance))``."""
    return claims.only_new_events(iterable, using=using)


def process_events(
    iterable: Iterable[Event[Any]] | Iterable[Mapping[str, Any]],
    *,
    using: str = DEFAULT_DB_ALIAS,
) -> None:
    """:func:`spark_decl.process_events`, taking django-spark's keyword too:
    ``process_events(iterable=only_new_events(iterable=events))``."""
    dispatch.process_events(iterable, using=using)


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


def _append_source(model: type[Model], source: Callable[[Any], Any]) -> None:
    """Register ``source`` as django-spark's ``MODEL_SOURCES[model].append(source)`` did:
    for the batch only (there only ``register_model_event_source`` connected
    ``post_save``). A source registered already keeps how it was registered."""
    name = function_name(source)
    current = next((spec for spec in registry.sources(model) if spec.name == name), None)
    if current is None:
        registry.add_source(model, source, on_save=False)
    else:
        registry.add_source(model, source, on_save=current.on_save, queryset=current.queryset)


def _refuse(operation: str, model: type[Model] | None) -> NoReturn:
    sender = model.__name__ if model is not None else "Model"
    raise RegistrationError(
        f"{operation} cannot change the registered event sources: they are only added to. "
        f"Register a source with api.register_model_event_source(sender={sender}, "
        f"source=...) or @event_source({sender}) (api.MODEL_SOURCES[{sender}].append(source) "
        "does the same, for the batch only); to drop one, stop registering it."
    )


class _SourceList(list[Callable[[Any], Any]]):
    """``MODEL_SOURCES[model]``: a copy of ``model``'s sources, whose ``append`` and
    ``extend`` (and ``+=``) register the source; every other change is refused."""

    __slots__ = ("model",)

    def __init__(self, model: type[Model], sources: Iterable[Callable[[Any], Any]]) -> None:
        super().__init__(sources)
        self.model = model

    def _refuse(self, method: str) -> NoReturn:
        _refuse(f"api.MODEL_SOURCES[{self.model.__name__}].{method}", self.model)

    def append(self, source: Callable[[Any], Any], /) -> None:
        _append_source(self.model, source)
        # What the registry now holds: a source of the same name was replaced, not added.
        list.__init__(self, (spec.function for spec in registry.sources(self.model)))

    def extend(self, sources: Iterable[Callable[[Any], Any]], /) -> None:
        for source in list(sources):
            self.append(source)

    # typeshed's own list.__iadd__ needs the same ignore: mypy compares it with __add__.
    def __iadd__(self, sources: Iterable[Callable[[Any], Any]], /) -> Self:  # type: ignore[override, misc]
        self.extend(sources)
        return self

    def insert(self, index: SupportsIndex, source: Callable[[Any], Any], /) -> NoReturn:
        self._refuse("insert()")

    def remove(self, source: Callable[[Any], Any], /) -> NoReturn:
        self._refuse("remove()")

    def pop(self, index: SupportsIndex = -1, /) -> NoReturn:
        self._refuse("pop()")

    def clear(self) -> NoReturn:
        self._refuse("clear()")

    def sort(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._refuse("sort()")

    def reverse(self) -> NoReturn:
        self._refuse("reverse()")

    def __setitem__(self, index: Any, value: Any, /) -> NoReturn:
        self._refuse("__setitem__() (item assignment)")

    def __delitem__(self, index: Any, /) -> NoReturn:
        self._refuse("__delitem__() (del)")

    def __imul__(self, count: SupportsIndex, /) -> NoReturn:
        self._refuse("__imul__() (*=)")


class _ModelSources(Mapping["type[Model]", "list[Callable[[Any], Any]]"]):
    """A live view of the registry: model -> list of its source functions.

    Like django-spark's dict as far as its code used it: for any concrete model,
    ``MODEL_SOURCES[model]`` is a list (empty if it has no source) whose ``append`` and
    ``extend`` register a source; ``in``, ``len()``, ``get()`` and iteration see only the
    models with sources. Changes that would unregister or reorder sources raise
    :class:`~spark_decl.exceptions.RegistrationError` saying what to write instead.
    """

    def __getitem__(self, model: type[Model]) -> list[Callable[[Any], Any]]:
        from django.db.models import Model

        key = cast("object", model)  # untyped callers pass anything
        if not (isinstance(key, type) and issubclass(key, Model)) or key._meta.abstract:
            raise KeyError(model)
        return _SourceList(key, (spec.function for spec in registry.sources(key)))

    def __contains__(self, model: object) -> bool:
        return any(model is known for known in registry.models())

    def get(self, model: type[Model], default: Any = None) -> Any:
        if model not in self:
            return default  # not the empty list __getitem__ gives
        return self[model]

    def __iter__(self) -> Iterator[type[Model]]:
        return iter(registry.models())

    def __len__(self) -> int:
        return len(registry.models())

    def __repr__(self) -> str:
        return f"MODEL_SOURCES({dict(self.items())!r})"

    def setdefault(
        self, model: type[Model], default: Iterable[Callable[[Any], Any]] = ()
    ) -> list[Callable[[Any], Any]]:
        """django-spark registered with ``MODEL_SOURCES.setdefault(model, []).append(...)``."""
        sources = self[model]
        if model not in self:
            sources.extend(default)
        return sources

    def __setitem__(self, model: type[Model], sources: Any) -> None:
        if isinstance(sources, _SourceList) and sources.model is model:
            return  # MODEL_SOURCES[model] += [...]: its list registered them already
        _refuse(f"api.MODEL_SOURCES[{model.__name__}] = ...", model)

    def __delitem__(self, model: type[Model]) -> NoReturn:
        _refuse(f"del api.MODEL_SOURCES[{model.__name__}]", model)

    def pop(self, model: type[Model], *default: Any) -> NoReturn:
        _refuse(f"api.MODEL_SOURCES.pop({model.__name__})", model)

    def popitem(self) -> NoReturn:
        _refuse("api.MODEL_SOURCES.popitem()", None)

    def clear(self) -> NoReturn:
        _refuse("api.MODEL_SOURCES.clear()", None)

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse("api.MODEL_SOURCES.update()", None)


MODEL_SOURCES: Mapping[type[Model], list[Callable[[Any], Any]]] = _ModelSources()
