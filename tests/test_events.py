"""``Event`` and ``event()``, and the bad-input guarantee (DESIGN.md semantic 5)."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from pytest_django import DjangoCaptureOnCommitCallbacks

from spark_decl import (
    Event,
    event,
    event_source,
    only_new_events,
    process_events,
    process_queryset,
)
from spark_decl.exceptions import InvalidEvent, SparkError
from spark_decl.models import EventRecord
from spark_decl.registry import Registry, function_name
from tests.conftest import logged_keys
from tests.testapp.models import Challenge

# (bad event, words the error must contain: the field it names and what is wrong)
BAD_EVENTS: list[tuple[object, tuple[str, ...]]] = [
    (["challenge_created", "challenge_created_1"], ("mapping", "list")),
    (None, ("mapping", "NoneType")),
    ("challenge_created_1", ("mapping", "str")),
    ({"key": "k"}, ("'group'", "missing")),
    ({"group": "g"}, ("'key'", "missing")),
    ({"group": "g", "key": 5}, ("'key'", "must be a str", "int")),
    ({"group": b"g", "key": "k"}, ("'group'", "must be a str", "bytes")),
    ({"group": "g", "key": ""}, ("'key'", "empty")),
    ({"group": "", "key": "k"}, ("'group'", "empty")),
    ({"group": "g", "key": "k" * 256}, ("'key'", "256 characters", "255")),
    ({"group": "g" * 256, "key": "k"}, ("'group'", "256 characters", "255")),
    # PostgreSQL cannot store NUL; it is refused on every database alike.
    ({"group": "g", "key": "k\x00"}, ("'key'", "NUL")),
    ({"group": "g\x00", "key": "k"}, ("'group'", "NUL")),
    # A lone surrogate (os.fsdecode() of bytes that are not UTF-8) cannot be encoded as
    # UTF-8: PostgreSQL refuses it, SQLite would store it. Refused everywhere.
    ({"group": "g", "key": "report_\udcff.txt"}, ("'key'", "surrogate", "\\udcff")),
    ({"group": "g\ud800", "key": "k"}, ("'group'", "surrogate", "\\ud800")),
]
BAD_IDS = [
    "list",
    "None",
    "str",
    "no-group",
    "no-key",
    "int-key",
    "bytes-group",
    "empty-key",
    "empty-group",
    "long-key",
    "long-group",
    "nul-key",
    "nul-group",
    "surrogate-key",
    "surrogate-group",
]


def test_event_builds_the_key_from_group_and_instance_id() -> None:
    context = {"points": 3}
    built = event("challenge_created", 42, context)
    assert built == {
        "group": "challenge_created",
        "key": "challenge_created_42",
        "context": context,
    }
    assert built["context"] is context


@pytest.mark.parametrize("context", [None, {}, [], 0, ""])
def test_event_replaces_a_missing_or_falsy_context_with_an_empty_dict(context: Any) -> None:
    assert event("g", "x", context) == {"group": "g", "key": "g_x", "context": {}}


def test_event_without_context() -> None:
    assert event("challenge_ended", "7") == {
        "group": "challenge_ended",
        "key": "challenge_ended_7",
        "context": {},
    }


def test_event_is_a_typeddict() -> None:
    assert typing.is_typeddict(Event)
    assert Event.__required_keys__ == frozenset({"group", "key", "context"})
    built: Event[dict[str, int]] = Event(group="g", key="g_1", context={"n": 1})
    assert built == event("g", 1, {"n": 1})
    assert type(built) is dict


def test_exception_tree() -> None:
    assert issubclass(InvalidEvent, SparkError)
    assert issubclass(InvalidEvent, ValueError)


# The bad-input tests need no commit: the error comes before any claim or dispatch, and
# capturing on-commit callbacks (execute=True) would still run a handler dispatched by mistake.


@pytest.mark.parametrize(("bad", "words"), BAD_EVENTS, ids=BAD_IDS)
@pytest.mark.django_db
def test_only_new_events_rejects_bad_events_before_claiming_anything(
    bad: object, words: tuple[str, ...]
) -> None:
    candidates: list[Any] = [event("challenge_created", "good"), bad]
    with pytest.raises(InvalidEvent) as excinfo:
        list(only_new_events(candidates))
    for word in words:
        assert word in str(excinfo.value)
    assert not EventRecord.objects.exists()


@pytest.mark.parametrize(("bad", "words"), BAD_EVENTS, ids=BAD_IDS)
@pytest.mark.django_db
def test_process_events_rejects_bad_events_before_calling_a_handler(
    bad: object,
    words: tuple[str, ...],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    candidates: list[Any] = [event("challenge_created", "good"), bad]
    with pytest.raises(InvalidEvent) as excinfo, django_capture_on_commit_callbacks(execute=True):
        process_events(candidates)
    for word in words:
        assert word in str(excinfo.value)
    assert logged_keys() == []


def test_key_and_group_of_255_characters_are_accepted(transactional_db: None) -> None:
    long = event("g" * 200, "k" * 54)
    assert len(long["key"]) == 255
    assert [e["key"] for e in only_new_events([long])] == [long["key"]]
    assert EventRecord.objects.get().key == long["key"]
    group = {"group": "g" * 255, "key": "k"}
    assert list(only_new_events([group])) == [{**group, "context": {}}]


def test_a_missing_context_becomes_an_empty_dict_without_mutating_the_input(
    transactional_db: None,
) -> None:
    raw = {"group": "challenge_created", "key": "challenge_created_raw", "extra": 1}
    claimed = list(only_new_events([raw]))
    assert claimed == [{**raw, "context": {}}]
    assert "context" not in raw


def _bad_source(bad: object) -> str:
    """Register (in the test's isolated registry) a Challenge source yielding ``bad``."""

    @event_source(Challenge)
    def bad_source(challenge: Challenge) -> Iterator[Any]:
        yield bad

    return function_name(bad_source)


@pytest.mark.parametrize(("bad", "words"), BAD_EVENTS, ids=BAD_IDS)
@pytest.mark.django_db
def test_a_save_whose_source_yields_a_bad_event_raises_naming_the_source(
    isolated_registry: Registry,
    bad: object,
    words: tuple[str, ...],
    django_capture_on_commit_callbacks: DjangoCaptureOnCommitCallbacks,
) -> None:
    source = _bad_source(bad)
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(InvalidEvent) as excinfo,
        transaction.atomic(),
    ):
        Challenge.objects.create(title="bad")
    for word in (*words, source):
        assert word in str(excinfo.value)
    # Not even the good source's challenge_created was claimed, and the transaction (so the
    # challenge itself) rolled back.
    assert not EventRecord.objects.exists()
    assert not Challenge.objects.exists()
    assert logged_keys() == []


