"""``manage.py spark_inspect``: what is registered, what is stored, what is connected."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from spark_decl.inspection import Inspection, SourceInfo, inspect_spark
from spark_decl.outcomes import STATUSES


class Command(BaseCommand):
    help = (
        "Show every registered event source and handler, the stored event groups each "
        "handler matches, the stored groups no handler matches, the handler calls per "
        "status, and the receivers of spark_decl's signals. Reads the database, writes "
        "nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print one JSON document instead (its keys are documented and stable).",
        )

    def handle(self, *args: Any, as_json: bool, **options: Any) -> None:
        inspection = inspect_spark()
        if as_json:
            self.stdout.write(json.dumps(inspection.as_dict(), indent=2))
        else:
            self.write_text(inspection)

    def write_text(self, inspection: Inspection) -> None:
        heading = self.style.MIGRATE_HEADING
        events = {group.name: group.events for group in inspection.groups}
        self.stdout.write(heading(f"Sources ({len(inspection.sources)})"))
        models: dict[str, list[SourceInfo]] = {}
        for source in inspection.sources:
            models.setdefault(source.model, []).append(source)
        for model, sources in models.items():
            self.stdout.write(f"  {self.style.MIGRATE_LABEL(model)}")
            for source in sources:
                runs = "on save and in the batch" if source.on_save else "batch only"
                if source.queryset is not None:
                    runs += f", batch scans {source.queryset}()"
                self.stdout.write(f"    {source.name} ({runs})")
        if not models:
            self.stdout.write("  none registered")

        self.stdout.write("")
        self.stdout.write(heading(f"Handlers ({len(inspection.handlers)}), in the order they run"))
        for handler in inspection.handlers:
            runs = "as a background task" if handler.background else "in process"
            if handler.is_async:
                runs += " (async function)"
            self.stdout.write(f"  {self.style.MIGRATE_LABEL(handler.name)}")
            self.stdout.write(f"    patterns: {', '.join(handler.patterns)}")
            self.stdout.write(f"    runs: {runs}")
            self.stdout.write(f"    calls: {self.describe_outcomes(handler.outcomes)}")
            if not handler.groups:
                self.stdout.write("    stored groups it matches: none")
                continue
            self.stdout.write("    stored groups it matches:")
            for name in handler.groups:
                self.stdout.write(f"      {describe_group(name, events[name])}")
        if not inspection.handlers:
            self.stdout.write("  none registered")

        unhandled = inspection.unhandled_groups
        self.stdout.write("")
        self.stdout.write(heading(f"Stored groups no handler matches ({len(unhandled)})"))
        for name in unhandled:
            self.stdout.write("  " + self.style.WARNING(describe_group(name, events[name])))
        if not unhandled:
            self.stdout.write("  none")

        if inspection.unregistered_outcomes:
            self.stdout.write("")
            self.stdout.write(
                heading(
                    f"Calls of handlers that are not registered "
                    f"({len(inspection.unregistered_outcomes)})"
                )
            )
            for name, outcomes in inspection.unregistered_outcomes.items():
                self.stdout.write(
                    f"  {self.style.WARNING(name)}: {self.describe_outcomes(outcomes)}"
                )

        self.stdout.write("")
        self.stdout.write(heading("Signal receivers"))
        for signal, receivers in inspection.receivers.items():
            self.stdout.write(f"  {signal}: {', '.join(receivers) or 'none'}")

    def describe_outcomes(self, outcomes: dict[str, int]) -> str:
        parts = []
        for status in STATUSES:
            text = f"{outcomes.get(status, 0)} {status.replace('_', ' ')}"
            if status in {"failed", "given_up"} and outcomes.get(status):
                text = self.style.ERROR(text)
            parts.append(text)
        return ", ".join(parts)


def describe_group(name: str, events: int) -> str:
    return f"{name} ({events} event{'' if events == 1 else 's'})"
