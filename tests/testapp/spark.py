"""The test app's event sources and handlers, found by spark_decl's autodiscovery.

Written the way users write one: the declarative API for challenges, and django-spark's
functional API (``spark_decl.api``, plain dicts) for donations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypedDict

from django.utils import timezone

from spark_decl import Event, api, event, event_source, handles

from .models import Challenge, Donation, HandlerLog


class ChallengeContext(TypedDict):
    challenge: Challenge


@event_source(Challenge)
def events_from_challenge(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    if challenge.is_active:
        yield event("challenge_created", challenge.pk, {"challenge": challenge})


@event_source(Challenge, on_save=False)
def challenge_deadlines(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    """Time-based events: nobody saves a challenge when it ends, the batch command notices."""
    days_left = (challenge.end_date - timezone.localdate()).days
    if days_left < 0:
        yield event("challenge_ended", challenge.pk, {"challenge": challenge})
    elif 0 < days_left <= 2:
        yield event("challenge_ends_2d", challenge.pk, {"challenge": challenge})


@handles(r"^challenge")
def log_challenge_event(event: Event[ChallengeContext]) -> None:
    HandlerLog.objects.create(handler="log_challenge_event", key=event["key"])


def events_from_donation(donation: Donation) -> Iterator[dict[str, Any]]:
    yield {
        "group": "donation_received",
        "key": f"donation_received_{donation.pk}",
        "context": {"donation": donation},
    }


def log_donation(event: Event[Any]) -> None:
    HandlerLog.objects.create(handler="log_donation", key=event["key"])


api.register_model_event_source(sender=Donation, source=events_from_donation)
api.register_group_handler(group=r"^donation_", handler=log_donation)
