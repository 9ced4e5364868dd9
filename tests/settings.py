"""Settings for spark_decl's own test suite.

SQLite (a file, so subprocess tests can share it) by default; PostgreSQL when
``SPARK_DECL_TEST_DB=postgresql``, with ``PGHOST``/``PGPORT``/``PGUSER``/``PGPASSWORD``/
``PGDATABASE`` as libpq reads them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import django

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = "spark-decl-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "spark_decl",
    "tests.testapp",
]
# Django's tasks framework: built in from Django 6.0, the django-tasks backport before.
if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")
INSTALLED_APPS.append("django_tasks_db")

# The default backend runs tasks at once, in-process (after the claim commits); tests that
# need a queue use django-tasks-db's DatabaseBackend (tests/background.py), and the
# db_worker subprocesses get it from SPARK_DECL_TEST_TASKS=database.
TASKS: dict[str, dict[str, Any]] = {
    "default": {
        "BACKEND": (
            "django.tasks.backends.immediate.ImmediateBackend"
            if django.VERSION >= (6, 0)
            else "django_tasks.backends.immediate.ImmediateBackend"
        )
    }
}
if os.environ.get("SPARK_DECL_TEST_TASKS") == "database":
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}

DATABASES: dict[str, dict[str, Any]]
if os.environ.get("SPARK_DECL_TEST_DB", "sqlite") == "postgresql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("PGDATABASE", "spark_decl"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": BASE_DIR / "db.sqlite3",
            "TEST": {
                "NAME": os.environ.get("SPARK_DECL_TEST_SQLITE", str(BASE_DIR / "test.sqlite3"))
            },
            "OPTIONS": {"timeout": 20},
        }
    }

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
if django.VERSION >= (6, 1):
    # Django 6.1 replaces EMAIL_BACKEND (deprecated) with named mailers.
    MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}
else:
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
