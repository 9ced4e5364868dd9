"""Hypothesis properties: dedupe (each key handled once, first-seen order) and routing."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from django.test import override_settings
from hypothesis import given, settings
from hypothesis import strategies as st

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import registry
from tests.conftest import clear_tables

# Small alphabets, so that repeated keys and overlapping prefixes are the common case.
groups = st.text(alphabet="abc_", min_size=1, max_size=4)
instance_ids = st.integers(min_value=0, max_value=6)
event_lists = st.lists(
    st.builds(
        lambda group, n: {"group": group, "key": f"k{n}", "context": {"n": n}},
        groups,
        instance_ids,
    ),
    max_size=25,
)


def first_seen(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for candidate in events:
        seen.setdefault(candidate["key"], candidate)
    return list(seen.values())


@pytest.mark.django_db(transaction=True)
@settings(max_examples=60, deadline=None)
@given(
    events=event_lists,
    cuts=st.lists(st.integers(min_value=0, max_value=25), max_size=3),
    chunk_size=st.integers(min_value=1, max_value=6),
)
def test_each_key_is_handled_once_in_first_seen_order(
    events: list[dict[str, Any]], cuts: list[int], chunk_size: int
) -> None:
    clear_tables()
    handled: list[dict[str, Any]] = []
    bounds = [0, *sorted(cut for cut in cuts if cut <= len(events)), len(events)]
    batches = [events[start:end] for start, end in pairwise(bounds)]

    with registry.isolated() as isolated, override_settings(SPARK_DECL={"CHUNK_SIZE": chunk_size}):
        isolated.clear()

        @handles("")
        def record(event: Event[Any]) -> None:
            handled.append(dict(event))

        for batch in batches:
            process_events(only_new_events(batch))
        # Everything seen before is old now.
        process_events(only_new_events(events))

    assert handled == first_seen(events)
    assert sorted(EventRecord.objects.values_list("key", flat=True)) == sorted(
        e["key"] for e in handled
    )
    assert set(HandlerOutcome.objects.values_list("status", flat=True)) <= {"done"}
    assert HandlerOutcome.objects.count() == len(handled)


literal_prefixes = st.text(alphabet="ab_.*", min_size=0, max_size=3)


def make_handler(index: int, calls: list[tuple[int, str]]) -> Callable[[Event[Any]], None]:
    def handler(event: Event[Any]) -> None:
        calls.append((index, event["group"]))

    # Registrations are keyed by name: give every generated handler its own.
    handler.__qualname__ = f"routing_handler_{index}"
    return handler


@pytest.mark.django_db(transaction=True)
@settings(max_examples=150, deadline=None)
@given(
    patterns=st.lists(
        st.tuples(literal_prefixes, st.booleans()).map(
            lambda p: ("^" if p[1] else "") + re.escape(p[0])
        ),
        min_size=1,
        max_size=6,
    ),
    event_groups=st.lists(st.text(alphabet="ab_.*c", min_size=1, max_size=5), max_size=8),
)
def test_handlers_called_are_exactly_those_whose_pattern_searches_the_group(
    patterns: list[str], event_groups: list[str]
) -> None:
    calls: list[tuple[int, str]] = []
    with registry.isolated() as isolated:
        isolated.clear()
        for index, pattern in enumerate(patterns):
            handles(pattern)(make_handler(index, calls))
        # Twice: the second round is answered from the routing cache.
        for _ in range(2):
            calls.clear()
            process_events([event(group, n) for n, group in enumerate(event_groups)])
            expected = [
                (index, group)
                for group in event_groups
                for index, pattern in enumerate(patterns)
                if re.search(pattern, group)
            ]
            assert calls == expected
