"""Who is registered: event sources per model and handlers per group pattern.

There is one :class:`Registry`, ``spark_decl.registry.registry``, like the admin's default
``AdminSite``. Registration is idempotent: a function is identified by its dotted name
(``f"{fn.__module__}.{fn.__qualname__}"``), so re-importing a ``spark.py`` (autoreload, a test
importing it again) replaces the earlier registration instead of adding a second one.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Generator, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, cast

from .exceptions import InvalidPattern, RegistrationError, UnknownHandler

if TYPE_CHECKING:
    from django.db.models import Model, QuerySet

    from .types import Event

    SourceFunction = Callable[[Any], Iterable[Mapping[str, Any]] | None]
    HandlerFunction = Callable[[Event[Any]], object]
    QuerySetFactory = Callable[[], QuerySet[Any]]


def function_name(fn: Callable[..., object]) -> str:
    """The name spark_decl stores and shows for a source or handler."""
    module = getattr(fn, "__module__", None) or "<unknown>"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


@dataclass(frozen=True)
class SourceSpec:
    """A registered event source."""

    model: type[Model]
    function: SourceFunction
    name: str
    on_save: bool
    queryset: QuerySetFactory | None = None


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler and every pattern it was registered for."""

    function: HandlerFunction
    name: str
    patterns: tuple[re.Pattern[str], ...]
    background: bool
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", iscoroutinefunction(self.function))

    def matches(self, group: str) -> bool:
        return any(pattern.search(group) for pattern in self.patterns)


def compile_pattern(pattern: object, *, where: str) -> re.Pattern[str]:
    """Compile a group pattern, raising :class:`InvalidPattern` that names ``where`` it was."""
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise InvalidPattern(
                f"The pattern in {where} must match str groups; got the bytes pattern "
                f"{pattern.pattern!r}."
            )
        return cast("re.Pattern[str]", pattern)
    if not isinstance(pattern, str):
        raise InvalidPattern(
            f"The pattern in {where} must be a str or a compiled regex, "
            f"got {type(pattern).__name__} {pattern!r}."
        )
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidPattern(f"Invalid pattern {pattern!r} in {where}: {exc}.") from exc


