"""``async def`` handlers and receivers, called from sync code and from async code.

Async code runs here the way it does in an async view: ``async_to_sync(main)()`` gives
``main`` its own event loop, and the ORM calls it awaits go back (``sync_to_async``,
thread-sensitive) to this test's thread and its database connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import SynchronousOnlyOperation
from django.db import transaction

from spark_decl import (
    Event,
    aonly_new_events,
    aprocess_events,
    event,
    handles,
    process_events,
)
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry, function_name
from spark_decl.signals import event_dispatched
from tests.conftest import all_calls
from tests.testapp.models import Challenge, HandlerLog

T = TypeVar("T")

pytestmark = pytest.mark.django_db(transaction=True)


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    return async_to_sync(main)()


class Recorder:
    """An async handler: records the loop it ran on, writes through the async ORM."""

    def __init__(self) -> None:
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def __call__(self, event: Event[Any]) -> None:
        await asyncio.sleep(0)
        self.loops.append(asyncio.get_running_loop())
        await HandlerLog.objects.acreate(handler="async", key=event["key"])
        if event["context"].get("fail"):
            raise RuntimeError(f"failed after writing for {event['key']}")


@pytest.fixture
def recorder(isolated_registry: Registry) -> Recorder:
    recorder = Recorder()

    async def record(event: Event[Any]) -> None:
        await recorder(event)

    handles(r"^(challenge_created|async)$")(record)
    return recorder


def async_keys() -> list[str]:
    return list(HandlerLog.objects.filter(handler="async").values_list("key", flat=True))


def test_saving_from_async_code_awaits_async_handlers_on_the_callers_loop(
    recorder: Recorder,
) -> None:
    async def main() -> tuple[Challenge, asyncio.AbstractEventLoop]:
        challenge = await Challenge.objects.acreate(title="From an async view")
        return challenge, asyncio.get_running_loop()

    challenge, loop = run_async(main)
    assert recorder.loops == [loop]
    assert async_keys() == [f"challenge_created_{challenge.pk}"]
    assert set(all_calls().values()) == {"done"}


def test_saving_from_sync_code_awaits_async_handlers(recorder: Recorder) -> None:
    challenge = Challenge.objects.create(title="From a sync view")
    assert len(recorder.loops) == 1
    assert async_keys() == [f"challenge_created_{challenge.pk}"]


def test_an_async_handler_that_raises_leaves_none_of_its_async_writes(
    recorder: Recorder,
) -> None:
    async def main() -> None:
        await aprocess_events(aonly_new_events([event("async", 1, {"fail": True})]))

    run_async(main)
    # The write the handler awaited ran inside the call's transaction, and rolled back.
    assert async_keys() == []
    [failed] = HandlerOutcome.objects.all()
    assert failed.status == "failed"
    assert "failed after writing for async_1" in failed.last_error


def test_aonly_new_events_and_aprocess_events_from_async_code(recorder: Recorder) -> None:
    async def produce() -> Any:
        for n in (1, 2, 1):
            yield event("async", n)

    async def main() -> list[str]:
        new = [e["key"] async for e in aonly_new_events(produce())]
        again = [e["key"] async for e in aonly_new_events(produce())]
        assert again == []
        await aprocess_events([event("async", 3)])
        return new

    assert run_async(main) == ["async_1", "async_2"]
    # aonly_new_events only claims; aprocess_events dispatched async_3.
    assert async_keys() == ["async_3"]


def test_aprocess_events_inside_a_transaction_runs_handlers_after_commit(
    recorder: Recorder,
) -> None:
    def in_transaction() -> None:
        with transaction.atomic():
            async_to_sync(aprocess_events)([event("async", 9)])
            assert async_keys() == []

    async def main() -> None:
        from asgiref.sync import sync_to_async

        await sync_to_async(in_transaction)()

    run_async(main)
    assert async_keys() == ["async_9"]


def test_process_events_called_in_async_code_points_to_the_async_api(
    recorder: Recorder,
) -> None:
    async def main() -> None:
        process_events([event("async", 1)])

    with pytest.raises(SynchronousOnlyOperation):
        run_async(main)
    assert async_keys() == []


def test_async_receivers_of_event_dispatched_are_awaited(isolated_registry: Registry) -> None:
    received: list[tuple[str, list[str]]] = []

    async def receiver(*, event: Event[Any], handlers: list[str], **kwargs: Any) -> None:
        await asyncio.sleep(0)
        received.append((event["key"], handlers))

    event_dispatched.connect(receiver)
    try:
        challenge = Challenge.objects.create(title="sync")

        async def main() -> None:
            await aprocess_events([event("async", 5)])

        run_async(main)
    finally:
        event_dispatched.disconnect(receiver)
    assert received == [
        (f"challenge_created_{challenge.pk}", ["tests.testapp.spark.log_challenge_event"]),
        ("async_5", []),
    ]


def test_async_handler_names_are_their_dotted_names(recorder: Recorder) -> None:
    [spec] = [h for h in recorder_specs() if h.is_async]
    assert spec.name.startswith("tests.test_async.recorder.<locals>.record")
    assert spec.name == function_name(spec.function)


def recorder_specs() -> list[Any]:
    from spark_decl.registry import registry

    return registry.handlers()


def claimed_keys() -> list[str]:
    return sorted(EventRecord.objects.values_list("key", flat=True))


@pytest.mark.parametrize("stop", ["break", "aclose"])
def test_aonly_new_events_claims_nothing_its_consumer_did_not_get(stop: str) -> None:
    events = [event("async", n) for n in range(4)]

    async def take_one() -> str:
        new = aonly_new_events(events)
        if stop == "aclose":
            assert isinstance(new, AsyncGenerator)
            first: Event[dict[str, Any]] = await anext(new)
            await new.aclose()
            return first["key"]
        async for first in new:
            return first["key"]
        raise AssertionError("nothing was yielded")

    assert run_async(take_one) == "async_0"
    assert claimed_keys() == ["async_0"]


def test_aonly_new_events_leaves_the_rest_new_when_its_consumer_raises() -> None:
    events = [event("async", n) for n in range(4)]

    async def fail_on_the_second() -> None:
        async for new in aonly_new_events(events):
            if new["key"] == "async_1":
                raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_async(fail_on_the_second)
    assert claimed_keys() == ["async_0", "async_1"]

    async def the_rest() -> list[str]:
        return [new["key"] async for new in aonly_new_events(events)]

    assert run_async(the_rest) == ["async_2", "async_3"]
