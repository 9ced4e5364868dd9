"""Helpers for testing code that produces events and the handlers that react to them.

:func:`capture_events` records every event dispatched while it is active, and can switch
handlers off; :func:`run_on_commit` runs the on-commit dispatch inside a ``TestCase``, whose
transaction never commits. The pytest plugin (:mod:`spark_decl.pytest_plugin`, loaded
automatically) offers both as fixtures: ``spark_events`` and ``spark_events_no_handlers``.

Import this module from tests only: it is not imported by spark_decl itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS
from django.test import override_settings

from .registry import compile_pattern, function_name, registry, resolve_handler
from .signals import event_dispatched
from .types import Event

__all__ = ["CapturedEvents", "capture_events", "run_on_commit"]

C = TypeVar("C")


class CapturedEvents(list[Event[C]], Generic[C]):
    """The events dispatched while :func:`capture_events` was active, in dispatch order.

    A list of the events themselves (the very dicts handlers receive, model instances in
    their context included), with helpers for the assertions tests make most::

        assert events.keys == [f"challenge_created_{challenge.pk}"]
        assert events.matching(r"^challenge_").groups == ["challenge_created"]
        created = events.one(r"^challenge_created$")
        assert created["context"]["challenge"] == challenge

    ``C`` is the type of the events' context; annotate the fixture or variable as, e.g.,
    ``CapturedEvents[ChallengeContext]`` when every captured event shares one.
    """

    def __init__(self, events: Iterable[Event[C]] = ()) -> None:
        super().__init__(events)
        # id(event) -> (event, names of the handlers it was routed to); the event is kept
        # so that its id cannot be reused while the entry exists.
        self._routes: dict[int, tuple[Event[C], tuple[str, ...]]] = {}

    @property
    def keys(self) -> list[str]:
        """The keys of the captured events, in dispatch order."""
        return [event["key"] for event in self]

    @property
    def groups(self) -> list[str]:
        """The groups of the captured events, in dispatch order (repeats included)."""
        return [event["group"] for event in self]

    def matching(self, pattern: str | re.Pattern[str]) -> CapturedEvents[C]:
        """The events whose group ``re.search(pattern, group)`` matches, as ``@handles``
        routes them. An invalid pattern raises
        :class:`~spark_decl.exceptions.InvalidPattern`."""
        compiled = compile_pattern(pattern, where="CapturedEvents.matching()")
        return self._subset(event for event in self if compiled.search(event["group"]))

    def routed_to(self, handler: Callable[..., object] | str) -> CapturedEvents[C]:
        """The events that were routed to ``handler`` (the function, or its dotted name),
        whether or not it ran: with ``run_handlers=False`` this is what it *would* have
        received. A function or name that is not a registered handler raises
        ``LookupError``."""
        name = handler if isinstance(handler, str) else function_name(handler)
        if registry.get_handler(name) is None:
            resolve_handler(name)  # raises UnknownHandler, suggesting close names
        return self._subset(event for event in self if name in (self._handlers(event) or ()))

    def handlers_of(self, event: Event[C]) -> tuple[str, ...]:
        """The dotted names of the handlers ``event`` (one of the captured events) was
        routed to, in the order they run (whether or not they did)."""
        handlers = self._handlers(event)
        if handlers is None:
            raise ValueError(f"Event {event.get('key')!r} is not one of the captured events.")
        return handlers

    def one(self, pattern: str | re.Pattern[str] | None = None) -> Event[C]:
        """The only captured event (whose group matches ``pattern``, if given).

        Raises ``AssertionError`` listing what was captured when there is none or more
        than one, so a test can write ``created = events.one(r"^challenge_created$")``.
        """
        found = self if pattern is None else self.matching(pattern)
        if len(found) == 1:
            return found[0]
        where = "" if pattern is None else f" whose group matches {_pattern_text(pattern)}"
        detail = f": {found.keys}" if found else ""
        raise AssertionError(
            f"Expected exactly one captured event{where}, found {len(found)}{detail}. "
            f"Captured: {self.keys}."
        )

    def _record(self, event: Event[C], handlers: Iterable[str]) -> None:
        self._routes[id(event)] = (event, tuple(handlers))
        self.append(event)

    def _handlers(self, event: Event[C]) -> tuple[str, ...] | None:
        entry = self._routes.get(id(event))
        return entry[1] if entry is not None and entry[0] is event else None

    def _subset(self, events: Iterable[Event[C]]) -> CapturedEvents[C]:
        subset: CapturedEvents[C] = CapturedEvents()
        for event in events:
            subset.append(event)
            entry = self._routes.get(id(event))
            if entry is not None and entry[0] is event:
                subset._routes[id(event)] = entry
        return subset


def _pattern_text(pattern: str | re.Pattern[str]) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


@contextmanager
def _handlers_off() -> Generator[None, None, None]:
    """``SPARK_DECL["RUN_HANDLERS"] = False`` for the block, the rest of ``SPARK_DECL`` as
    it is (``override_settings``: process-wide, and blocks nest)."""
    current = getattr(settings, "SPARK_DECL", {})
    with override_settings(SPARK_DECL={**current, "RUN_HANDLERS": False}):
        yield


@contextmanager
def capture_events(*, run_handlers: bool = True) -> Generator[CapturedEvents[Any], None, None]:
    """Record the events dispatched inside the block; with ``run_handlers=False``, run no
    handler for them.

    What is recorded is exactly what :data:`~spark_decl.signals.event_dispatched` reports:
    every event handed to the handlers, at the moment it is dispatched. Events from a save
    inside ``transaction.atomic()`` are dispatched when the transaction commits, so the
    commit must happen inside the block (in a ``TestCase`` it never does: use
    :func:`run_on_commit`). Keys claimed before are never dispatched again, so they are not
    recorded either. Capturing is process-wide, like a signal receiver: events dispatched
    by other threads (a ``live_server``) are recorded too.

    ``run_handlers=False`` keeps everything else as it is: sources run, keys are claimed,
    ``event_dispatched`` is sent, but no handler is called and no background handler is
    enqueued. The claimed events' handler calls stay *pending*, exactly as after a crash
    between the claim and the handlers: they are owed, not done, and
    ``retry_spark_events --stale-after 0`` (which this switch does not affect) would run
    them::

        with capture_events(run_handlers=False) as events:
            Challenge.objects.create(title="Run")
        assert events.groups == ["challenge_created"]
        assert not mail.outbox

    Blocks nest; handlers are off while any block with ``run_handlers=False`` is active.
    """
    captured: CapturedEvents[Any] = CapturedEvents()

    def receiver(sender: object, *, event: Event[Any], handlers: list[str], **_: Any) -> None:
        captured._record(event, handlers)  # pyright: ignore[reportPrivateUsage]

    event_dispatched.connect(receiver, weak=False)
    try:
        if run_handlers:
            yield captured
        else:
            with _handlers_off():
                yield captured
    finally:
        event_dispatched.disconnect(receiver)


@contextmanager
def run_on_commit(
    *, using: str = DEFAULT_DB_ALIAS, run_handlers: bool = True
) -> Generator[CapturedEvents[Any], None, None]:
    """Claim and dispatch, when the block exits, the events of its saves, as if the
    transaction committed there; yield the events dispatched.

    For ``django.test.TestCase`` (``@pytest.mark.django_db`` without ``transaction=True``),
    whose transaction is rolled back instead of committed, so handlers waiting for the
    commit would never run. It runs the block's ``on_commit()`` callbacks on exit, as
    ``TestCase.captureOnCommitCallbacks(execute=True)`` does (the other callbacks
    registered in the block run too, and callbacks registered by handlers run in turn),
    and captures what they dispatch like :func:`capture_events`::

        class ChallengeTests(TestCase):
            def test_creating_a_challenge_mails_the_team(self) -> None:
                with run_on_commit() as events:
                    challenge = Challenge.objects.create(title="Run")
                assert events.keys == [f"challenge_created_{challenge.pk}"]
                assert len(mail.outbox) == 1

    ``run_handlers=False`` dispatches without running any handler, as in
    :func:`capture_events`. In a ``TransactionTestCase`` it is harmless: there, events are
    dispatched at each real commit, inside the block, and captured all the same.
    """
    from django.test import TestCase

    with (
        capture_events(run_handlers=run_handlers) as captured,
        TestCase.captureOnCommitCallbacks(using=using, execute=True),
    ):
        yield captured
