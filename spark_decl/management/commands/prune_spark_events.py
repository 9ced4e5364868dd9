"""``manage.py prune_spark_events``: retention for old, completed events."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from spark_decl.pruning import prune_events


class Command(BaseCommand):
    help = (
        "Shrink events older than --older-than DAYS whose handler calls are all done: their "
        "stored context and their outcomes' errors and tracebacks are cleared, but the "
        "events are kept, so their keys stay claimed and they never fire again. Events "
        "with a pending, failed or given-up call are never touched."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=int,
            required=True,
            metavar="DAYS",
            help="Only events created more than this many days ago (0 or more).",
        )
        parser.add_argument(
            "--delete-keys",
            action="store_true",
            help=(
                "Delete those events and their outcomes instead of clearing them. Their "
                "keys are forgotten: THOSE EVENTS CAN FIRE AGAIN, and their handlers run "
                "again, if a source (on save or in process_spark_sources) still yields them."
            ),
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only count what would be pruned; change nothing.",
        )

    def handle(
        self, *args: Any, older_than: int, delete_keys: bool, dry_run: bool, **options: Any
    ) -> None:
        if older_than < 0:
            raise CommandError(f"--older-than must be 0 or more days, got {older_than}.")
        try:
            result = prune_events(
                timedelta(days=older_than), delete_keys=delete_keys, dry_run=dry_run
            )
        except OverflowError as exc:
            raise CommandError(f"--older-than {older_than} reaches before year 1.") from exc
        verb = "would be" if dry_run else "were"
        what = (
            "deleted: their keys can fire again"
            if delete_keys
            else "cleared (context, errors, tracebacks); their keys are kept"
        )
        self.stdout.write(
            f"{result.events} events and {result.outcomes} handler outcomes created before "
            f"{result.cutoff:%Y-%m-%d %H:%M} {verb} {what}."
        )
