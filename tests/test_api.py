"""``spark_decl.api``: code written for django-spark's ``from spark import api`` keeps working."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from functools import partial
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

import spark_decl
from spark_decl import api
from spark_decl.exceptions import InvalidContext, RegistrationError
from spark_decl.models import EventRecord
from spark_decl.registry import Registry, function_name
from spark_decl.testing import run_on_commit
from tests.conftest import logged_keys
from tests.testapp import spark
from tests.testapp.models import Challenge, Donation, HandlerLog


def test_api_reexports_the_functional_names() -> None:
    assert api.event is spark_decl.event
    assert api.Event is spark_decl.Event
    assert set(api.__all__) >= {
        "MODEL_SOURCES",
        "event",
        "only_new_events",
        "process_events",
        "register_group_handler",
        "register_model_event_source",
    }


def test_model_sources_maps_models_to_their_source_functions() -> None:
    assert list(api.MODEL_SOURCES) == [Challenge, Donation]
    assert len(api.MODEL_SOURCES) == 2
    assert [function_name(s) for s in api.MODEL_SOURCES[Challenge]] == [
        function_name(spark.events_from_challenge),
        function_name(spark.challenge_deadlines),
    ]
    assert [function_name(s) for s in api.MODEL_SOURCES[Donation]] == [
        function_name(spark.events_from_donation)
    ]
    assert Challenge in api.MODEL_SOURCES
    assert HandlerLog not in api.MODEL_SOURCES
    assert api.MODEL_SOURCES.get(HandlerLog) is None
    # Like a defaultdict(list): a model without sources has an empty list, to append to.
    assert api.MODEL_SOURCES[HandlerLog] == []
    assert HandlerLog not in api.MODEL_SOURCES
    with pytest.raises(KeyError):
        api.MODEL_SOURCES["testapp.HandlerLog"]  # type: ignore[index]  # pyright: ignore[reportArgumentType]


@pytest.mark.usefixtures("isolated_registry")
def test_model_sources_is_a_live_view_of_registrations() -> None:
    def handler_log_events(log: HandlerLog) -> Iterator[dict[str, Any]]:
        yield {"group": "log", "key": f"log_{log.pk}"}

    api.register_model_event_source(sender=HandlerLog, source=handler_log_events)
    api.register_model_event_source(sender=HandlerLog, source=handler_log_events)
    assert api.MODEL_SOURCES[HandlerLog] == [handler_log_events]
    assert list(api.MODEL_SOURCES) == [Challenge, Donation, HandlerLog]


@pytest.mark.django_db(transaction=True)
def test_functional_registration_runs_on_save(isolated_registry: Registry) -> None:
    seen: list[tuple[str, int]] = []

    def events_from_challenge(challenge: Challenge) -> Iterator[dict[str, Any]]:
        # django-spark style: plain dicts, key built by hand.
        yield {
            "group": "challenge_functional",
            "key": f"challenge_functional_{challenge.pk}",
            "context": {"challenge": challenge},
        }

    def handle(event: spark_decl.Event[Any]) -> None:
        seen.append((event["key"], event["context"]["challenge"].pk))

    api.register_model_event_source(sender=Challenge, source=events_from_challenge)
    api.register_group_handler(handler=handle, group=r"^challenge_functional")
    challenge = Challenge.objects.create(title="x")
    assert seen == [(f"challenge_functional_{challenge.pk}", challenge.pk)]
    challenge.save()
    assert len(seen) == 1


@pytest.mark.django_db(transaction=True)
def test_the_seed_readme_out_of_request_loop() -> None:
    """The loop django-spark's README gives for handling events outside requests."""
    today = timezone.localdate()
    Challenge.objects.bulk_create(
        [
            Challenge(title="new"),
            Challenge(title="ending", end_date=today + dt.timedelta(days=1)),
            Challenge(title="ended", is_active=False, end_date=today - dt.timedelta(days=1)),
        ]
    )
    challenge = Challenge.objects.get(title="new")
    Donation.objects.bulk_create([Donation(challenge=challenge), Donation(challenge=challenge)])

    for _ in range(2):  # the second run handles nothing new
        for model, sources in api.MODEL_SOURCES.items():
            # Verbatim; django-stubs' Model declares no `objects` manager.
            for instance in model.objects.all():  # type: ignore[attr-defined]
                for source in sources:
                    api.process_events(api.only_new_events(source(instance)))

    pks = {c.title: c.pk for c in Challenge.objects.all()}
    assert sorted(logged_keys()) == sorted(
        [
            f"challenge_created_{pks['new']}",
            f"challenge_created_{pks['ending']}",
            f"challenge_ends_2d_{pks['ending']}",
            f"challenge_ended_{pks['ended']}",
        ]
    )
    assert sorted(logged_keys("log_donation")) == sorted(
        f"donation_received_{pk}" for pk in Donation.objects.values_list("pk", flat=True)
    )
    assert EventRecord.objects.count() == 6


