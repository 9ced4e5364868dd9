"""The decorators, the registry and autodiscovery."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from django.apps import apps
from django.conf import settings
from django.db import models
from django.test import override_settings

import spark_decl
import tests.testapp
import tests.testapp.spark
from spark_decl import Event, api, event, event_source, handles, process_events
from spark_decl.apps import SimpleSparkDeclConfig, SparkDeclConfig, autodiscover
from spark_decl.exceptions import InvalidPattern, RegistrationError
from spark_decl.registry import HandlerSpec, Registry, function_name, registry
from tests.conftest import CHALLENGE_HANDLER, logged_keys
from tests.testapp.models import Challenge, Donation

SPARK_MODULE = "tests.testapp.spark"


class AbstractThing(models.Model):
    class Meta:
        abstract = True
        app_label = "testapp"


def test_public_names() -> None:
    assert set(spark_decl.__all__) >= {
        "Event",
        "event",
        "event_source",
        "handles",
        "only_new_events",
        "process_events",
    }
    for name in spark_decl.__all__:
        assert getattr(spark_decl, name) is not None


def test_function_name_is_module_and_qualname() -> None:
    def handler(event: Event[Any]) -> None: ...

    assert function_name(handler) == f"{__name__}.{handler.__qualname__}"
    assert function_name(handler).endswith(
        "test_function_name_is_module_and_qualname.<locals>.handler"
    )


# -- autodiscovery ----------------------------------------------------------------------


def test_testapp_spark_was_autodiscovered_at_startup() -> None:
    assert SPARK_MODULE in sys.modules
    assert isinstance(apps.get_app_config("spark_decl"), SparkDeclConfig)
    handler = registry.get_handler(CHALLENGE_HANDLER)
    assert handler is not None
    assert [p.pattern for p in handler.patterns] == ["^challenge"]
    assert not handler.background
    assert {spec.name: spec.on_save for spec in registry.sources(Challenge)} == {
        f"{SPARK_MODULE}.events_from_challenge": True,
        f"{SPARK_MODULE}.challenge_deadlines": False,
    }
    assert [spec.name for spec in registry.sources(Donation)] == [
        f"{SPARK_MODULE}.events_from_donation"
    ]


@pytest.fixture
def spark_module_forgotten(monkeypatch: pytest.MonkeyPatch, isolated_registry: Registry) -> None:
    """As if ``tests.testapp.spark`` had never been imported or registered anything."""
    monkeypatch.delitem(sys.modules, SPARK_MODULE)
    monkeypatch.delattr(tests.testapp, "spark")
    isolated_registry.clear()


@pytest.mark.usefixtures("spark_module_forgotten")
def test_autodiscover_imports_the_spark_module_of_every_app() -> None:
    autodiscover()
    assert SPARK_MODULE in sys.modules
    assert registry.get_handler(CHALLENGE_HANDLER) is not None
    assert len(registry.sources(Challenge)) == 2


@pytest.mark.usefixtures("isolated_registry")
def test_a_spark_module_that_fails_to_import_leaves_nothing_registered() -> None:
    before = {spec.name for spec in registry.handlers()}
    with (
        pytest.raises(ImportError, match=r"tests\.brokenapp\.spark cannot be imported"),
        override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, "tests.brokenapp"]),
    ):
        pass  # the app registry imports the module when the settings change
    assert {spec.name for spec in registry.handlers()} == before
    assert registry.get_handler("tests.brokenapp.spark.half_registered") is None


@pytest.mark.parametrize(
    ("entry", "discovers"),
    [("spark_decl", True), ("spark_decl.apps.SimpleSparkDeclConfig", False)],
)
@pytest.mark.usefixtures("spark_module_forgotten")
def test_only_the_default_config_autodiscovers(entry: str, discovers: bool) -> None:
    installed = [entry if app == "spark_decl" else app for app in settings.INSTALLED_APPS]
    with override_settings(INSTALLED_APPS=installed):
        config = apps.get_app_config("spark_decl")
        assert isinstance(config, SparkDeclConfig) is discovers
        assert isinstance(config, SimpleSparkDeclConfig)
        assert (SPARK_MODULE in sys.modules) is discovers
        assert (registry.get_handler(CHALLENGE_HANDLER) is not None) is discovers


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_reimporting_a_spark_module_does_not_duplicate_registrations() -> None:
    before = {spec.name for spec in registry.handlers()}
    importlib.reload(tests.testapp.spark)
    importlib.reload(tests.testapp.spark)
    assert {spec.name for spec in registry.handlers()} == before
    handler = registry.get_handler(CHALLENGE_HANDLER)
    assert handler is not None
    # The re-imported function replaced the old one.
    assert handler.function is tests.testapp.spark.log_challenge_event
    assert len(registry.sources(Challenge)) == 2
    assert len(registry.sources(Donation)) == 1

    challenge = Challenge.objects.create(title="once")
    assert logged_keys() == [f"challenge_created_{challenge.pk}"]
    donation = Donation.objects.create(challenge=challenge)
    assert logged_keys("log_donation") == [f"donation_received_{donation.pk}"]


# -- @handles ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_handles_returns_the_function_unchanged_and_registers_it() -> None:
    calls: list[str] = []

    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    assert handles(r"^x")(record) is record
    process_events([event("x1", 1), event("y", 2), event("ax", 3)])
    assert calls == ["x1_1"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_patterns_use_re_search_not_match() -> None:
    calls: list[str] = []

    @handles("ends")
    def record(event: Event[Any]) -> None:
        calls.append(event["group"])

    process_events([event("challenge_ends_2d", 1), event("ends", 2), event("end", 3)])
    assert calls == ["challenge_ends_2d", "ends"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_compiled_patterns_are_accepted() -> None:
    calls: list[str] = []

    @handles(re.compile("^X", re.IGNORECASE))
    def record(event: Event[Any]) -> None:
        calls.append(event["group"])

    process_events([event("x", 1), event("X", 2), event("y", 3)])
    assert calls == ["x", "X"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_stacked_handles_run_the_function_once_per_event() -> None:
    calls: list[str] = []

    @handles(r"^a")
    @handles(r"a$")
    @handles(r"^a")  # the same pattern twice is harmless
    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    spec = registry.get_handler(function_name(record))
    assert spec is not None
    assert sorted(p.pattern for p in spec.patterns) == ["^a", "a$"]
    process_events([event("a", 1), event("ab", 2), event("ba", 3), event("b", 4)])
    assert calls == ["a_1", "ab_2", "ba_3"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_stacked_handles_make_one_outcome_per_claimed_event() -> None:
    from spark_decl import only_new_events
    from spark_decl.models import HandlerOutcome

    calls: list[str] = []

    @handles(r"^challenge_created")
    @handles(r"^challenge")
    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    process_events(only_new_events([event("challenge_created", 1)]))
    assert calls == ["challenge_created_1"]
    assert HandlerOutcome.objects.filter(handler=function_name(record)).count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_registering_the_same_function_twice_runs_it_once() -> None:
    calls: list[str] = []

    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    handles(r"^x")(record)
    handles(r"^x")(record)
    api.register_group_handler(group=r"^x", handler=record)
    process_events([event("x", 1)])
    assert calls == ["x_1"]
    assert [spec.name for spec in registry.handlers()].count(function_name(record)) == 1


@pytest.mark.usefixtures("isolated_registry")
def test_stacked_handles_with_different_background_is_an_error() -> None:
    def record(event: Event[Any]) -> None: ...

    handles(r"^a")(record)
    with pytest.raises(RegistrationError, match="background"):
        handles(r"^b", background=True)(record)
    spec = registry.get_handler(function_name(record))
    assert spec is not None
    assert [p.pattern for p in spec.patterns] == ["^a"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_background_handlers_run_after_commit_on_the_default_immediate_backend() -> None:
    calls: list[str] = []

    @handles(r"^challenge_created$", background=True)
    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    spec = registry.get_handler(function_name(record))
    assert spec is not None
    assert spec.background
    challenge = Challenge.objects.create(title="bg")
    assert calls == [f"challenge_created_{challenge.pk}"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_async_handlers_are_awaited() -> None:
    calls: list[str] = []

    @handles(r"^x$")
    async def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    process_events([event("x", 1)])
    assert calls == ["x_1"]


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "(?P<1>x)"])
@pytest.mark.usefixtures("isolated_registry")
def test_invalid_patterns_fail_at_decoration_time(pattern: str) -> None:
    before = registry.handlers()
    with pytest.raises(InvalidPattern) as excinfo:
        handles(pattern)
    assert repr(pattern) in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)

    def record(event: Event[Any]) -> None: ...

    with pytest.raises(InvalidPattern, match=re.escape(repr(pattern))):
        api.register_group_handler(group=pattern, handler=record)
    assert registry.handlers() == before


@pytest.mark.usefixtures("isolated_registry")
def test_a_pattern_that_is_not_a_string_is_an_error() -> None:
    with pytest.raises(InvalidPattern, match="must be a str"):
        handles(42)  # type: ignore[arg-type]


@pytest.mark.usefixtures("isolated_registry")
def test_a_compiled_bytes_pattern_is_an_error_at_decoration_time() -> None:
    # Accepted, it would raise TypeError in every save that routes an event.
    with pytest.raises(InvalidPattern, match=r"must match str groups.*b'\^x'"):
        handles(re.compile(b"^x"))  # type: ignore[arg-type]
    assert registry.handlers_for("x") == ()


# -- @event_source ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_event_source_returns_the_function_unchanged_and_runs_on_save() -> None:
    def events(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("challenge_extra", challenge.pk)

    assert event_source(Challenge)(events) is events
    challenge = Challenge.objects.create(title="x")
    assert sorted(logged_keys()) == [
        f"challenge_created_{challenge.pk}",
        f"challenge_extra_{challenge.pk}",
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_a_source_may_return_none_or_a_list() -> None:
    @event_source(Challenge)
    def nothing(challenge: Challenge) -> None:
        return None

    @event_source(Challenge)
    def listed(challenge: Challenge) -> list[Event[dict[str, Any]]]:
        return [event("challenge_listed", challenge.pk)]

    challenge = Challenge.objects.create(title="x")
    assert sorted(logged_keys()) == [
        f"challenge_created_{challenge.pk}",
        f"challenge_listed_{challenge.pk}",
    ]


@pytest.mark.parametrize("model", [object, Challenge(), "testapp.Challenge", AbstractThing])
@pytest.mark.usefixtures("isolated_registry")
def test_event_source_needs_a_concrete_model_class(model: Any) -> None:
    before = registry.sources()
    with pytest.raises(RegistrationError) as excinfo:
        event_source(model)
    assert isinstance(excinfo.value, ValueError)
    if model is AbstractThing:
        assert "AbstractThing is abstract" in str(excinfo.value)
    else:
        assert "expects a model class" in str(excinfo.value)
    with pytest.raises(RegistrationError):
        api.register_model_event_source(sender=model, source=lambda instance: None)
    assert registry.sources() == before


# -- routing cache ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("isolated_registry")
def test_routing_is_computed_once_per_group_and_reset_by_registration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    searched: list[tuple[str, str]] = []
    matches = HandlerSpec.matches

    def counting_matches(spec: HandlerSpec, group: str) -> bool:
        searched.append((spec.name, group))
        return matches(spec, group)

    monkeypatch.setattr(HandlerSpec, "matches", counting_matches)
    handler_count = len(registry.handlers())
    groups = ["challenge_created", "challenge_ended", "other"]

    process_events([event(group, i) for i in range(20) for group in groups])
    assert len(searched) == handler_count * len(groups)
    assert {group for _, group in searched} == set(groups)
    assert len(logged_keys()) == 40

    # A new registration invalidates the cache: the new handler is routed to at once.
    calls: list[str] = []

    @handles(r"^other$")
    def record(event: Event[Any]) -> None:
        calls.append(event["key"])

    searched.clear()
    process_events([event("other", 1), event("other", 2)])
    assert calls == ["other_1", "other_2"]
    assert len(searched) == handler_count + 1
    assert [spec.name for spec in registry.handlers_for("other")] == [function_name(record)]


@pytest.mark.usefixtures("isolated_registry")
def test_handlers_for_lists_matches_in_registration_order() -> None:
    def first(event: Event[Any]) -> None: ...
    def second(event: Event[Any]) -> None: ...

    handles(r"^challenge_ended$")(first)
    handles(r"ended")(second)
    assert [spec.name for spec in registry.handlers_for("challenge_ended")] == [
        CHALLENGE_HANDLER,
        function_name(first),
        function_name(second),
    ]
    assert registry.handlers_for("challenge_ended") is registry.handlers_for("challenge_ended")
    assert registry.handlers_for("nothing") == ()


def test_isolated_registry_restores_the_registrations() -> None:
    before = (registry.handlers(), registry.sources())
    with registry.isolated() as isolated:
        isolated.clear()

        @handles(r"^challenge")
        def record(event: Event[Any]) -> None: ...

        assert [spec.name for spec in registry.handlers_for("challenge_x")] == [
            function_name(record)
        ]
    assert (registry.handlers(), registry.sources()) == before
    assert [spec.name for spec in registry.handlers_for("challenge_x")] == [CHALLENGE_HANDLER]
