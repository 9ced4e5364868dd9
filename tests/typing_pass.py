"""Type tests that must pass: mypy and pyright (``make lint``) check every ``assert_type`` here.

Never imported at run time (pytest collects ``test_*.py`` only). The decorated functions
live inside functions that nothing calls, so even an import would register nothing in the
real registry. The few ``# pyright: ignore`` comments mark what only mypy can check; pyright
fails if one stops being needed.
"""
# pyright: strict

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypedDict, assert_type

from django.db.models import Model
from mypy_extensions import Arg

from spark_decl import Event, api, event, event_source, handles, only_new_events
from tests.testapp.models import Challenge


class ChallengeContext(TypedDict):
    challenge: Challenge


def context_is_typed(event: Event[ChallengeContext]) -> None:
    assert_type(event["group"], str)
    assert_type(event["key"], str)
    assert_type(event["context"], ChallengeContext)
    assert_type(event["context"]["challenge"], Challenge)
    # Model field types come from django-stubs' mypy plugin; pyright sees them as Unknown.
    assert_type(event["context"]["challenge"].title, str)  # pyright: ignore[reportAssertTypeFailure, reportUnknownMemberType]


def event_builds_typed_events(challenge: Challenge) -> None:
    assert_type(event("g", 1, {"challenge": challenge}), Event[dict[str, Challenge]])
    assert_type(event("g", challenge.pk), Event[dict[str, Any]])
    assert_type(event("g", "x", None), Event[dict[str, Any]])
    context: ChallengeContext = {"challenge": challenge}
    assert_type(event("g", 1, context), Event[ChallengeContext])
    # A TypedDict literal needs the declared type to flow in, as in a typed source.
    typed: Event[ChallengeContext] = event("g", 1, {"challenge": challenge})
    assert_type(typed["context"]["challenge"], Challenge)


def event_source_keeps_the_signature(challenge: Challenge) -> None:
    @event_source(Challenge)
    def events_from_challenge(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
        yield event("challenge_created", challenge.pk, {"challenge": challenge})

    @event_source(Challenge, on_save=False, queryset=lambda: Challenge.objects.all())
    def batch_only(challenge: Challenge) -> list[Event[dict[str, Any]]]:
        return [event("challenge_batch", challenge.pk)]

    # None means "no events", as in django-spark.
    @event_source(Challenge)
    def maybe(challenge: Challenge) -> list[Event[dict[str, Any]]] | None:
        return None

    # A source may accept any supertype of the model.
    @event_source(Challenge)
    def any_model(instance: Model) -> Iterator[Event[dict[str, Any]]]:
        yield event("model_saved", instance.pk)

    assert_type(events_from_challenge, Callable[[Challenge], Iterator[Event[ChallengeContext]]])
    assert_type(events_from_challenge(challenge), Iterator[Event[ChallengeContext]])
    assert_type(batch_only(challenge), list[Event[dict[str, Any]]])
    assert_type(maybe(challenge), list[Event[dict[str, Any]]] | None)
    assert_type(any_model, Callable[[Challenge], Iterator[Event[dict[str, Any]]]])
    for produced in events_from_challenge(challenge):
        assert_type(produced["context"]["challenge"], Challenge)


def handles_returns_the_function_itself(event: Event[ChallengeContext]) -> None:
    @handles(r"^challenge")
    def send_challenge_mails(event: Event[ChallengeContext]) -> None:
        pass

    @handles(r"^challenge_ended$")
    @handles(r"^challenge_created$", background=True)
    def stacked(event: Event[ChallengeContext]) -> bool:
        return True

    @handles(r"^challenge")
    async def notify(event: Event[ChallengeContext]) -> None:
        pass

    @handles(r".")
    def with_optional_extras(event: Event[Any], *, dry_run: bool = False) -> None:
        pass

    # ``Arg`` spells the parameter name, so these are the exact ``def`` types: the
    # decorator hands back the function with name, kind and type of every parameter.
    # ``Arg`` is mypy's own syntax. For pyright, the keyword calls below check the names, and
    # the calls that must fail in typing_fail.py the parameter and return types.
    assert_type(send_challenge_mails, Callable[[Arg(Event[ChallengeContext], "event")], None])  # pyright: ignore[reportAssertTypeFailure, reportInvalidTypeForm]
    assert_type(stacked, Callable[[Arg(Event[ChallengeContext], "event")], bool])  # pyright: ignore[reportAssertTypeFailure, reportInvalidTypeForm]
    assert_type(
        notify,  # pyright: ignore[reportAssertTypeFailure]
        Callable[[Arg(Event[ChallengeContext], "event")], Coroutine[Any, Any, None]],  # pyright: ignore[reportInvalidTypeForm]
    )
    assert_type(send_challenge_mails(event=event), None)
    assert_type(stacked(event), bool)
    assert_type(stacked(event=event), bool)
    assert_type(with_optional_extras(event, dry_run=True), None)


def only_new_events_keeps_the_context_type(
    events: Iterator[Event[ChallengeContext]], raw: list[dict[str, str]]
) -> None:
    for new in only_new_events(events):
        assert_type(new, Event[ChallengeContext])
        assert_type(new["context"]["challenge"], Challenge)
    assert_type(only_new_events(events, using="default"), Iterator[Event[ChallengeContext]])
    assert_type(only_new_events([event("g", 1)]), Iterator[Event[dict[str, Any]]])
    assert_type(only_new_events(raw), Iterator[dict[str, str]])


def api_is_typed(challenge: Challenge) -> None:
    def send_mails(event: Event[ChallengeContext]) -> None:
        pass

    def events_from_challenge(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
        yield api.event("challenge_created", challenge.pk, {"challenge": challenge})

    # django-spark's sources returned lists of plain dicts; that still type-checks.
    def legacy_source(challenge: Challenge) -> list[dict[str, Any]]:
        return [{"group": "challenge_created", "key": f"challenge_created_{challenge.pk}"}]

    api.register_group_handler(group=r"^challenge", handler=send_mails)
    api.register_model_event_source(sender=Challenge, source=events_from_challenge)
    api.register_model_event_source(sender=Challenge, source=legacy_source)

    assert_type(api.MODEL_SOURCES, Mapping[type[Model], list[Callable[[Any], Any]]])
    for model, sources in api.MODEL_SOURCES.items():
        assert_type(model, type[Model])
        for instance in model._default_manager.all():
            for source in sources:
                assert_type(api.process_events(api.only_new_events(source(instance))), None)
    assert_type(api.event("g", 1), Event[dict[str, Any]])


def api_takes_django_sparks_keyword(events: Iterator[Event[ChallengeContext]]) -> None:
    assert_type(api.only_new_events(iterable=events), Iterator[Event[ChallengeContext]])
    assert_type(api.only_new_events(events, using="default"), Iterator[Event[ChallengeContext]])
    assert_type(api.process_events(iterable=api.only_new_events(iterable=events)), None)
    assert_type(api.process_events(iterable=[{"group": "g", "key": "k"}]), None)