# -- django-spark's keyword, and its README as a program ------------------------------------


@pytest.mark.django_db(transaction=True)
def test_only_new_events_and_process_events_take_django_sparks_iterable_keyword() -> None:
    events = [spark_decl.event("challenge_kw", n) for n in (1, 2, 1)]
    api.process_events(iterable=api.only_new_events(iterable=events))
    api.process_events(api.only_new_events(events))
    assert logged_keys() == ["challenge_kw_1", "challenge_kw_2"]
    api.process_events(iterable=[spark_decl.event("challenge_kw", 3)])
    api.process_events([spark_decl.event("challenge_kw", 3)])  # does not dedupe
    assert logged_keys()[2:] == ["challenge_kw_3", "challenge_kw_3"]


@pytest.mark.django_db(transaction=True)
def test_a_django_spark_program_runs_with_one_changed_import(
    isolated_registry: Registry,
) -> None:
    """django-spark's README (its source in today's syntax, its registration and batch
    loop as written), through spark_decl.api and nothing else: each event is handled once."""
    isolated_registry.clear()  # only what the program registers
    handled: list[str] = []

    def events_from_challenge(challenge: Any) -> Iterator[dict[str, Any]]:
        if not challenge.is_active:
            return
        yield {
            "group": "challenge_created",
            "key": f"challenge_created_{challenge.pk}",
            "context": {"challenge": challenge},
        }
        if (date.today() - challenge.start_date).days > 2 and challenge.donations.count() < 2:
            yield {
                "group": "challenge_inactivity_2d",
                "key": f"challenge_inactivity_2d_{challenge.pk}",
                "context": {"challenge": challenge},
            }
        if (challenge.end_date - date.today()).days <= 2:
            yield {
                "group": "challenge_ends_2d",
                "key": f"challenge_ends_2d_{challenge.pk}",
                "context": {"challenge": challenge},
            }
        if challenge.end_date < date.today():
            yield {
                "group": "challenge_ended",
                "key": f"challenge_ended_{challenge.pk}",
                "context": {"challenge": challenge},
            }

    def send_challenge_mails(event: Any) -> None:
        challenge = event["context"]["challenge"]
        assert event["key"].endswith(f"_{challenge.pk}")
        handled.append(event["key"])

    api.register_group_handler(handler=send_challenge_mails, group=r"^challenge")
    api.register_model_event_source(sender=Challenge, source=events_from_challenge)

    today = date.today()
    ends_today = Challenge.objects.create(title="ends today", end_date=today)
    quiet = Challenge.objects.create(
        title="quiet", start_date=today - dt.timedelta(days=5), end_date=today + dt.timedelta(9)
    )
    on_save = [
        f"challenge_created_{ends_today.pk}",
        f"challenge_ends_2d_{ends_today.pk}",
        f"challenge_created_{quiet.pk}",
        f"challenge_inactivity_2d_{quiet.pk}",
    ]
    assert handled == on_save
    # Saved without post_save: only the batch loop sees them.
    Challenge.objects.bulk_create(
        [
            Challenge(title="ended", start_date=today - dt.timedelta(days=9), end_date=today),
            Challenge(title="inactive", is_active=False, end_date=today - dt.timedelta(1)),
        ]
    )
    ended = Challenge.objects.get(title="ended")
    Challenge.objects.filter(pk=ended.pk).update(end_date=today - dt.timedelta(days=1))
    Donation.objects.bulk_create([Donation(challenge=ended), Donation(challenge=ended)])

    for model, sources in api.MODEL_SOURCES.items():
        for instance in model.objects.all():  # type: ignore[attr-defined]
            for source in sources:
                api.process_events(iterable=api.only_new_events(iterable=source(instance)))
    for model, sources in api.MODEL_SOURCES.items():
        for instance in model.objects.all():  # type: ignore[attr-defined]
            for source in sources:
                api.process_events(api.only_new_events(source(instance)))

    assert handled == [
        *on_save,
        f"challenge_created_{ended.pk}",
        f"challenge_ends_2d_{ended.pk}",
        f"challenge_ended_{ended.pk}",
    ]
    assert EventRecord.objects.count() == len(handled)


