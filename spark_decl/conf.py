"""Settings, read from the ``SPARK_DECL`` dict in Django's settings."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULTS: dict[str, int] = {
    # A failing handler call is retried this many times in all before it is given up.
    "MAX_ATTEMPTS": 10,
    # The first retry is due at once; later ones wait BACKOFF_SECONDS, doubling each time,
    # capped at BACKOFF_MAX_SECONDS.
    "BACKOFF_SECONDS": 60,
    "BACKOFF_MAX_SECONDS": 3600,
    # How many events are claimed in one statement / rows read per chunk.
    "CHUNK_SIZE": 500,
}


@dataclass(frozen=True)
class SparkSettings:
    MAX_ATTEMPTS: int
    BACKOFF_SECONDS: int
    BACKOFF_MAX_SECONDS: int
    CHUNK_SIZE: int


def get_settings() -> SparkSettings:
    """Return the effective settings, raising ``ImproperlyConfigured`` on unknown or bad ones."""
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
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ImproperlyConfigured(
                f"SPARK_DECL[{name!r}] must be a positive integer, got {value!r}."
            )
    return SparkSettings(**values)
