"""Settings, read from the ``SPARK_DECL`` dict in Django's settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, float | str | bool] = {
    # A failing handler call is retried this many times in all before it is given up.
    "MAX_ATTEMPTS": 10,
    # The first retry is due at once; later ones wait BACKOFF_SECONDS, doubling each time,
    # capped at BACKOFF_MAX_SECONDS.
    "BACKOFF_SECONDS": 60,
    "BACKOFF_MAX_SECONDS": 3600,
    # How many rows the batch reads, and events it claims, at a time.
    "CHUNK_SIZE": 2000,
    # Handler calls share a transaction until it has lasted about this long: fast handlers
    # share one commit, slow ones commit often (a crash rolls back at most this much work,
    # and SQLite's write lock is never held much longer).
    "TRANSACTION_SECONDS": 0.5,
    # Background handlers (``@handles(..., background=True)``) and ``process_spark_sources
    # --enqueue`` chunks are enqueued on this backend of Django's TASKS setting, in this queue.
    "TASK_BACKEND": "default",
    "TASK_QUEUE": "default",
    # The longest a save (once its transaction commits) or ``process_spark_sources
    # --enqueue`` waits for a backend that talks to a broker (RQ, Celery) to take its tasks:
    # a broker that never answers must not hang a request. Calls not taken by then stay
    # pending for ``retry_spark_events --stale-after``.
    "ENQUEUE_TIMEOUT": 5.0,
    # False: events are still claimed and event_dispatched is still sent, but no handler
    # runs and nothing is enqueued; every call stays pending (retry_spark_events runs
    # them). For tests (spark_decl.testing.capture_events(run_handlers=False) sets it) and
    # for environments that must not send mail.
    "RUN_HANDLERS": True,
}


@dataclass(frozen=True)
class SparkSettings:
    MAX_ATTEMPTS: int
    BACKOFF_SECONDS: int
    BACKOFF_MAX_SECONDS: int
    CHUNK_SIZE: int
    TRANSACTION_SECONDS: float
    TASK_BACKEND: str
    TASK_QUEUE: str
    ENQUEUE_TIMEOUT: float
    RUN_HANDLERS: bool


@cache
def get_settings() -> SparkSettings:
    """Return the effective settings, raising ``ImproperlyConfigured`` on unknown or bad ones.

    Read once and cached; ``override_settings(SPARK_DECL=...)`` clears the cache.
    """
    user = getattr(settings, "SPARK_DECL", {})
    if not isinstance(user, dict):
        raise ImproperlyConfigured("SPARK_DECL must be a dict.")
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown SPARK_DECL setting(s): {', '.join(unknown)}. "
            f"Known: {', '.join(sorted(DEFAULTS))}."
        )
    values = {**DEFAULTS, **user}
    for name, value in values.items():
        if name in ("TASK_BACKEND", "TASK_QUEUE"):
            if not isinstance(value, str) or not value:
                raise ImproperlyConfigured(
                    f"SPARK_DECL[{name!r}] must be a non-empty string, got {value!r}."
                )
        elif name == "TRANSACTION_SECONDS":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ImproperlyConfigured(
                    f"SPARK_DECL[{name!r}] must be a number of seconds >= 0, got {value!r}."
                )
        elif name == "RUN_HANDLERS":
            if not isinstance(value, bool):
                raise ImproperlyConfigured(
                    f"SPARK_DECL[{name!r}] must be True or False, got {value!r}."
                )
        elif name == "ENQUEUE_TIMEOUT":
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ImproperlyConfigured(
                    f"SPARK_DECL[{name!r}] must be a number of seconds > 0, got {value!r}."
                )
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ImproperlyConfigured(
                f"SPARK_DECL[{name!r}] must be a positive integer, got {value!r}."
            )
    return SparkSettings(**cast("dict[str, Any]", values))


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "SPARK_DECL":
        get_settings.cache_clear()
