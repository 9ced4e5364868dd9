"""System checks, by id: ``spark_decl.E001`` (database), ``E002``/``E003``/``W001``/``W002``
(what is registered, settings)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.checks import CheckMessage, Error, Warning, run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, models
from django.test.utils import isolate_apps, override_settings

import spark_decl.vendors
from spark_decl import Event, api, event, event_source, handles, only_new_events
from spark_decl.exceptions import UnsupportedDatabase
from spark_decl.models import EventRecord
from spark_decl.registry import Registry
from tests.testapp.models import Challenge


def spark_errors() -> list[Error]:
    # Every check runs (Django's JSONField check asks the database about its features).
    return [e for e in run_checks() if isinstance(e, Error) and e.id == "spark_decl.E001"]


@pytest.mark.django_db
def test_no_error_on_the_test_database() -> None:
    assert spark_errors() == []


@pytest.mark.django_db
def test_old_sqlite_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "vendor", "sqlite")
    monkeypatch.setattr(spark_decl.vendors, "MIN_SQLITE", (99, 0, 0))
    (error,) = spark_errors()
    assert error.obj == "default"
    assert "SQLite >= 99.0.0" in error.msg
    assert error.hint is not None
    assert "PostgreSQL" in error.hint


@pytest.mark.django_db
def test_another_vendor_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "vendor", "oracle")
    (error,) = spark_errors()
    assert "'default' is oracle" in error.msg
    with pytest.raises(SystemCheckError, match=r"spark_decl\.E001"):
        call_command("check")


@pytest.mark.django_db
def test_claiming_on_an_unsupported_database_raises_before_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "vendor", "sqlite")
    monkeypatch.setattr(spark_decl.vendors, "MIN_SQLITE", (99, 0, 0))
    with pytest.raises(UnsupportedDatabase, match=r"SQLite >= 99\.0\.0"):
        list(only_new_events([event("g", 1)]))
    monkeypatch.undo()
    assert not EventRecord.objects.exists()


# -- E002 to W002: what is registered -----------------------------------------------------


def spark_messages(check_id: str) -> list[CheckMessage]:
    return [message for message in run_checks() if message.id == check_id]


def stray_source(instance: models.Model) -> Iterator[Event[Any]]:
    yield from ()


@pytest.mark.django_db
def test_the_test_project_passes_the_registration_checks() -> None:
    ids = {"spark_decl.E002", "spark_decl.E003", "spark_decl.W001", "spark_decl.W002"}
    assert [message for message in run_checks() if message.id in ids] == []


@pytest.mark.django_db
def test_a_source_for_a_model_of_an_app_not_installed_is_an_error(
    isolated_registry: Registry,
) -> None:
    with isolate_apps("tests.testapp"):

        class Stray(models.Model):  # noqa: DJ008
            class Meta:
                app_label = "stray"

        event_source(Stray)(stray_source)
        (error,) = spark_messages("spark_decl.E002")
        assert error.obj is Stray
        assert error.msg.startswith(
            "Event source(s) tests.test_checks.stray_source are registered for stray.Stray, "
            "but its app 'stray' is not in INSTALLED_APPS"
        )
        assert error.hint is not None
        assert "INSTALLED_APPS" in error.hint
        with pytest.raises(SystemCheckError, match=r"spark_decl\.E002"):
            call_command("check")


@pytest.mark.django_db
def test_a_source_for_a_swapped_out_model_is_an_error(isolated_registry: Registry) -> None:
    with (
        override_settings(SPARK_DECL_TEST_PLAN_MODEL="testapp.Challenge"),
        isolate_apps("tests.testapp"),
    ):

        class Plan(models.Model):  # noqa: DJ008
            class Meta:
                app_label = "testapp"
                swappable = "SPARK_DECL_TEST_PLAN_MODEL"

        event_source(Plan)(stray_source)
        (error,) = spark_messages("spark_decl.E002")
        assert error.obj is Plan
        assert "registered for testapp.Plan, but it is swapped out for testapp.Challenge" in (
            error.msg
        )
        assert (
            error.hint == "Register the source for the model that replaces it (testapp.Challenge)."
        )


@pytest.mark.django_db
def test_an_invalid_setting_is_an_error_at_startup() -> None:
    with override_settings(SPARK_DECL={"MAX_ATEMPTS": 3}):
        (error,) = spark_messages("spark_decl.E003")
        assert error.obj == "SPARK_DECL"
        assert "Unknown SPARK_DECL setting(s): MAX_ATEMPTS" in error.msg
        with pytest.raises(SystemCheckError, match=r"spark_decl\.E003"):
            call_command("check")
    with override_settings(SPARK_DECL={"CHUNK_SIZE": 0}):
        (error,) = spark_messages("spark_decl.E003")
        assert "SPARK_DECL['CHUNK_SIZE'] must be a positive integer, got 0" in error.msg
    with override_settings(SPARK_DECL={"MAX_ATTEMPTS": 3}):
        assert spark_messages("spark_decl.E003") == []


def make_source(label: str) -> Callable[[Challenge], Iterator[Event[Any]]]:
    def source(challenge: Challenge) -> Iterator[Event[Any]]:
        yield event(label, challenge.pk)

    return source


class CallableHandler:
    def __call__(self, event: Event[Any]) -> None:
        pass


class NamedCallableHandler(CallableHandler):
    """Named like a function, as spark_decl.mail.templated() names its handlers."""

    def __init__(self, name: str) -> None:
        self.__module__ = __name__
        self.__qualname__ = name


def module_level_handler(event: Event[Any], *, greeting: str = "") -> None:
    pass


@pytest.mark.django_db
def test_two_lambdas_leave_one_handler_and_a_warning(isolated_registry: Registry) -> None:
    api.register_group_handler(group=r"^x", handler=lambda event: None)
    api.register_group_handler(group=r"^y", handler=lambda event: None)
    # The second lambda replaced the first: nothing handles "x" any more.
    assert isolated_registry.handlers_for("x") == ()
    (handler,) = isolated_registry.handlers_for("y")
    name = "tests.test_checks.test_two_lambdas_leave_one_handler_and_a_warning.<locals>.<lambda>"
    assert handler.name == name

    (warning,) = spark_messages("spark_decl.W001")
    assert isinstance(warning, Warning)
    assert warning.obj == name
    assert warning.msg.startswith(
        f"The handler {name} has a name every lambda in tests.test_checks also has: "
        "registering another one replaces it without notice"
    )
    assert warning.hint == "Register a function defined with def at module level."
    # A warning: manage.py check reports it and succeeds.
    out = StringIO()
    call_command("check", stderr=out)
    assert "spark_decl.W001" in out.getvalue()


@pytest.mark.django_db
def test_names_other_functions_share_are_warnings(isolated_registry: Registry) -> None:
    event_source(Challenge, on_save=False)(make_source("challenge_a"))
    handles(r"^x")(CallableHandler())
    handles(r"^x")(NamedCallableHandler("send_reminders"))
    api.register_group_handler(
        group=r"^y", handler=functools.partial(module_level_handler, greeting="hi")
    )
    messages = {message.obj: message.msg for message in spark_messages("spark_decl.W001")}
    assert set(messages) == {
        "tests.test_checks.make_source.<locals>.source",
        "tests.test_checks.CallableHandler",
        "functools.partial",
    }
    assert messages["tests.test_checks.make_source.<locals>.source"].startswith(
        "The event source tests.test_checks.make_source.<locals>.source has a name every "
        "function made by make_source() also has"
    )
    assert "every instance of CallableHandler" in messages["tests.test_checks.CallableHandler"]
    assert "every functools.partial" in messages["functools.partial"]


@pytest.mark.django_db
def test_saving_a_subclass_does_not_run_the_on_save_sources(isolated_registry: Registry) -> None:
    with isolate_apps("tests.testapp"):

        class Place(models.Model):  # noqa: DJ008
            class Meta:
                app_label = "testapp"

        class OpenPlace(Place):  # noqa: DJ008
            class Meta:
                app_label = "testapp"
                proxy = True

        class Restaurant(Place):  # noqa: DJ008
            class Meta:
                app_label = "testapp"

        event_source(Place, on_save=False)(stray_source)
        assert spark_messages("spark_decl.W002") == []  # batch-only sources see every row

        event_source(Place)(module_level_source)
        by_obj = {message.obj: message for message in spark_messages("spark_decl.W002")}
        assert set(by_obj) == {OpenPlace, Restaurant}
        assert by_obj[OpenPlace].msg.startswith(
            "Saving a testapp.OpenPlace (a proxy of testapp.Place) does not run "
            "tests.test_checks.module_level_source"
        )
        assert by_obj[Restaurant].msg.startswith(
            "Saving a testapp.Restaurant (a multi-table subclass of testapp.Place)"
        )
        assert "@event_source(OpenPlace)" in (by_obj[OpenPlace].hint or "")

        event_source(OpenPlace)(module_level_source)
        assert [message.obj for message in spark_messages("spark_decl.W002")] == [Restaurant]


def module_level_source(instance: models.Model) -> Iterator[Event[Any]]:
    yield from ()