def test_a_bad_event_on_an_autocommit_save_writes_no_claim(
    transactional_db: None, isolated_registry: Registry
) -> None:
    source = _bad_source({"group": "g"})
    with pytest.raises(InvalidEvent, match=source):
        Challenge.objects.create(title="bad")
    # Outside a transaction Django commits the row before post_save runs the sources; none
    # of the save's events was claimed. (Wrap the save in atomic() to lose the row too.)
    assert Challenge.objects.count() == 1
    assert not EventRecord.objects.exists()
    assert logged_keys() == []


def test_the_batch_command_reports_the_source_of_a_bad_event(
    transactional_db: None, isolated_registry: Registry
) -> None:
    Challenge.objects.bulk_create([Challenge(title="a"), Challenge(title="b")])
    source = _bad_source({"group": "g", "key": ""})
    with pytest.raises(CommandError, match=f"2 instance.*{source}.*'key' must not be empty"):
        call_command("process_spark_sources", stdout=StringIO())
    assert not EventRecord.objects.exists()


def test_process_queryset_raises_the_bad_event_itself(
    transactional_db: None, isolated_registry: Registry
) -> None:
    Challenge.objects.bulk_create([Challenge(title="a")])
    source = _bad_source({"group": "g", "key": ""})
    with pytest.raises(InvalidEvent, match=source):
        process_queryset(Challenge.objects.all())
    assert not EventRecord.objects.exists()
