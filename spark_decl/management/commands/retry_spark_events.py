"""``manage.py retry_spark_events``: re-run failed and abandoned handler calls."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from spark_decl.retry import DEFAULT_STALE_AFTER, retry_events


class Command(BaseCommand):
    help = (
        "Re-run the handler calls that failed and are due, and finish the calls of events "
        "that were claimed but never completed (the process died). Only the failed handlers "
        "run again, never one that succeeded for that event."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--stale-after",
            type=float,
            default=DEFAULT_STALE_AFTER,
            metavar="SECONDS",
            help=(
                "Also run calls left pending for at least this many seconds "
                f"(default {DEFAULT_STALE_AFTER}). 0 finishes every pending call now."
            ),
        )
        parser.add_argument(
            "--all",
            action="store_true",
            dest="ignore_schedule",
            help="Retry failed calls now, ignoring the backoff schedule.",
        )

    def handle(
        self, *args: Any, stale_after: float, ignore_schedule: bool, **options: Any
    ) -> None:
        if stale_after < 0:
            raise CommandError("--stale-after must be 0 or more seconds.")
        result = retry_events(stale_after=stale_after, ignore_schedule=ignore_schedule)
        self.stdout.write(
            f"{result.due} due, {result.succeeded} succeeded, {result.failed} failed, "
            f"{result.skipped} skipped (done elsewhere), "
            f"{result.unknown_handler} with no registered handler"
        )
