"""``manage.py process_spark_sources``: every instance through every source (cron)."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser

from spark_decl.registry import registry
from spark_decl.sources import process_model


class Command(BaseCommand):
    help = (
        "Send every instance of every model with event sources through its sources, "
        "claim the events never seen before and run their handlers."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            metavar="app_label.Model",
            help="Only process this model (repeatable).",
        )

    def handle(self, *args: Any, models: list[str] | None = None, **options: Any) -> None:
        registered = registry.models()
        if models:
            selected = []
            for label in models:
                try:
                    model = apps.get_model(label)
                except (LookupError, ValueError) as exc:
                    raise CommandError(f"Unknown model {label!r}: {exc}") from exc
                if model not in registered:
                    known = ", ".join(m._meta.label for m in registered) or "none"
                    raise CommandError(
                        f"{model._meta.label} has no event sources (models with sources: {known})."
                    )
                selected.append(model)
        else:
            selected = registered
        for model in selected:
            result = process_model(model)
            self.stdout.write(
                f"{model._meta.label}: {result.rows} rows, {result.events} events, "
                f"{result.new} new, {result.dispatch.calls} handler calls, "
                f"{result.dispatch.failed} failed"
            )
