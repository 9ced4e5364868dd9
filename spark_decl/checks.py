"""System checks (``manage.py check``).

=====================  ======================================================================
``spark_decl.E001``    a database spark_decl writes to cannot claim keys atomically
``spark_decl.E002``    an event source is registered for a model that is not installed or
                       is swapped out
``spark_decl.E003``    the ``SPARK_DECL`` setting is invalid
``spark_decl.W001``    a source or handler has a name other functions share (a lambda, a
                       function made inside another function, a ``functools.partial``)
``spark_decl.W002``    saving a proxy or multi-table subclass of a model does not run that
                       model's on-save sources
``spark_decl.E010``    background handlers are registered, but their calls cannot be
                       enqueued (no tasks framework, a misconfigured backend)
``spark_decl.W010``    background handlers are registered on a ``DummyBackend``
=====================  ======================================================================

What each one means and how to fix it: :ref:`system-checks`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from django.core.checks import Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router

from .conf import get_settings
from .enqueue import get_backend, get_task
from .exceptions import BackgroundUnavailable, UnsupportedDatabase
from .registry import registry
from .vendors import vendor_of

if TYPE_CHECKING:
    from django.core.checks import CheckMessage
    from django.db.models import Model


@register()
def check_databases(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """spark_decl.E001: a database spark_decl writes to cannot claim keys atomically."""
    from .models import EventRecord

    errors: list[Error] = []
    for alias in connections:
        if not router.allow_migrate_model(alias, EventRecord):
            continue
        try:
            vendor_of(connections[alias])
        except UnsupportedDatabase as exc:
            errors.append(
                Error(
                    str(exc),
                    hint="Use PostgreSQL, or a Python whose sqlite3 module is SQLite >= 3.35.",
                    obj=alias,
                    id="spark_decl.E001",
                )
            )
    return errors


@register()
def check_source_models(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """spark_decl.E002: a source's model has no table to read: its app is not installed,
    or it is swapped out (``auth.User`` when ``AUTH_USER_MODEL`` names another model)."""
    errors: list[Error] = []
    for model in registry.models():
        names = ", ".join(spec.name for spec in registry.sources(model))
        opts = model._meta
        if not _installed(model):
            problem = f"its app {opts.app_label!r} is not in INSTALLED_APPS"
            hint = f"Add the app that defines {opts.label} to INSTALLED_APPS."
        elif opts.swapped:
            problem = f"it is swapped out for {opts.swapped}"
            hint = f"Register the source for the model that replaces it ({opts.swapped})."
        else:
            continue
        errors.append(
            Error(
                f"Event source(s) {names} are registered for {opts.label}, but {problem}: "
                "its instances are never saved and process_spark_sources cannot read it.",
                hint=hint,
                obj=model,
                id="spark_decl.E002",
            )
        )
    return errors


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """spark_decl.E003: ``SPARK_DECL`` is invalid; without this check the first save that
    produces an event would fail with ``ImproperlyConfigured``."""
    try:
        get_settings()
    except ImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                hint="The settings reference lists every key and its allowed values.",
                obj="SPARK_DECL",
                id="spark_decl.E003",
            )
        ]
    return []


@register()
def check_unique_names(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """spark_decl.W001: a source or handler whose dotted name other functions share.

    Sources and handlers are identified by name: registering another function under the
    same name replaces the first one (that is what makes a re-import harmless), and stored
    outcomes are matched to handlers by name. Once two lambdas were registered, only the
    second is left, so a name that is not unique by construction is reported even alone.
    """
    functions: list[tuple[str, str, Callable[..., object]]] = [
        ("handler", spec.name, spec.function) for spec in registry.handlers()
    ]
    functions += [("event source", spec.name, spec.function) for spec in registry.sources()]
    warnings: list[Warning] = []
    for kind, name, function in functions:
        shared_by = _shared_by(function)
        if shared_by is None:
            continue
        warnings.append(
            Warning(
                f"The {kind} {name} has a name {shared_by} also has: registering another "
                f"one replaces it without notice, and its stored calls cannot be told apart.",
                hint="Register a function defined with def at module level.",
                obj=name,
                id="spark_decl.W001",
            )
        )
    return warnings


def _shared_by(function: Callable[..., object]) -> str | None:
    """Who else has ``function``'s dotted name by construction, or ``None``."""
    if isinstance(function, functools.partial):
        return "every functools.partial"
    qualname = getattr(function, "__qualname__", "")
    if "<lambda>" in qualname:
        return f"every lambda in {function.__module__}"
    if "<locals>" in qualname:
        return f"every function made by {qualname.partition('.<locals>')[0]}()"
    if inspect.isroutine(function) or isinstance(function, type):
        return None
    if getattr(function, "__qualname__", None) is None:
        # A callable object without a name of its own is named after its class.
        return f"every instance of {type(function).__qualname__}"
    return None


