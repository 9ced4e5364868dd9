"""Sphinx configuration for spark_decl's documentation (``make docs``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parent.parent
# The repository root (spark_decl, and tests.settings for django.setup()) and the local
# extension that documents management commands and models.
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent / "_ext")]

# autodoc imports spark_decl.models and the management commands: Django must be set up.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

project = "spark_decl"
author = "spark_decl contributors"
copyright = "2026, spark_decl contributors"

extensions = [
    "sphinx.ext.autodoc",
    "spark_docs",
]

html_theme = "furo"
html_title = "spark_decl"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# spark_decl uses `from __future__ import annotations`; keep the names as written.
autodoc_typehints_format = "short"

# A reference to a spark_decl name that does not exist (renamed, removed, misspelt) fails
# the build. Other targets (Python, Django, type variables) are not documented here.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!spark_decl\b).*"),
    (r"py:.*", r"spark_decl(\.\w+)*\.[A-Z]"),
]
