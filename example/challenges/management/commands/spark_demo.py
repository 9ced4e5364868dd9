"""``manage.py spark_demo`` (``make demo``): the django-spark challenge example, narrated.

Starts from an empty database every run, then walks through what spark_decl does: saves
produce events that are handled once, repeated events are dropped, a rolled-back save
leaves nothing behind, and the batch command picks up events that only time produced.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Sequence
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from challenges.models import Challenge, Donation
from spark_decl import Event
from spark_decl.models import EventRecord
from spark_decl.signals import event_dispatched

DAYS = dt.timedelta(days=1)


class Rollback(Exception):
    """Raised inside the demo's transaction to roll it back."""


class Command(BaseCommand):
    help = (
        "Run the challenge example on a fresh database: events from saves, dedupe, "
        "rollback, and time-based events picked up by process_spark_sources."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        self.handled: list[str] = []
        self.today = timezone.localdate()
        event_dispatched.connect(self.on_event_dispatched, dispatch_uid="spark_demo")
        try:
            self.run()
        finally:
            event_dispatched.disconnect(dispatch_uid="spark_demo")

    def on_event_dispatched(
        self, sender: object, event: Event[Any], handlers: list[str], **kwargs: object
    ) -> None:
        """Narrate every event spark_decl dispatches (any app can connect to this signal)."""
        self.handled.append(event["key"])
        record = EventRecord.objects.get(key=event["key"])
        statuses = (
            ", ".join(f"{name}: {status}" for name, status in record.handler_statuses().items())
            or "no handlers"
        )
        self.stdout.write(
            self.style.SUCCESS(f"  -> handled {event['key']!r} once ({statuses})"), ending="\n\n"
        )

    # -- the story ------------------------------------------------------------------------

    def run(self) -> None:
        self.heading("spark_decl demo: the django-spark challenge example")
        call_command("migrate", interactive=False, verbosity=0)
        call_command("flush", interactive=False, verbosity=0)
        self.say(
            "Fresh database (example/db.sqlite3), migrated and empty. "
            f"Today is {self.today:%A, %Y-%m-%d}.",
            "challenges/spark.py declares one event source for Challenge (groups "
            "challenge_created, challenge_inactivity_2d, challenge_ends_2d, challenge_ended) "
            "and one handler for r'^challenge' that mails the challenge's owner. Mails go to "
            "the console backend, so they are printed below.",
        )

        challenges = self.create_challenges()
        bake = challenges[2]
        self.save_again(challenges[0])
        self.roll_back()
        self.time_passes(challenges)

        self.heading("5. The cron job runs: manage.py process_spark_sources")
        self.say(
            "It sends every challenge through the source again. Events whose keys were "
            "claimed before are dropped; only the new, time-based ones are handled."
        )
        before = len(self.handled)
        call_command("process_spark_sources", stdout=self.stdout)
        self.say(
            f"=> {len(self.handled) - before} new events handled. The other events the "
            f"source yielded (every challenge_created_*, and challenge_ends_2d_{bake.pk} from "
            f'the first save of "{bake.title}") were claimed before and dropped.'
        )

        self.heading("6. The cron job runs again")
        before = len(self.handled)
        call_command("process_spark_sources", stdout=self.stdout)
        self.say(
            f"=> {len(self.handled) - before} events handled: the source yielded the same "
            "events, and every one of their keys is already claimed. No mail is sent twice."
        )

        self.heading("7. What the database remembers: spark_decl.models.EventRecord")
        self.event_table()
        self.say(
            "Explore: `.venv/bin/python example/manage.py createsuperuser`, then `runserver` "
            "and open http://127.0.0.1:8000/admin/spark_decl/eventrecord/. In production, "
            "process_spark_sources and retry_spark_events run from cron."
        )

    def create_challenges(self) -> list[Challenge]:
        self.heading("1. Saving challenges produces events, handled once each")
        self.say(
            "Each save runs the source. Its new events are claimed and handled once the "
            "saving transaction commits (in autocommit mode, at once)."
        )
        User = get_user_model()
        users = {
            name: User.objects.create_user(username=name, email=f"{name}@example.com")
            for name in ("alice", "bob", "carol")
        }
        specs = [
            ("Run 100 km", "alice", 30, True),
            ("Read 12 books", "bob", 7, True),
            # Ends in 2 days already: its first save yields two events.
            ("Bake 50 loaves", "carol", 2, True),
            # Inactive: the source yields nothing for it.
            ("Swim 10 km (draft)", "alice", 30, False),
        ]
        challenges = []
        for title, user, days, is_active in specs:
            self.say(
                f'Saving "{title}" (owner {user}, ends in {days} days'
                f"{'' if is_active else ', inactive'}) ..."
            )
            challenges.append(
                Challenge.objects.create(
                    title=title,
                    user=users[user],
                    is_active=is_active,
                    start_date=self.today,
                    end_date=self.today + days * DAYS,
                )
            )
        for challenge, amounts in zip(challenges[1:3], ([20, 50], [10, 10, 25]), strict=True):
            for amount in amounts:
                Donation.objects.create(challenge=challenge, amount=amount)
        self.say(
            f"=> {len(challenges)} challenges saved, {len(self.handled)} events handled "
            "(the draft has none). "
            "Donations have no event source: saving them produced no events."
        )
        return challenges

    def save_again(self, challenge: Challenge) -> None:
        self.heading("2. Saving again produces nothing new")
        records, before = EventRecord.objects.count(), len(self.handled)
        challenge.title = "Run 100 km (now with a route map)"
        challenge.save()
        self.say(
            f'Saved "{challenge.title}" again. The source yielded '
            f"'challenge_created_{challenge.pk}' once more, but that key is already claimed.",
            f"=> events handled: {len(self.handled) - before}, "
            f"EventRecords: {records} before, {EventRecord.objects.count()} after.",
        )

    def roll_back(self) -> None:
        self.heading("3. A save that rolls back leaves nothing behind")
        before = len(self.handled)
        try:
            with transaction.atomic():
                challenge = Challenge.objects.create(
                    title="Climb 3 peaks",
                    user=get_user_model().objects.get(username="bob"),
                    start_date=self.today,
                    end_date=self.today + 10 * DAYS,
                )
                key = f"challenge_created_{challenge.pk}"
                claimed = EventRecord.objects.filter(key=key).exists()
                self.say(
                    f'Saved "Climb 3 peaks" inside transaction.atomic(): {key!r} is '
                    f"{'claimed (!)' if claimed else 'not claimed yet'}, handled so far: "
                    f"{len(self.handled) - before}; both wait for the commit. Now an error "
                    "rolls the transaction back."
                )
                raise Rollback
        except Rollback:
            pass
        claimed = EventRecord.objects.filter(key=key).exists()
        self.say(
            f"=> rolled back: {key!r} is {'still claimed (!)' if claimed else 'not claimed'}, "
            f"events handled: {len(self.handled) - before}, no mail. Saving the challenge "
            "again later would produce the event normally."
        )

    def time_passes(self, challenges: list[Challenge]) -> None:
        self.heading("4. Time passes: five days later")
        self.say(
            "Every start and end date moves five days into the past, with QuerySet.update(). "
            "That bypasses save() and post_save, just like time: nothing is saved, yet new "
            "events are now due."
        )
        for challenge in challenges:
            Challenge.objects.filter(pk=challenge.pk).update(
                start_date=challenge.start_date - 5 * DAYS,
                end_date=challenge.end_date - 5 * DAYS,
            )
        rows = [("challenge", "started", "ends", "donations", "active")]
        for challenge in Challenge.objects.all():
            rows.append(
                (
                    challenge.title,
                    f"{(self.today - challenge.start_date).days} days ago",
                    self.relative(challenge.end_date),
                    str(challenge.donations.count()),
                    "yes" if challenge.is_active else "no",
                )
            )
        self.table(rows)
        self.say(f"=> events handled meanwhile: 0 (still {len(self.handled)} in all).")

    # -- output helpers -------------------------------------------------------------------

    def relative(self, day: dt.date) -> str:
        days = (day - self.today).days
        if days >= 0:
            return f"in {days} days"
        return f"ended {-days} days ago"

    def event_table(self) -> None:
        rows = [("key", "group", "handler", "status", "attempts")]
        for record in EventRecord.objects.order_by("pk").prefetch_related("outcomes"):
            calls = [(o.handler, o.status, o.attempts) for o in record.outcomes.all()]
            for handler, status, attempts in calls:
                rows.append(
                    (
                        record.key,
                        record.group,
                        # The stored name is dotted: challenges.spark.send_challenge_mails.
                        handler.rpartition(".")[2],
                        status,
                        str(attempts),
                    )
                )
        self.table(rows)

    def table(self, rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines = []
        for index, row in enumerate(rows):
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append(line.rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        self.stdout.write("\n".join(f"  {line}" for line in lines), ending="\n\n")

    def heading(self, text: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(f"\n{'=' * 79}\n{text}\n{'=' * 79}"))

    def say(self, *paragraphs: str) -> None:
        for paragraph in paragraphs:
            self.stdout.write(textwrap.fill(paragraph, width=79))
        self.stdout.write("")
