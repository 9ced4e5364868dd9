"""The challenge events of django-spark's README, declared with spark_decl.

spark_decl's app config imports this module at startup (like ``admin.py``): the decorators
below are all the registration there is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

from django.utils import timezone

from spark_decl import Event, event, event_source, handles, mail

from .models import Challenge


class ChallengeContext(TypedDict):
    challenge: Challenge


@event_source(Challenge)
def events_from_challenge(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    """Every event a challenge can be in, today.

    Runs on every save and for every challenge in ``manage.py process_spark_sources`` (cron).
    It may yield the same event again and again: each key is handled only the first time.
    """
    if not challenge.is_active:
        return
    context: ChallengeContext = {"challenge": challenge}
    today = timezone.localdate()

    yield event("challenge_created", challenge.pk, context)

    if (today - challenge.start_date).days > 2 and challenge.donations.count() < 2:
        yield event("challenge_inactivity_2d", challenge.pk, context)

    if (challenge.end_date - today).days <= 2:
        yield event("challenge_ends_2d", challenge.pk, context)

    if challenge.end_date < today:
        yield event("challenge_ended", challenge.pk, context)


# One template per group, challenges/mails/<group>.txt: the subject on its first line, the
# body after it (a <group>.html beside it would become the HTML alternative). Sending errors
# are not silenced: spark_decl records the failed call with its traceback and
# `manage.py retry_spark_events` sends the mail later.
send_challenge_mails = handles(r"^challenge")(
    mail.templated(
        "challenges/mails/{group}.txt",
        name="send_challenge_mails",
        recipients=lambda event: [event["context"]["challenge"].user.email],
    )
)
