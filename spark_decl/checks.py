"""System checks (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, register
from django.db import connections, router

from .claims import check_database
from .exceptions import UnsupportedDatabase


@register()
def check_databases(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """spark_decl.E001: a database spark_decl writes to cannot claim keys atomically."""
    from .models import EventRecord

    errors: list[Error] = []
    for alias in connections:
        if not router.allow_migrate_model(alias, EventRecord):
            continue
        try:
            check_database(connections[alias])
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