@register()
def check_subclass_saves(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """spark_decl.W002: ``post_save`` is sent with the class that was saved, so saving a
    proxy or multi-table subclass of a model does not run the model's on-save sources."""
    warnings: list[Warning] = []
    for model in registry.models():
        parent_sources = {spec.name for spec in registry.save_sources(model)}
        if not parent_sources:
            continue
        for subclass in _installed_subclasses(model):
            own = {spec.name for spec in registry.save_sources(subclass)}
            missing = sorted(parent_sources - own)
            if not missing:
                continue
            kind = "a proxy" if subclass._meta.proxy else "a multi-table subclass"
            warnings.append(
                Warning(
                    f"Saving a {subclass._meta.label} ({kind} of {model._meta.label}) does "
                    f"not run {', '.join(missing)}: on-save sources run for the exact class "
                    "that was saved. process_spark_sources still sees those rows.",
                    hint=(
                        f"Register the source(s) for {subclass._meta.label} too (stack "
                        f"@event_source({subclass.__name__}) on them), or silence "
                        "spark_decl.W002 if saves through it should not produce events."
                    ),
                    obj=subclass,
                    id="spark_decl.W002",
                )
            )
    return warnings


def _installed_subclasses(model: type[Model]) -> Iterator[type[Model]]:
    """Proxies and multi-table children of ``model``, at any depth, once each."""
    seen: set[type[Model]] = set()
    pending = model.__subclasses__()
    while pending:
        subclass = pending.pop(0)
        if subclass in seen:
            continue
        seen.add(subclass)
        pending += subclass.__subclasses__()
        opts = subclass._meta
        if not opts.abstract and _installed(subclass) and not opts.swapped:
            yield subclass


def _installed(model: type[Model]) -> bool:
    # model._meta.apps: the registry the model was created in (the global one outside tests).
    return model._meta.app_label in model._meta.apps.app_configs


@register()
def check_background(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """spark_decl.E010 and W010: background handlers whose calls could not run."""
    background = sorted(spec.name for spec in registry.handlers() if spec.background)
    if not background:
        return []
    try:
        get_task("run_background_handler")
    except BackgroundUnavailable as exc:
        return [
            Error(
                f"{len(background)} handler(s) have background=True, e.g. {background[0]}, "
                f"but their calls cannot be enqueued: {exc}",
                hint="Install and configure Django's tasks framework (the TASKS setting), "
                "or register the handlers without background=True.",
                id="spark_decl.E010",
            )
        ]
    from ._tasks import DummyBackend

    if isinstance(get_backend(), DummyBackend):
        return [
            Warning(
                f"The task backend {get_settings().TASK_BACKEND!r} is a DummyBackend: the "
                f"calls of {len(background)} background handler(s), e.g. {background[0]}, "
                "are enqueued but never run.",
                hint="Use a backend with workers (e.g. django-tasks-db) outside tests.",
                id="spark_decl.W010",
            )
        ]
    return []
