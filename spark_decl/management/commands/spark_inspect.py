"""``manage.py spark_inspect``: what is registered, what is stored, what is connected."""

from __future__ import annotations

import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from spark_decl.health import WINDOWS, HandlerHealth, Health, describe_duration, health
from spark_decl.inspection import Inspection, SourceInfo, inspect_spark
from spark_decl.outcomes import STATUSES

DEFAULT_WINDOW = "24h"


class Command(BaseCommand):
    help = (
        "Show every registered event source and handler, the stored event groups each "
        "handler matches, the stored groups no handler matches, the handler calls per "
        "status, and the receivers of spark_decl's signals; with --health, how events "
        "and calls are doing instead (backlog, failure rates, problems). Reads the "
        "database, writes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print one JSON document instead (its keys are documented and stable).",
        )
        parser.add_argument(
            "--health",
            action="store_true",
            dest="show_health",
            help="Show the health of the stored events and calls: problems, and per "
            "handler its calls, recent failure rate and backlog; per group its events.",
        )
        parser.add_argument(
            "--window",
            choices=list(WINDOWS),
            help=f"With --health: the stretch of time to count (default {DEFAULT_WINDOW}).",
        )
        parser.add_argument(
            "--fail-on-problems",
            action="store_true",
            help="With --health: exit with status 1 when there are problems (for alerting); "
            "without it the exit status is 0 whatever the health.",
        )

    def handle(
        self,
        *args: Any,
        as_json: bool,
        show_health: bool,
        window: str | None,
        fail_on_problems: bool,
        **options: Any,
    ) -> None:
        if not show_health:
            for given, option in ((window, "--window"), (fail_on_problems, "--fail-on-problems")):
                if given:
                    raise CommandError(f"{option} only applies with --health.")
            inspection = inspect_spark()
            if as_json:
                self.stdout.write(json.dumps(inspection.as_dict(), indent=2))
            else:
                self.write_text(inspection)
            return
        found = health(window or DEFAULT_WINDOW)
        if as_json:
            self.stdout.write(json.dumps(found.as_dict(), indent=2))
        else:
            self.write_health(found)
        if fail_on_problems and found.problems():
            # As makemigrations --check: the report is printed, the status says "act".
            sys.exit(1)

    def write_health(self, found: Health) -> None:
        heading, label = self.style.MIGRATE_HEADING, self.style.MIGRATE_LABEL
        span = found.window.name
        self.stdout.write(
            heading(f"Health over the last {span}")
            + f" (since {found.since:%Y-%m-%d %H:%M} UTC, now {found.now:%Y-%m-%d %H:%M} UTC, "
            f"database {found.database!r})"
        )
        problems = found.problems()
        self.stdout.write("")
        if problems:
            self.stdout.write(heading(f"Problems ({len(problems)})"))
            for problem in problems:
                self.stdout.write("  " + self.style.ERROR(problem))
        else:
            self.stdout.write(heading("Problems: none, healthy"))

        self.stdout.write("")
        self.stdout.write(heading(f"Handlers ({len(found.handlers)})"))
        for handler in found.handlers:
            name = label(handler.name)
            if not handler.registered:
                name += self.style.WARNING(" (not registered)")
            self.stdout.write(f"  {name}")
            for line in self.describe_handler(handler, found):
                self.stdout.write(f"    {line}")
        if not found.handlers:
            self.stdout.write("  none registered")

        self.stdout.write("")
        self.stdout.write(
            heading(f"Groups ({len(found.groups)}), events in the last {span} and their calls now")
        )
        for group in found.groups:
            text = describe_group(group.name, group.events)
            if group.calls.total:
                text += f", their calls: {self.describe_outcomes(group.calls.as_dict())}"
            self.stdout.write(f"  {text}")
        if not found.groups:
            self.stdout.write("  none")

        if found.outbox:
            oldest = found.oldest_outbox
            waited = f", the oldest for {describe_duration(found.now - oldest)}" if oldest else ""
            self.stdout.write("")
            self.stdout.write(
                heading("Outbox") + f": {found.outbox} saved events not claimed yet{waited}"
            )

    def describe_handler(self, handler: HandlerHealth, found: Health) -> list[str]:
        recent, opened = handler.recent, handler.open
        if recent.failure_rate is None:
            last_hour = "no call ran"
        else:
            rate, failing, ran = recent.failure_rate, recent.failing, recent.ran
            last_hour = f"{rate:.0%} failed ({failing} of {ran} calls)"
            if recent.failing:
                last_hour = self.style.ERROR(last_hour)
        lines = [
            f"calls: {self.describe_outcomes(handler.window.as_dict())}",
            f"last hour: {last_hour}",
            f"backlog: {opened.pending} pending, {opened.failed} failed waiting for a retry, "
            f"{opened.given_up} given up",
        ]
        if opened.oldest_pending:
            lines.append(
                f"oldest pending: {opened.oldest_pending:%Y-%m-%d %H:%M} UTC, waiting "
                f"{describe_duration(found.now - opened.oldest_pending)}"
            )
        if handler.first_failure:
            lines.append(
                self.style.ERROR(f"failing since: {handler.first_failure:%Y-%m-%d %H:%M} UTC")
                + (
                    f" (last failure {handler.last_failure:%Y-%m-%d %H:%M} UTC)"
                    if handler.last_failure
                    else ""
                )
            )
        return lines

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
