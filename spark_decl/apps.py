"""App configs: autodiscovery of ``<app>.spark`` modules and the system checks.

``INSTALLED_APPS = ["spark_decl", ...]`` autodiscovers. To register everything yourself
instead (as ``django.contrib.admin.apps.SimpleAdminConfig`` does for the admin), install
``"spark_decl.apps.SimpleSparkDeclConfig"``.
"""

from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_save
from django.utils.module_loading import autodiscover_modules
from django.utils.translation import gettext_lazy as _


class SimpleSparkDeclConfig(AppConfig):
    """spark_decl without autodiscovery."""

    name = "spark_decl"
    label = "spark_decl"
    verbose_name = _("Spark events")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported for its side effect: registering the system checks.
        from . import checks  # noqa: F401  # pyright: ignore[reportUnusedImport]
        from .sources import on_post_save

        post_save.connect(on_post_save, dispatch_uid="spark_decl.sources.on_post_save")


class SparkDeclConfig(SimpleSparkDeclConfig):
    """The default config: imports ``<app>.spark`` of every installed app."""

    default = True

    def ready(self) -> None:
        super().ready()
        autodiscover()


def autodiscover() -> None:
    """Import the ``spark`` module of every installed app, as the admin does with ``admin``:
    a module that fails to import raises, with nothing of it left registered."""
    from .registry import registry

    autodiscover_modules("spark", register_to=registry)