# -- api.MODEL_SOURCES: appending registers ---------------------------------------------------

# As untyped django-spark code sees it: typed, it is a read-only Mapping.
UNTYPED_MODEL_SOURCES: Any = api.MODEL_SOURCES


def donation_thanks(donation: Donation) -> Iterator[dict[str, Any]]:
    yield {"group": "donation_thanks", "key": f"donation_thanks_{donation.pk}"}


def donation_receipt(donation: Donation) -> Iterator[dict[str, Any]]:
    yield {"group": "donation_receipt", "key": f"donation_receipt_{donation.pk}"}


def handler_log_events(log: HandlerLog) -> Iterator[dict[str, Any]]:
    yield {"group": "log", "key": f"log_{log.pk}"}


# Compared by name: a test elsewhere re-imports tests.testapp.spark, which registers new
# function objects under the same names.
CHALLENGE_SOURCES = [
    "tests.testapp.spark.events_from_challenge",
    "tests.testapp.spark.challenge_deadlines",
]


def names(sources: Iterable[Callable[..., object]]) -> list[str]:
    return [function_name(source) for source in sources]


def source_of(registry: Registry, model: type[Any], function: Any) -> Any:
    (spec,) = [spec for spec in registry.sources(model) if spec.name == function_name(function)]
    return spec


@pytest.mark.django_db(transaction=True)
def test_appending_to_model_sources_registers_a_source_for_the_batch_only(
    isolated_registry: Registry,
) -> None:
    api.MODEL_SOURCES[Donation].append(donation_thanks)
    assert names(api.MODEL_SOURCES[Donation]) == names(
        [spark.events_from_donation, donation_thanks]
    )
    # As in django-spark, where only register_model_event_source connected post_save.
    assert source_of(isolated_registry, Donation, donation_thanks).on_save is False

    donation = Donation.objects.create(challenge=Challenge.objects.create(title="x"))
    assert logged_keys("log_donation") == [f"donation_received_{donation.pk}"]
    call_command("process_spark_sources", "--model", "testapp.Donation", stdout=StringIO())
    assert logged_keys("log_donation") == [
        f"donation_received_{donation.pk}",
        f"donation_thanks_{donation.pk}",
    ]


@pytest.mark.django_db(transaction=True)
def test_appending_to_model_sources_of_a_model_without_sources_registers_it(
    isolated_registry: Registry,
) -> None:
    api.MODEL_SOURCES[HandlerLog].append(handler_log_events)
    assert HandlerLog in api.MODEL_SOURCES
    assert list(api.MODEL_SOURCES) == [Challenge, Donation, HandlerLog]
    log = HandlerLog.objects.create(handler="h", key="k")
    call_command("process_spark_sources", "--model", "testapp.HandlerLog", stdout=StringIO())
    assert list(EventRecord.objects.values_list("key", flat=True)) == [f"log_{log.pk}"]


