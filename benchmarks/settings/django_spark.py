"""Settings of the django-spark 0.3.0 benchmark processes."""

from __future__ import annotations

# django-spark 0.3.0 imports ``ugettext_lazy``, which Django 4.0 removed: alias it before
# ``spark`` is imported (the app registry imports it after the settings are read).
import django.utils.translation as _translation

_translation.ugettext_lazy = _translation.gettext_lazy  # type: ignore[attr-defined]

from .base import *  # noqa: E402, F403
from .base import BENCH_APPS  # noqa: E402

INSTALLED_APPS = ["spark", *BENCH_APPS]
