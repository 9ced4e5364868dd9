"""What both packages' benchmark processes share: the bench app and the database.

The worker passes the database through the environment:

* ``BENCH_DB_VENDOR``: ``sqlite`` (default) or ``postgresql``;
* ``BENCH_DB_NAME``: the SQLite file, or the PostgreSQL database name;
* PostgreSQL's host, port, user and password come from ``PGHOST``, ``PGPORT``, ``PGUSER``
  and ``PGPASSWORD``, as libpq reads them.

Django's defaults are kept for everything that affects speed (SQLite's rollback journal and
``synchronous=FULL``, no persistent connections), the same for both packages.
"""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = "spark-decl-benchmarks-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

BENCH_APPS = ["benchmarks.benchapp"]

_vendor = os.environ.get("BENCH_DB_VENDOR", "sqlite")
_name = os.environ.get("BENCH_DB_NAME", "")
if not _name:
    raise RuntimeError("BENCH_DB_NAME is not set: run the benchmarks through benchmarks/run.py.")

DATABASES: dict[str, dict[str, Any]]
if _vendor == "postgresql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": _name,
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
    }
elif _vendor == "sqlite":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _name,
        }
    }
else:
    raise RuntimeError(f"BENCH_DB_VENDOR must be sqlite or postgresql, got {_vendor!r}.")

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