@pytest.mark.usefixtures("isolated_registry")
def test_extending_model_sources_registers_each_source_in_order() -> None:
    api.MODEL_SOURCES[Donation].extend([donation_thanks])
    sources = api.MODEL_SOURCES[Donation]
    sources += [donation_receipt]
    assert names(sources) == names([spark.events_from_donation, donation_thanks, donation_receipt])
    assert api.MODEL_SOURCES[Donation] == sources
    UNTYPED_MODEL_SOURCES[HandlerLog] += [handler_log_events]
    assert api.MODEL_SOURCES[HandlerLog] == [handler_log_events]
    # How django-spark itself registered; an existing list is left as it is.
    UNTYPED_MODEL_SOURCES.setdefault(Challenge, []).append(spark.events_from_challenge)
    UNTYPED_MODEL_SOURCES.setdefault(Challenge, [donation_thanks])
    assert names(api.MODEL_SOURCES[Challenge]) == CHALLENGE_SOURCES


def test_appending_a_source_registered_on_save_keeps_it_on_save(
    isolated_registry: Registry,
) -> None:
    api.MODEL_SOURCES[Challenge].append(spark.events_from_challenge)
    assert names(api.MODEL_SOURCES[Challenge]) == CHALLENGE_SOURCES
    assert source_of(isolated_registry, Challenge, spark.events_from_challenge).on_save


REFUSED: dict[str, Callable[[], object]] = {
    "remove": lambda: api.MODEL_SOURCES[Donation].remove(spark.events_from_donation),
    "pop": lambda: api.MODEL_SOURCES[Donation].pop(),
    "clear": lambda: api.MODEL_SOURCES[Donation].clear(),
    "insert": lambda: api.MODEL_SOURCES[Donation].insert(0, donation_thanks),
    "sort": lambda: api.MODEL_SOURCES[Donation].sort(key=repr),
    "reverse": lambda: api.MODEL_SOURCES[Donation].reverse(),
    "item assignment": lambda: api.MODEL_SOURCES[Donation].__setitem__(0, donation_thanks),
    "item deletion": lambda: api.MODEL_SOURCES[Donation].__delitem__(0),
    "*=": lambda: api.MODEL_SOURCES[Donation].__imul__(2),
    "model assignment": lambda: UNTYPED_MODEL_SOURCES.__setitem__(Donation, [donation_thanks]),
    "model deletion": lambda: UNTYPED_MODEL_SOURCES.__delitem__(Donation),
    "model pop": lambda: UNTYPED_MODEL_SOURCES.pop(Donation),
}


@pytest.mark.parametrize("mutation", list(REFUSED.values()), ids=list(REFUSED))
@pytest.mark.usefixtures("isolated_registry")
def test_mutating_model_sources_otherwise_is_an_error_saying_what_to_write(
    mutation: Callable[[], object],
) -> None:
    with pytest.raises(RegistrationError) as excinfo:
        mutation()
    message = str(excinfo.value)
    assert "api.MODEL_SOURCES" in message
    assert "api.register_model_event_source(sender=Donation, source=...)" in message
    assert "@event_source(Donation)" in message
    assert names(api.MODEL_SOURCES[Donation]) == names([spark.events_from_donation])


@pytest.mark.parametrize("method", ["clear", "popitem", "update"])
@pytest.mark.usefixtures("isolated_registry")
def test_mutating_all_of_model_sources_is_an_error_saying_what_to_write(method: str) -> None:
    args: list[object] = [{}] if method == "update" else []
    with pytest.raises(RegistrationError, match=re.escape(f"api.MODEL_SOURCES.{method}()")):
        getattr(api.MODEL_SOURCES, method)(*args)
    assert list(api.MODEL_SOURCES) == [Challenge, Donation]


# -- identity by dotted name (docs/migrating.rst) ---------------------------------------------


def make_handler(log: list[str], label: str) -> Callable[[spark_decl.Event[Any]], None]:
    def handler(event: spark_decl.Event[Any]) -> None:
        log.append(label)

    return handler


def labelled(log: list[str], event: spark_decl.Event[Any], *, label: str) -> None:
    log.append(label)


def handler_names(registry: Registry, group: str) -> list[str]:
    return [spec.name for spec in registry.handlers_for(group)]


