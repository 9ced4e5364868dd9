"""Settings of the spark_decl benchmark processes."""

from __future__ import annotations

from .base import *  # noqa: F403
from .base import BENCH_APPS

# The bench app has no ``spark.py``: the worker registers the source and handlers itself (and
# measures plain saves with nothing registered), through ``spark_decl.registry.registry``.
INSTALLED_APPS = ["spark_decl", *BENCH_APPS]
