"""``manage.py retry_spark_events``: re-run failed and abandoned handler calls, or replay
old events to a handler added later."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from spark_decl.exceptions import InvalidPattern, UnknownHandler
from spark_decl.retry import (
    DEFAULT_STALE_AFTER,
    ReplayResult,
    WaitingCalls,
    replay_events,
    retry_events,
    waiting_calls,
)


class Command(BaseCommand):
    help = (
        "Re-run the handler calls that failed and are due, and finish the calls of events "
        "that were claimed but never completed (the process died). Only the failed handlers "
        "run again, never one that succeeded for that event. Safe to run from several "
        "processes at once. With --replay-to HANDLER --group REGEX it instead sends events "
        "claimed before HANDLER was registered to it: a handler added later never receives "
        "old events unless you replay them this way."
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
        parser.add_argument(
            "--include-given-up",
            action="store_true",
            help=(
                "Also retry calls that were given up after MAX_ATTEMPTS failures. Each gets "
                "one more attempt and is given up again if it fails."
            ),
        )
        parser.add_argument(
            "--group",
            metavar="REGEX",
            help=(
                "Only events whose group matches this regular expression (re.search, as in "
                "@handles). Required with --replay-to."
            ),
        )
        parser.add_argument(
            "--handler",
            metavar="NAME",
            help=(
                "Only calls of this handler, by its dotted name "
                "(module.function, e.g. challenges.spark.send_challenge_mails)."
            ),
        )
        parser.add_argument(
            "--replay-to",
            metavar="HANDLER",
            help=(
                "Replay instead of retrying: send every stored event whose group matches "
                "--group (and the handler's own patterns) and that HANDLER has never "
                "received to HANDLER (a registered handler, by dotted name), then run "
                "those calls. Running it again sends nothing twice. The events' keys are "
                "not claimed again and no other handler runs."
            ),
        )

    def handle(
        self,
        *args: Any,
        stale_after: float,
        ignore_schedule: bool,
        include_given_up: bool,
        group: str | None,
        handler: str | None,
        replay_to: str | None,
        **options: Any,
    ) -> None:
        if stale_after < 0:
            raise CommandError("--stale-after must be 0 or more seconds.")
        if replay_to is not None:
            if group is None:
                raise CommandError(
                    "--replay-to needs --group REGEX: say which groups to replay, "
                    "e.g. --group '^challenge_'."
                )
            combined = [
                flag
                for flag, used in (
                    ("--handler", handler is not None),
                    ("--all", ignore_schedule),
                    ("--include-given-up", include_given_up),
                )
                if used
            ]
            if combined:
                raise CommandError(f"--replay-to cannot be combined with {', '.join(combined)}.")
            try:
                replayed = replay_events(replay_to, group=group)
            except UnknownHandler as exc:
                raise CommandError(f"--replay-to: {exc}") from exc
            except InvalidPattern as exc:
                raise CommandError(f"--group: {exc}") from exc
            self._report_replay(replayed, group)
            return
        try:
            result = retry_events(
                stale_after=stale_after,
                ignore_schedule=ignore_schedule,
                include_given_up=include_given_up,
                group=group,
                handler=handler,
            )
        except UnknownHandler as exc:
            raise CommandError(f"--handler: {exc}") from exc
        except InvalidPattern as exc:
            raise CommandError(f"--group: {exc}") from exc
        self.stdout.write(
            f"{result.due} due, {result.succeeded} succeeded, {result.failed} failed, "
            f"{result.skipped} skipped (done elsewhere), "
            f"{result.unknown_handler} with no registered handler"
        )
        if result.recovered:
            self.stdout.write(
                f"{result.recovered} event(s) of transactions that committed without their "
                "claim (a process died) were claimed from the outbox; their calls are "
                "counted above."
            )
        if not ignore_schedule:
            self._report_waiting(waiting_calls(group=group, handler=handler))

    def _report_waiting(self, waiting: WaitingCalls) -> None:
        # "0 due" alone reads as "nothing failed" while failed calls wait out their backoff.
        due = waiting.next_due_at
        if due is None:
            return
        # Without USE_TZ the stored times are naive, in TIME_ZONE already.
        at = timezone.localtime(due) if timezone.is_aware(due) else due
        when = f"{at.strftime('%Y-%m-%d %H:%M:%S %Z').rstrip()} (in {time_until(due)})"
        if waiting.count == 1:
            text = f"1 failed call waits out its backoff, due at {when}; --all runs it now."
        else:
            text = (
                f"{waiting.count} failed calls wait out their backoff, the next due at "
                f"{when}; --all runs them now."
            )
        self.stdout.write(text)

    def _report_replay(self, result: ReplayResult, group: str) -> None:
        run = result.run
        self.stdout.write(
            f"{result.created} events replayed to {result.handler}: "
            f"{run.succeeded} succeeded, {run.failed} failed, "
            f"{run.skipped} skipped (done elsewhere)"
        )
        if result.groups:
            self.stdout.write(f"Groups: {', '.join(result.groups)}")
        else:
            self.stdout.write(f"No stored group matches {group!r} and the handler's patterns.")
        if result.unrouted_groups:
            self.stdout.write(
                "Not replayed, the handler's patterns do not match them: "
                + ", ".join(result.unrouted_groups)
            )


def time_until(moment: datetime) -> str:
    """``"45 s"``, ``"10 min"``, ``"3 h"``: how long until ``moment``, roughly."""
    seconds = max(1, math.ceil((moment - timezone.now()).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 120 * 60:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600)} h"
