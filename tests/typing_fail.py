"""Type tests that must fail: every marked line hides an expected error, for both checkers.

Each such line carries ``# type: ignore[code]`` for mypy and ``# pyright: ignore[rule]`` for
pyright (what VS Code's Pylance runs). mypy runs with ``warn_unused_ignores`` and pyright with
``reportUnnecessaryTypeIgnoreComment`` and ``enableTypeIgnoreComments = false``, so each
checker sees only its own comments, and a line that stops being the expected error (a
decorator or an ``event()`` overload typed too loosely) fails ``make lint``. Never imported at
run time, and nothing here is called, so nothing is registered.
"""
# pyright: strict

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypedDict

from spark_decl import Event, api, event, event_source, handles, only_new_events
from tests.testapp.models import Challenge, Donation


class ChallengeContext(TypedDict):
    challenge: Challenge


def event_source_rejects_a_function_for_another_model() -> None:
    @event_source(Challenge)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    def from_donation(donation: Donation) -> Iterator[Event[dict[str, Any]]]:
        yield event("donation_received", donation.pk)

    @event_source(Challenge)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    def takes_nothing() -> Iterator[Event[dict[str, Any]]]:
        yield event("nothing", 1)


def event_source_rejects_a_function_that_yields_no_events() -> None:
    @event_source(Challenge)  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]
    def returns_a_number(challenge: Challenge) -> int:
        return challenge.pk

    event_source(int)  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]


# pyright also reports the rejected decorator as untyped (reportUntypedFunctionDecorator).
def handles_rejects_what_cannot_take_an_event() -> None:
    @handles(r"^challenge")  # type: ignore[type-var]  # pyright: ignore[reportArgumentType, reportUntypedFunctionDecorator]
    def takes_an_int(number: int) -> None:
        pass

    @handles(r"^challenge")  # type: ignore[type-var]  # pyright: ignore[reportArgumentType, reportUntypedFunctionDecorator]
    def takes_a_str(event: str) -> None:
        pass

    @handles(r"^challenge")  # type: ignore[type-var]  # pyright: ignore[reportArgumentType, reportUntypedFunctionDecorator]
    def takes_two(event: Event[ChallengeContext], extra: int) -> None:
        pass

    @handles(r"^challenge")  # type: ignore[type-var]  # pyright: ignore[reportArgumentType, reportUntypedFunctionDecorator]
    def takes_nothing() -> None:
        pass

    handles(r"^challenge")(42)  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]
    handles(42)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def decorated_functions_keep_their_signature(
    incoming: Event[ChallengeContext], challenge: Challenge, donation: Donation
) -> None:
    @handles(r"^challenge")
    def send(event: Event[ChallengeContext], *, dry_run: bool = False) -> bool:
        return dry_run

    @event_source(Challenge)
    def from_challenge(challenge: Challenge) -> list[Event[ChallengeContext]]:
        return [event("challenge_created", challenge.pk, {"challenge": challenge})]

    send(42)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    send(evt=incoming)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    send(incoming, dry_run="yes")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    _label: str = send(incoming)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    from_challenge(donation)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    _count: int = from_challenge(challenge)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]


def context_keys_are_checked(event: Event[ChallengeContext]) -> list[object]:
    return [
        event["context"]["nope"],  # type: ignore[typeddict-item]  # pyright: ignore[reportGeneralTypeIssues]
        event["nope"],  # type: ignore[typeddict-item]  # pyright: ignore[reportGeneralTypeIssues]
        event["context"]["challenge"].nope,  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
    ]


def event_arguments_are_checked(donation: Donation) -> None:
    event(1, 2)  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
    event(None, 2, {})  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType, reportCallIssue]
    only_new_events([1, 2])  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]
    # Without a context, event() builds an Event[dict[str, Any]], not a typed one.
    _untyped: Event[ChallengeContext] = event("g", 1)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]


def a_typed_source_checks_its_context(donation: Donation) -> Iterator[Event[ChallengeContext]]:
    yield event("g", donation.pk, {"challenge": donation})  # type: ignore[typeddict-item]  # pyright: ignore[reportReturnType]


def api_is_checked() -> None:
    def from_donation(donation: Donation) -> list[Event[dict[str, Any]]]:
        return [event("donation_received", donation.pk)]

    def takes_an_int(number: int) -> None:
        pass

    def send(event: Event[Any]) -> None:
        pass

    def from_anything(instance: object) -> list[Event[dict[str, Any]]]:
        return []

    api.register_model_event_source(sender=Challenge, source=from_donation)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    api.register_model_event_source(sender=int, source=from_anything)  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]
    api.register_group_handler(group=r"^challenge", handler=takes_an_int)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    api.register_group_handler(group=42, handler=send)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    # Keyword-only, as DESIGN.md names it: `register_group_handler(*, group, handler)`.
    api.register_group_handler(r"^challenge", send)  # type: ignore[misc]  # pyright: ignore[reportCallIssue]
    # A read-only view of the registry.
    api.MODEL_SOURCES[Challenge] = []  # type: ignore[index]  # pyright: ignore[reportIndexIssue]
    # django-spark's keyword is `iterable`, and events are mappings.
    api.process_events(events=[event("g", 1)])  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    api.only_new_events(iterable=[1, 2])  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]
    api.process_events(iterable=[1, 2])  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