@dataclass
class Registry:
    """Sources per model and handlers per name; routing per group is cached."""

    _sources: dict[type[Model], dict[str, SourceSpec]] = field(default_factory=dict)
    _handlers: dict[str, HandlerSpec] = field(default_factory=dict)
    _routes: dict[str, tuple[HandlerSpec, ...]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    # -- registration -------------------------------------------------------------------

    def add_source(
        self,
        model: type[Model],
        function: SourceFunction,
        *,
        on_save: bool = True,
        queryset: QuerySetFactory | None = None,
    ) -> SourceSpec:
        check_model(model)
        if not callable(function):
            raise RegistrationError(f"An event source for {model.__name__} must be callable.")
        if queryset is not None and not callable(queryset):
            raise RegistrationError(
                f"queryset= for the source {function_name(function)} must be a callable "
                "returning a QuerySet, e.g. lambda: Challenge.objects.filter(is_active=True)."
            )
        spec = SourceSpec(
            model=model,
            function=function,
            name=function_name(function),
            on_save=on_save,
            queryset=queryset,
        )
        with self._lock:
            self._sources.setdefault(model, {})[spec.name] = spec
        return spec

    def add_handler(
        self,
        pattern: str | re.Pattern[str],
        function: HandlerFunction,
        *,
        background: bool = False,
    ) -> HandlerSpec:
        if not callable(function):
            raise RegistrationError(f"A handler for {pattern!r} must be callable.")
        name = function_name(function)
        compiled = compile_pattern(pattern, where=f"the registration of {name}")
        with self._lock:
            current = self._handlers.get(name)
            if current is not None and current.function is function:
                # Another @handles stacked on the same function: one handler, more patterns.
                if current.background != background:
                    raise RegistrationError(
                        f"Handler {name} is registered with background={current.background} "
                        f"and background={background}; use the same value on every @handles."
                    )
                if compiled.pattern in {p.pattern for p in current.patterns}:
                    return current
                patterns = (*current.patterns, compiled)
            else:
                # New, or a re-imported module's new function object: replace.
                patterns = (compiled,)
            spec = HandlerSpec(
                function=function, name=name, patterns=patterns, background=background
            )
            self._handlers[name] = spec
            self._routes.clear()
        return spec

    # -- lookups --------------------------------------------------------------------------

    def models(self) -> list[type[Model]]:
        return [model for model, specs in self._sources.items() if specs]

    def sources(self, model: type[Model] | None = None) -> list[SourceSpec]:
        if model is not None:
            return list(self._sources.get(model, {}).values())
        return [spec for specs in self._sources.values() for spec in specs.values()]

    def save_sources(self, model: type[Model]) -> list[SourceSpec]:
        """The sources to run when an instance of exactly ``model`` is saved."""
        specs = self._sources.get(model)
        if not specs:
            return []
        return [spec for spec in specs.values() if spec.on_save]

    def handlers(self) -> list[HandlerSpec]:
        return list(self._handlers.values())

    def get_handler(self, name: str) -> HandlerSpec | None:
        return self._handlers.get(name)

    def handlers_for(self, group: str) -> tuple[HandlerSpec, ...]:
        """The handlers whose patterns match ``group``, in registration order (cached)."""
        try:
            return self._routes[group]
        except KeyError:
            pass
        with self._lock:
            route = tuple(spec for spec in self._handlers.values() if spec.matches(group))
            self._routes[group] = route
        return route

    # -- tests ------------------------------------------------------------------------------

    def clear(self) -> None:
        with self._lock:
            self._sources.clear()
            self._handlers.clear()
            self._routes.clear()

    # autodiscover_modules(register_to=registry) copies this before importing each app's
    # spark.py and assigns it back when the import fails, as for the admin's
    # AdminSite._registry: a module that fails half-way leaves nothing registered.
    @property
    def _registry(self) -> _Snapshot:
        with self._lock:
            return (
                {model: dict(specs) for model, specs in self._sources.items()},
                dict(self._handlers),
            )

    @_registry.setter
    def _registry(self, snapshot: _Snapshot) -> None:
        sources, handlers = snapshot
        with self._lock:
            self._sources = {model: dict(specs) for model, specs in sources.items()}
            self._handlers = dict(handlers)
            self._routes.clear()

    @contextmanager
    def isolated(self) -> Generator[Registry, None, None]:
        """Run a block with a copy of the registry, restoring the original afterwards."""
        saved = self._registry
        try:
            yield self
        finally:
            self._registry = saved


# What Registry._registry copies: the sources per model and the handlers by name.
_Snapshot = tuple[dict["type[Model]", dict[str, SourceSpec]], dict[str, HandlerSpec]]


def check_model(model: object) -> None:
    from django.db.models import Model

    if not (isinstance(model, type) and issubclass(model, Model)):
        raise RegistrationError(
            f"@event_source expects a model class, got {model!r}. "
            "Pass the class itself, e.g. @event_source(Challenge)."
        )
    if model._meta.abstract:
        raise RegistrationError(
            f"@event_source({model.__name__}): {model.__name__} is abstract; "
            "register its concrete subclasses."
        )


registry = Registry()


def resolve_handler(name: str) -> HandlerSpec:
    """The registered handler called ``name`` (its dotted name), or
    :class:`~spark_decl.exceptions.UnknownHandler`, suggesting close names.

    Names are only ever looked up in the registry, never imported.
    """
    spec = registry.get_handler(name)
    if spec is not None:
        return spec
    known = sorted(handler.name for handler in registry.handlers())
    message = f"No handler named {name!r} is registered."
    close = difflib.get_close_matches(name, known, n=3)
    if close:
        message += f" Did you mean {' or '.join(map(repr, close))}?"
    elif known:
        message += f" Handlers are named by module and function, e.g. {known[0]!r}."
    raise UnknownHandler(message)
