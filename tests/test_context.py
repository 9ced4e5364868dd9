"""Storing contexts as JSON and rebuilding them for retries."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spark_decl import event, only_new_events
from spark_decl.context import (
    MAX_CONTEXT_BYTES,
    MAX_DEPTH,
    TAG,
    _dump,
    dump_context,
    dump_context_json,
    load_context,
)
from spark_decl.exceptions import ContextUnavailable, InvalidContext
from spark_decl.models import EventRecord
from tests.testapp.models import Challenge, Donation


def round_trip(value: object) -> Any:
    return load_context(json.loads(json.dumps(dump_context(value, key="k"))))


def assert_same(actual: object, expected: object) -> None:
    """Equal, and of the same type all the way down (1 == 1.0 == True would hide a bug)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert actual.keys() == expected.keys()
        for item_key, item in expected.items():
            assert_same(actual[item_key], item)
    elif isinstance(expected, list):
        assert isinstance(actual, list)
        assert len(actual) == len(expected)
        for actual_item, item in zip(actual, expected, strict=True):
            assert_same(actual_item, item)
    else:
        assert actual == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -17,
        2**70,
        1.5,
        "text",
        "",
        [],
        {},
        [1, "a", None, [2.5]],
        {"a": {"b": [1, {"c": False}]}},
        dt.date(2024, 2, 29),
        dt.datetime(2024, 2, 29, 13, 5, 7, 123456),
        dt.datetime(2024, 2, 29, 13, 5, 7, tzinfo=dt.UTC),
        dt.datetime(2024, 2, 29, 13, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        dt.time(23, 59, 58, 1),
        dt.timedelta(days=-2, seconds=5, microseconds=7),
        Decimal("12.3400"),
        Decimal("-1E+3"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        {TAG: "model", "model": "testapp.challenge", "pk": 1},
        {TAG: "dict", "value": {TAG: "x"}},
        {TAG: {TAG: [{TAG: None}]}},
        {"when": dt.date(2020, 1, 1), "amounts": [Decimal("1.10"), 2]},
    ],
)
def test_values_round_trip_to_equal_values_of_the_same_type(value: object) -> None:
    assert_same(round_trip(value), value)


def test_tuples_come_back_as_lists() -> None:
    assert_same(round_trip({"pair": (1, "a")}), {"pair": [1, "a"]})


def test_a_dict_containing_the_marker_is_not_mistaken_for_a_tagged_value() -> None:
    value = {TAG: "date", "value": "2020-01-01"}
    stored = dump_context(value, key="k")
    assert stored != value
    assert_same(load_context(stored), value)


@pytest.mark.django_db
def test_model_instances_are_stored_as_references_and_fetched_fresh() -> None:
    challenge = Challenge.objects.create(title="before", is_active=False)
    donation = Donation.objects.create(challenge=challenge, amount=5)
    stored = dump_context({"challenge": challenge, "donations": [donation]}, key="k")
    assert stored == {
        "challenge": {TAG: "model", "model": "testapp.challenge", "pk": challenge.pk},
        "donations": [{TAG: "model", "model": "testapp.donation", "pk": donation.pk}],
    }
    Challenge.objects.filter(pk=challenge.pk).update(title="after")
    loaded = load_context(json.loads(json.dumps(stored)))
    assert loaded["challenge"] == challenge
    assert loaded["challenge"] is not challenge
    assert loaded["challenge"].title == "after"
    assert loaded["donations"][0].amount == 5

    pk = challenge.pk
    challenge.delete()
    with pytest.raises(ContextUnavailable, match=f"Challenge with pk={pk} no longer exists"):
        load_context(stored)


def test_a_model_that_is_no_longer_installed_is_unavailable() -> None:
    with pytest.raises(ContextUnavailable, match=r"gone\.thing"):
        load_context({TAG: "model", "model": "gone.thing", "pk": 1})


def test_an_unknown_tag_is_unavailable() -> None:
    with pytest.raises(ContextUnavailable, match="'pickle'"):
        load_context({TAG: "pickle", "value": "x"})


