"""The test app's event sources and handlers, found by spark_decl's autodiscovery."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

from spark_decl import Event, event, event_source, handles

from .models import Challenge, HandlerLog


class ChallengeContext(TypedDict):
    challenge: Challenge


@event_source(Challenge)
def events_from_challenge(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    if challenge.is_active:
        yield event("challenge_created", challenge.pk, {"challenge": challenge})


@handles(r"^challenge")
def log_challenge_event(event: Event[ChallengeContext]) -> None:
    HandlerLog.objects.create(handler="log_challenge_event", key=event["key"])
