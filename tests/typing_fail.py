"""Type tests that must fail: every ``# type: ignore[code]`` here hides an expected error.

mypy runs with ``warn_unused_ignores``, so a line that stops being an error (a decorator or
an ``event()`` overload typed too loosely) makes ``mypy spark_decl tests`` fail. Never
imported at run time, and nothing here is called, so nothing is registered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypedDict

from spark_decl import Event, api, event, event_source, handles, only_new_events
from tests.testapp.models import Challenge, Donation


class ChallengeContext(TypedDict):
    challenge: Challenge


def event_source_rejects_a_function_for_another_model() -> None:
    @event_source(Challenge)  # type: ignore[arg-type]
    def from_donation(donation: Donation) -> Iterator[Event[dict[str, Any]]]:
        yield event("donation_received", donation.pk)

    @event_source(Challenge)  # type: ignore[arg-type]
    def takes_nothing() -> Iterator[Event[dict[str, Any]]]:
        yield event("nothing", 1)


def event_source_rejects_a_function_that_yields_no_events() -> None:
    @event_source(Challenge)  # type: ignore[type-var]
    def returns_a_number(challenge: Challenge) -> int:
        return challenge.pk

    event_source(int)  # type: ignore[type-var]


def handles_rejects_what_cannot_take_an_event() -> None:
    @handles(r"^challenge")  # type: ignore[type-var]
    def takes_an_int(number: int) -> None:
        pass

    @handles(r"^challenge")  # type: ignore[type-var]
    def takes_two(event: Event[ChallengeContext], extra: int) -> None:
        pass

    @handles(r"^challenge")  # type: ignore[type-var]
    def takes_nothing() -> None:
        pass

    handles(r"^challenge")(42)  # type: ignore[type-var]
    handles(42)  # type: ignore[arg-type]


def context_keys_are_checked(event: Event[ChallengeContext]) -> list[object]:
    return [
        event["context"]["nope"],  # type: ignore[typeddict-item]
        event["nope"],  # type: ignore[typeddict-item]
        event["context"]["challenge"].nope,  # type: ignore[attr-defined]
    ]


def event_arguments_are_checked(donation: Donation) -> None:
    event(1, 2)  # type: ignore[call-overload]
    event(None, 2, {})  # type: ignore[call-overload]
    only_new_events([1, 2])  # type: ignore[type-var]


def a_typed_source_checks_its_context(donation: Donation) -> Iterator[Event[ChallengeContext]]:
    yield event("g", donation.pk, {"challenge": donation})  # type: ignore[typeddict-item]


def api_is_checked() -> None:
    def from_donation(donation: Donation) -> list[Event[dict[str, Any]]]:
        return [event("donation_received", donation.pk)]

    def takes_an_int(number: int) -> None:
        pass

    def send(event: Event[Any]) -> None:
        pass

    api.register_model_event_source(sender=Challenge, source=from_donation)  # type: ignore[arg-type]
    api.register_group_handler(group=r"^challenge", handler=takes_an_int)  # type: ignore[arg-type]
    # Keyword-only, as DESIGN.md names it: `register_group_handler(*, group, handler)`.
    api.register_group_handler(r"^challenge", send)  # type: ignore[misc]