@pytest.mark.django_db(transaction=True)
def test_a_context_round_trips_through_the_database() -> None:
    challenge = Challenge.objects.create(title="x", is_active=False)
    context = {
        "challenge": challenge,
        "when": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
        "day": dt.date(2024, 5, 1),
        "at": dt.time(8, 30),
        "left": dt.timedelta(hours=36),
        "amount": Decimal("19.90"),
        "id": uuid.UUID(int=7),
        "tags": ["a", "b"],
        "nested": {TAG: 1, "ok": True},
        "ratio": 0.25,
        "nothing": None,
    }
    list(only_new_events([event("stored", 1, context)]))
    loaded = load_context(EventRecord.objects.get(key="stored_1").context)
    assert loaded.pop("challenge") == challenge
    expected = dict(context)
    del expected["challenge"]
    assert_same(loaded, expected)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "where", "what"),
    [
        ({"bad": {1, 2}}, "context['bad']", "builtins.set"),
        ({"bad": Opaque()}, "context['bad']", "Opaque"),
        ({"list": [1, b"x"]}, "context['list'][1]", "builtins.bytes"),
        ({"deep": {"er": float("nan")}}, "context['deep']['er']", "NaN"),
        ({"inf": math.inf}, "context['inf']", "infinity"),
        ({"ok": 1, 5: "int key"}, "context", "5"),
        ({"fn": len}, "context['fn']", "builtin_function_or_method"),
        ({"unsaved": Challenge(title="x")}, "context['unsaved']", "unsaved Challenge"),
        # PostgreSQL's jsonb cannot store NUL; it is refused on every database alike.
        ({"text": ["ok", "a\x00b"]}, "context['text'][1]", "NUL"),
        ({"a\x00": 1}, "context", "NUL"),
        # A lone surrogate (what os.fsdecode() makes of bytes that are not UTF-8) cannot be
        # encoded as UTF-8: PostgreSQL refuses it, SQLite would store it. Refused everywhere.
        ({"file": "report_\udcff.txt"}, "context['file']", "surrogate"),
        ({"files": ["ok", "\ud800"]}, "context['files'][1]", "surrogate"),
        ({"x\udcff": 1}, "context", "surrogate"),
        # json.dumps() and every reader refuse ints beyond Python's int/str limit.
        ({"big": 10**5000}, "context['big']", "4300 digits"),
        ({"big": [-(10**4300)]}, "context['big'][0]", "4300 digits"),
    ],
)
def test_unstorable_values_raise_invalid_context_naming_event_and_place(
    value: object, where: str, what: str
) -> None:
    with pytest.raises(InvalidContext) as excinfo:
        dump_context(value, key="challenge_created_1")
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert message.startswith(f"Event 'challenge_created_1': {where} ")
    assert what in message


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"child": [value]}
    return value


def test_a_context_nested_beyond_the_limit_is_refused_at_the_level_that_exceeds_it() -> None:
    dump_context(nested(MAX_DEPTH // 2), key="k")  # a dict and a list per step
    with pytest.raises(InvalidContext) as excinfo:
        dump_context_json({"tree": nested(1000)}, key="deep_1")
    message = str(excinfo.value)
    assert message.startswith("Event 'deep_1': context['tree']['child'][0]")
    assert f"nested more than {MAX_DEPTH} levels deep" in message


def test_a_context_that_contains_itself_is_refused_not_a_recursion_error() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(InvalidContext, match="nested more than"):
        dump_context_json({"loop": loop}, key="k")


def test_an_int_at_the_limit_is_stored_and_read_back() -> None:
    largest = 10**4300 - 1
    assert_same(round_trip({"n": largest, "m": -largest}), {"n": largest, "m": -largest})


def test_a_context_larger_than_the_limit_is_refused_naming_its_size() -> None:
    dump_context_json({"blob": "x" * (MAX_CONTEXT_BYTES - 20)}, key="k")
    with pytest.raises(InvalidContext) as excinfo:
        dump_context_json({"blob": "x" * MAX_CONTEXT_BYTES}, key="big_1")
    message = str(excinfo.value)
    assert message.startswith("Event 'big_1': the context is ")
    assert f"{MAX_CONTEXT_BYTES:,}" in message


@pytest.mark.parametrize(
    "context",
    [{"file": "\udcff"}, {"tree": nested(1000)}, {"big": 10**5000}],
    ids=["surrogate", "deep", "big-int"],
)
@pytest.mark.django_db(transaction=True)
def test_an_unstorable_context_is_refused_before_the_claim_on_every_database(
    context: dict[str, object],
) -> None:
    with pytest.raises(InvalidContext, match="Event 'bad_1': context"):
        list(only_new_events([event("bad", 1, context)]))
    assert not EventRecord.objects.exists()


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10)
)
typed_scalars = (
    st.dates()
    | st.datetimes()
    # Fixed offsets: a zone name (ZoneInfo) comes back as its offset at that instant.
    | st.datetimes(
        timezones=st.integers(-23 * 60, 23 * 60).map(
            lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
        )
    )
    | st.times()
    | st.timedeltas()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.uuids()
)
dict_keys = st.sampled_from([TAG, "value", "model", "pk", "a"]) | st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5
)
contexts = st.recursive(
    json_scalars | typed_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(dict_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(contexts)
def test_storable_contexts_round_trip(value: object) -> None:
    assert_same(round_trip(value), value)


# The flat contexts most sources build take a fast path to JSON text when claimed; it must
# agree with the general conversion, text for text and error for error.
flat_keys = st.one_of(
    st.sampled_from(["challenge", TAG, "a\x00b", "\udcff", "é"]), st.text(max_size=5)
)
flat_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=5),
    st.sampled_from(["\x00", "x\x00", "\udcff", "é\ud800", "é"]),
    st.sampled_from([10**4300 - 1, 10**4300, -(10**4301)]),
    st.builds(lambda pk: Challenge(pk=pk, title="t"), st.one_of(st.none(), st.integers(1, 9))),
    st.builds(lambda pk: Donation(pk=pk), st.sampled_from([None, 3])),
    st.floats(allow_nan=True),
    st.dates(),
    st.lists(st.integers(), max_size=2),
)


def general_dump(value: object) -> object:
    try:
        return json.dumps(_dump(value, (), "k"))
    except InvalidContext as exc:
        return ("refused", str(exc))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(flat_keys, flat_values, max_size=4))
def test_the_fast_path_for_flat_contexts_agrees_with_the_general_conversion(
    value: dict[str, object],
) -> None:
    try:
        fast: object = dump_context_json(value, key="k")
    except InvalidContext as exc:
        fast = ("refused", str(exc))
    assert fast == general_dump(value)
