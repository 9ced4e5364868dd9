"""Settings for ``make screenshots`` (``scripts/screenshots.py``) only: never for serving.

The example project's settings, plus what taking screenshots needs: a throwaway database
named by the script, a URL that logs the demo superuser in without a password
(:mod:`example_project.screenshot_site`), and a mail backend that refuses one domain, so
that the demo data has failed calls with real tracebacks.
"""

from __future__ import annotations

import os

from .settings import *  # noqa: F403

# The script creates the file in a temporary directory and deletes it afterwards; the
# example's own db.sqlite3 is never touched.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["SPARK_DECL_SCREENSHOT_DB"],
    }
}

ROOT_URLCONF = "example_project.screenshot_site"
EMAIL_BACKEND = "example_project.screenshot_site.RefusingEmailBackend"

# Three attempts in all, so that the demo reaches "given up" in two retries.
SPARK_DECL = {"MAX_ATTEMPTS": 3}

# The failures are on purpose: keep the server's and the data builder's output short.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"spark_decl": {"level": "CRITICAL"}},
}