@pytest.mark.django_db(transaction=True)
def test_lambdas_partials_and_closures_of_one_factory_replace_each_other(
    isolated_registry: Registry,
) -> None:
    """django-spark kept every function it was given; spark_decl keeps one per dotted
    name, and these share theirs."""
    log: list[str] = []
    api.register_group_handler(group=r"^compat_a$", handler=lambda event: log.append("a"))
    api.register_group_handler(group=r"^compat_b$", handler=lambda event: log.append("b"))
    api.register_group_handler(group=r"^compat_c$", handler=partial(labelled, log, label="c"))
    api.register_group_handler(group=r"^compat_d$", handler=partial(labelled, log, label="d"))
    api.register_group_handler(group=r"^compat_e$", handler=make_handler(log, "e"))
    api.register_group_handler(group=r"^compat_f$", handler=make_handler(log, "f"))

    assert handler_names(isolated_registry, "compat_a") == []
    assert handler_names(isolated_registry, "compat_c") == []
    assert handler_names(isolated_registry, "compat_e") == []
    assert handler_names(isolated_registry, "compat_d") == ["functools.partial"]
    assert handler_names(isolated_registry, "compat_f") == [
        f"{__name__}.make_handler.<locals>.handler"
    ]
    api.process_events([spark_decl.event(f"compat_{x}", 1) for x in "abcdef"])
    assert log == ["b", "d", "f"]


@pytest.mark.django_db(transaction=True)
def test_functions_defined_with_distinct_names_are_all_kept(
    isolated_registry: Registry,
) -> None:
    log: list[str] = []

    def handle_a(event: spark_decl.Event[Any]) -> None:
        log.append("a")

    def handle_b(event: spark_decl.Event[Any]) -> None:
        log.append("b")

    api.register_group_handler(group=r"^compat_a$", handler=handle_a)
    api.register_group_handler(group=r"^compat_b$", handler=handle_b)
    api.process_events([spark_decl.event("compat_a", 1), spark_decl.event("compat_b", 1)])
    assert log == ["a", "b"]


@pytest.mark.usefixtures("isolated_registry")
def test_two_lambdas_registered_as_sources_of_a_model_replace_each_other() -> None:
    api.register_model_event_source(sender=HandlerLog, source=lambda log: [])
    api.register_model_event_source(sender=HandlerLog, source=lambda log: None)
    (source,) = api.MODEL_SOURCES[HandlerLog]
    assert source(HandlerLog()) is None


# -- what else a django-spark user meets (docs/migrating.rst) ---------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_unstorable_context_is_refused_naming_the_event_and_the_place(tmp_path: Path) -> None:
    with (tmp_path / "log.txt").open("w") as log:
        events = [
            {"group": "challenge_ok", "key": "challenge_ok_1", "context": {"n": 1}},
            {"group": "challenge_log", "key": "challenge_log_1", "context": {"log": log}},
        ]
        with pytest.raises(InvalidContext, match=r"'challenge_log_1': context\['log'\]"):
            api.process_events(api.only_new_events(events))
    with pytest.raises(InvalidContext, match=r"context\['tags'\] is a builtins.set"):
        list(api.only_new_events([spark_decl.event("challenge_tags", 1, {"tags": {"a"}})]))
    assert not EventRecord.objects.exists()
    assert logged_keys() == []


@pytest.mark.django_db
def test_in_a_test_case_saves_run_no_handler_until_run_on_commit(
    isolated_registry: Registry,
) -> None:
    handled: list[str] = []

    def events_from_donation(donation: Donation) -> Iterator[dict[str, Any]]:
        yield {"group": "donation_made", "key": f"donation_made_{donation.pk}"}

    def record(event: Any) -> None:
        handled.append(event["key"])

    api.register_model_event_source(sender=Donation, source=events_from_donation)
    api.register_group_handler(group=r"^donation_made$", handler=record)
    challenge = Challenge.objects.create(title="x")
    Donation.objects.create(challenge=challenge)
    assert handled == []  # the test's transaction never commits
    with run_on_commit():
        donation = Donation.objects.create(challenge=challenge)
    assert handled == [f"donation_made_{donation.pk}"]
