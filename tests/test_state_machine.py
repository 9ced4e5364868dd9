"""A Hypothesis state machine: saves, rollbacks, batches, crashes, failures and retries.

The machine drives the package the way an application does (``Challenge`` saves through the
ORM, ``manage.py process_spark_sources`` / ``retry_spark_events``) with three sources and
two handlers registered in an isolated registry, and keeps a model of what must, may and
must not have happened. After every step it checks DESIGN.md's semantics 1-4 against the
database; at the end (and in the ``recover`` rule) it heals the handler, runs the batch and
``retry_spark_events --stale-after 0 --all``, and checks every committed key was handled
exactly once.

A "crash" is a handler raising :class:`SimulatedCrash` (a ``BaseException``, like
``KeyboardInterrupt``: nothing in the library may catch it) in the middle of a save, a
transaction's commit, a batch or a retry; the test catches it and goes on with what a dying
process leaves in the database. Separately, keys claimed with
:func:`~spark_decl.claims.claim_events` and never dispatched are what a process killed right
after its claim committed leaves.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from io import StringIO
from typing import TypedDict

import pytest
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings
from django.utils import timezone
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from spark_decl import Event, event, event_source, handles, only_new_events, process_events
from spark_decl.claims import claim_events
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry, function_name, registry
from spark_decl.retry import due_outcomes, retry_outcomes
from spark_decl.sources import events_from, process_model
from tests.conftest import all_calls, clear_tables
from tests.testapp.models import Challenge, HandlerLog

# -- what the machine registers -----------------------------------------------------------


class ChallengeContext(TypedDict):
    challenge: Challenge


def created(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    if challenge.is_active:
        yield event("sm_created", challenge.pk, {"challenge": challenge})


def titled(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    """A new key whenever an existing challenge is saved under a title it never had."""
    yield event("sm_titled", f"{challenge.pk}_{challenge.title}", {"challenge": challenge})


def ended(challenge: Challenge) -> Iterator[Event[ChallengeContext]]:
    """Batch only (``on_save=False``): time passing is noticed by the batch."""
    if challenge.end_date < timezone.localdate():
        yield event("sm_ended", challenge.pk, {"challenge": challenge})


class SimulatedCrash(BaseException):
    """The process dies here (``BaseException``: no ``except Exception`` may swallow it)."""


class Boom(Exception):
    pass


@dataclass
class Switches:
    """What the rules tell the handlers to do, and what the handlers saw."""

    failing: bool = False
    # Handler calls to let through before the next one crashes; None: never crash.
    crash_after: int | None = None
    crashes: int = 0
    calls: int = 0
    # (handler, key) of each "mail" sent: an on_commit callback of a handler call.
    sent: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.__dict__.update(vars(Switches()))


SWITCHES = Switches()


def handle(name: str, event: Event[ChallengeContext]) -> None:
    SWITCHES.calls += 1
    key = event["key"]
    challenge: object = event["context"]["challenge"]
    # Retries rebuild the context from storage: it must still be this event's challenge.
    if not isinstance(challenge, Challenge) or not (
        key in {f"sm_created_{challenge.pk}", f"sm_ended_{challenge.pk}"}
        or key.startswith(f"sm_titled_{challenge.pk}_")
    ):
        SWITCHES.problems.append(f"{name} got context {challenge!r} for {key}")
    # sm_created calls fail or die before their first query, the others after their
    # effects: either way a failing or dying call must leave nothing behind.
    early = key.startswith("sm_created_")
    if not early:
        effects(name, key)
    if SWITCHES.crash_after is not None:
        if SWITCHES.crash_after == 0:
            SWITCHES.crash_after = None
            SWITCHES.crashes += 1
            raise SimulatedCrash(f"{name} dies handling {key}")
        SWITCHES.crash_after -= 1
    if name == "flaky" and SWITCHES.failing:
        raise Boom(f"flaky cannot handle {key}")
    if early:
        effects(name, key)


def effects(name: str, key: str) -> None:
    HandlerLog.objects.create(handler=name, key=key)
    # Mail goes out once the call commits: never for a call that failed or died.
    transaction.on_commit(partial(SWITCHES.sent.append, (name, key)))


def flaky(event: Event[ChallengeContext]) -> None:
    """Every event; fails (``Boom``) while the ``failing`` switch is on."""
    handle("flaky", event)


def steady(event: Event[ChallengeContext]) -> None:
    """``sm_created`` and ``sm_ended`` events; never raises an ``Exception``."""
    handle("steady", event)


SHORT_NAMES = {function_name(flaky): "flaky", function_name(steady): "steady"}


def register() -> None:
    event_source(Challenge)(created)
    event_source(Challenge)(titled)
    event_source(Challenge, on_save=False)(ended)
    handles(r"^sm_")(flaky)
    handles(r"^sm_(created|ended)$")(steady)


def handlers_of(key: str) -> tuple[str, ...]:
    return ("flaky", "steady") if key.startswith(("sm_created_", "sm_ended_")) else ("flaky",)


# -- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A committed challenge as the sources see it."""

    title: str
    active: bool
    ended: bool = False


def save_keys(pk: int, row: Row) -> set[str]:
    """The keys saving ``row`` produces (the ``on_save`` sources)."""
    keys = {f"sm_titled_{pk}_{row.title}"}
    if row.active:
        keys.add(f"sm_created_{pk}")
    return keys


def batch_keys(pk: int, row: Row) -> set[str]:
    """The keys the batch produces for ``row`` (every source)."""
    return save_keys(pk, row) | ({f"sm_ended_{pk}"} if row.ended else set())


def all_batch_keys(rows: dict[int, Row]) -> set[str]:
    return {key for pk, row in rows.items() for key in batch_keys(pk, row)}


def pick(rows: dict[int, Row], which: int) -> int:
    return sorted(rows)[which % len(rows)]


class Rollback(Exception):
    pass


@dataclass
class Probe:
    crashed: bool = False


@contextmanager
def dying_after(calls: int | None) -> Iterator[Probe]:
    """Let ``calls`` handler calls through, then let the process die in the next one."""
    probe = Probe()
    crashes = SWITCHES.crashes
    SWITCHES.crash_after = calls
    try:
        yield probe
    except SimulatedCrash:
        probe.crashed = True
    finally:
        SWITCHES.crash_after = None
    if SWITCHES.crashes != crashes and not probe.crashed:
        SWITCHES.problems.append("a handler's SimulatedCrash (a BaseException) was swallowed")


def quietly(command: str, *args: str) -> None:
    call_command(command, *args, stdout=StringIO(), stderr=StringIO())


def future() -> dt.date:
    return timezone.localdate() + dt.timedelta(days=30)


TITLES = st.sampled_from("abc")
WHICH = st.integers(min_value=0, max_value=20)
# Mostly no crash; otherwise the process dies in the first, second or third handler call.
CRASH = st.sampled_from([None, None, None, None, 0, 1, 2])
SAVE_OPS = st.lists(
    # (None: create | an existing row, title, is_active, in a savepoint that rolls back)
    st.tuples(st.none() | WHICH, TITLES, st.booleans(), st.booleans()),
    min_size=2,
    max_size=5,
)


class EventSourcingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # One transactional test database for every example: start each from empty tables.
        clear_tables()
        Challenge.objects.all().delete()
        SWITCHES.reset()
        self.override: override_settings | None = None
        self.rows: dict[int, Row] = {}
        # Keys a committed save or batch produced: each must end up handled exactly once.
        self.must: set[str] = set()
        # Keys of operations that died: their claim may or may not have committed.
        self.may: set[str] = set()
        # Keys only rolled-back saves produced (minus must/may when checked).
        self.rolled_back: set[str] = set()
        # (handler, key) calls that must be done by now.
        self.done: set[tuple[str, str]] = set()
        self.may_have_pending = False
        self.ever_failed = False
        # False from the start of a step until its invariants pass: teardown's final check
        # runs only after a clean step, so it never hides the step's own failure.
        self.clean = True

    def step(self) -> None:
        self.clean = False

    def produced(self, keys: set[str], *, crashed: bool) -> None:
        """A committed operation's sources produced ``keys``."""
        if crashed:
            self.may |= keys - self.must
            self.may_have_pending = True
            return
        for key in keys - self.must - self.may:
            # Never claimed before: handled at once, except by a failing handler.
            self.done.update(
                (handler, key)
                for handler in handlers_of(key)
                if handler == "steady" or not SWITCHES.failing
            )
        self.must |= keys

    def save(self, rows: dict[int, Row], which: int | None, title: str, active: bool) -> int:
        """Save a new challenge (``which`` is None) or one of ``rows`` through the ORM."""
        if which is None or not rows:
            challenge = Challenge(title=title, is_active=active, end_date=future())
        else:
            challenge = Challenge.objects.get(pk=pick(rows, which))
            challenge.title, challenge.is_active = title, active
        challenge.save()
        return challenge.pk

    # -- rules -------------------------------------------------------------------------------

    @initialize(
        chunk_size=st.sampled_from([500, 1, 2]),
        transaction_seconds=st.sampled_from([0.5, 0.0]),
        challenges=st.lists(st.tuples(TITLES, st.booleans()), min_size=1, max_size=3),
    )
    def configure(
        self, chunk_size: int, transaction_seconds: float, challenges: list[tuple[str, bool]]
    ) -> None:
        """``TRANSACTION_SECONDS=0`` commits after every call: crashes leave calls pending.
        A few challenges to start from, so that every rule has something to work on."""
        self.step()
        self.override = override_settings(
            SPARK_DECL={
                "CHUNK_SIZE": chunk_size,
                "TRANSACTION_SECONDS": transaction_seconds,
                "MAX_ATTEMPTS": 1000,
            }
        )
        self.override.enable()
        for title, active in challenges:
            self.create_one(title, active, crash=None)

    @rule(title=TITLES, active=st.booleans(), crash=CRASH)
    def create(self, title: str, active: bool, crash: int | None) -> None:
        self.step()
        self.create_one(title, active, crash)

    def create_one(self, title: str, active: bool, crash: int | None) -> None:
        with dying_after(crash) as probe:
            self.save(self.rows, None, title, active)
        # Autocommit: the row committed before post_save ran, even if the process died.
        pk = Challenge.objects.exclude(pk__in=list(self.rows)).get().pk
        self.rows[pk] = Row(title, active)
        self.produced(save_keys(pk, self.rows[pk]), crashed=probe.crashed)

    @rule(which=WHICH, title=TITLES, active=st.booleans(), crash=CRASH)
    def update(self, which: int, title: str, active: bool, crash: int | None) -> None:
        self.step()
        pk = pick(self.rows, which)
        with dying_after(crash) as probe:
            self.save(self.rows, which, title, active)
        self.rows[pk] = replace(self.rows[pk], title=title, active=active)
        self.produced(save_keys(pk, self.rows[pk]), crashed=probe.crashed)

    @rule(which=st.none() | WHICH, title=TITLES, active=st.booleans())
    def save_then_rollback(self, which: int | None, title: str, active: bool) -> None:
        self.step()
        calls = SWITCHES.calls
        tentative = dict(self.rows)
        pk = None
        try:
            with transaction.atomic():
                pk = self.save(tentative, which, title, active)
                raise Rollback
        except Rollback:
            pass
        assert pk is not None
        row = replace(tentative.get(pk, Row(title, active)), title=title, active=active)
        self.rolled_back |= save_keys(pk, row)
        assert SWITCHES.calls == calls, "a rolled-back save ran a handler"

    @rule(
        ops=SAVE_OPS,
        batch_at=st.none() | st.integers(min_value=0, max_value=5),
        rollback=st.booleans(),
        crash=CRASH,
    )
    def saves_in_one_transaction(
        self,
        ops: list[tuple[int | None, str, bool, bool]],
        batch_at: int | None,
        rollback: bool,
        crash: int | None,
    ) -> None:
        """Several saves in ``atomic()``, some in savepoints that roll back, and maybe a
        batch run before the ``batch_at``-th; the transaction commits or (``rollback``)
        rolls back."""
        self.step()
        calls = SWITCHES.calls
        tentative = dict(self.rows)
        kept: set[str] = set()
        undone: set[str] = set()
        with dying_after(crash) as probe:
            try:
                with transaction.atomic():
                    for index, (which, title, active, in_savepoint_rolled_back) in enumerate(ops):
                        if index == batch_at:
                            process_model(Challenge)
                            kept |= all_batch_keys(tentative)
                        if in_savepoint_rolled_back:
                            pk = None
                            try:
                                with transaction.atomic():
                                    pk = self.save(tentative, which, title, active)
                                    raise Rollback
                            except Rollback:
                                assert pk is not None
                                row = tentative.get(pk, Row(title, active))
                                undone |= save_keys(pk, replace(row, title=title, active=active))
                        else:
                            pk = self.save(tentative, which, title, active)
                            row = tentative.get(pk, Row(title, active))
                            tentative[pk] = replace(row, title=title, active=active)
                            kept |= save_keys(pk, tentative[pk])
                    if batch_at is not None and batch_at >= len(ops):
                        process_model(Challenge)
                        kept |= all_batch_keys(tentative)
                    assert SWITCHES.calls == calls, "a handler ran before the commit"
                    if rollback:
                        raise Rollback
            except Rollback:
                pass
        if rollback:
            self.rolled_back |= kept | undone
            assert SWITCHES.calls == calls, "a rolled-back transaction ran a handler"
            return
        self.rows = tentative
        self.rolled_back |= undone
        self.produced(kept, crashed=probe.crashed)

    @rule(which=WHICH)
    def time_passes(self, which: int) -> None:
        """The challenge ends; ``QuerySet.update`` sends no ``post_save``: only the batch
        can notice."""
        self.step()
        pk = pick(self.rows, which)
        calls = SWITCHES.calls
        Challenge.objects.filter(pk=pk).update(end_date=timezone.localdate() - dt.timedelta(30))
        self.rows[pk] = replace(self.rows[pk], ended=True)
        assert SWITCHES.calls == calls

    @rule(command=st.booleans(), crash=CRASH)
    def batch(self, command: bool, crash: int | None) -> None:
        self.step()
        with dying_after(crash) as probe:
            if command:
                quietly("process_spark_sources")
            else:
                process_model(Challenge)
        keys = all_batch_keys(self.rows)
        self.produced(keys, crashed=probe.crashed)

    @rule(rollback=st.booleans(), crash=CRASH)
    def batch_in_transaction(self, rollback: bool, crash: int | None) -> None:
        """``process_model`` inside ``atomic()``: claimed a chunk at a time, handled after
        the commit, never if it rolls back."""
        self.step()
        calls = SWITCHES.calls
        with dying_after(crash) as probe:
            try:
                with transaction.atomic():
                    process_model(Challenge)
                    assert SWITCHES.calls == calls, "a handler ran before the commit"
                    if rollback:
                        raise Rollback
            except Rollback:
                pass
        keys = all_batch_keys(self.rows)
        if rollback:
            self.rolled_back |= keys
            assert SWITCHES.calls == calls, "a rolled-back transaction ran a handler"
        else:
            self.produced(keys, crashed=probe.crashed)

    @rule(which=WHICH, mode=st.sampled_from(["autocommit", "commit", "rollback"]), crash=CRASH)
    def app_processes_events(self, which: int, mode: str, crash: int | None) -> None:
        """Application code, the django-spark way: ``process_events(only_new_events(...))``
        with the sources' events, outside or inside a transaction."""
        self.step()
        pk = pick(self.rows, which)
        calls = SWITCHES.calls
        challenge = Challenge.objects.get(pk=pk)
        events = [*created(challenge), *titled(challenge), *ended(challenge)]
        with dying_after(crash) as probe:
            if mode == "autocommit":
                process_events(only_new_events(events))
            else:
                try:
                    with transaction.atomic():
                        process_events(only_new_events(events))
                        assert SWITCHES.calls == calls, "a handler ran before the commit"
                        if mode == "rollback":
                            raise Rollback
                except Rollback:
                    pass
        if mode == "rollback":
            self.rolled_back |= batch_keys(pk, self.rows[pk])
            assert SWITCHES.calls == calls, "a rolled-back transaction ran a handler"
        else:
            self.produced(batch_keys(pk, self.rows[pk]), crashed=probe.crashed)

    @rule(which=WHICH)
    def dies_after_claiming(self, which: int) -> None:
        """What a process killed right after its claim committed leaves: pending calls."""
        self.step()
        pk = pick(self.rows, which)
        challenge = Challenge.objects.get(pk=pk)
        claim_events(events_from(challenge, registry.sources(Challenge)))
        self.must |= batch_keys(pk, self.rows[pk])
        self.may_have_pending = True

    @precondition(lambda self: not SWITCHES.failing)
    @rule()
    def start_failing(self) -> None:
        self.step()
        SWITCHES.failing = True
        self.ever_failed = True

    @precondition(lambda self: SWITCHES.failing)
    @rule(then_retry=st.booleans())
    def stop_failing(self, then_retry: bool) -> None:
        """The bug is fixed; whoever fixed it may run ``retry_spark_events`` right away."""
        self.step()
        SWITCHES.failing = False
        if then_retry:
            self.run_retry()

    @rule(ignore_schedule=st.booleans(), crash=CRASH)
    def retry(self, ignore_schedule: bool, crash: int | None) -> None:
        self.step()
        args = ["--all"] if ignore_schedule else []
        with dying_after(crash) as probe:
            self.run_retry("--stale-after", "0", *args)
        if probe.crashed:
            self.may_have_pending = True
        else:
            self.retried(ignore_schedule=ignore_schedule)

    def retried(self, *, ignore_schedule: bool) -> None:
        """A retry with ``--stale-after 0`` ran to the end."""
        # Every pending call ran: each is done or failed now.
        self.may_have_pending = False
        if ignore_schedule and not SWITCHES.failing:
            self.done |= {(SHORT_NAMES[handler], key) for key, handler in all_calls()}

    def run_retry(self, *args: str) -> None:
        """``retry_spark_events``; without ``--all``, check the schedule was kept."""
        failed = HandlerOutcome.objects.filter(status="failed")
        before = dict(failed.values_list("pk", "attempts"))
        quietly("retry_spark_events", *args)
        if "--all" in args:
            return
        after = dict(HandlerOutcome.objects.values_list("pk", "attempts"))
        # A call's first retry is due at once (it ran: attempts went up); later ones wait
        # for the backoff (not run: attempts unchanged).
        late = [pk for pk, attempts in before.items() if attempts == 1 == after[pk]]
        assert not late, f"first retries not run at once (outcome ids): {late}"
        early = [pk for pk, attempts in before.items() if 1 < attempts != after[pk]]
        assert not early, f"retries run before their backoff (outcome ids): {early}"

    @rule()
    def two_retry_workers(self) -> None:
        """Two retry processes at once: B reads its due list, A runs ``retry_spark_events
        --stale-after 0 --all``, then B runs its list, every call of which A took."""
        self.step()
        seen_by_b = list(due_outcomes(stale_after=0, ignore_schedule=True))
        self.run_retry("--stale-after", "0", "--all")
        self.retried(ignore_schedule=True)
        result = retry_outcomes(seen_by_b)
        assert result.skipped == len(seen_by_b), (result, seen_by_b)

    @rule()
    def recover(self) -> None:
        """Heal the handler, run the batch and the retry: every committed key is handled
        exactly once (semantics 3 and 4)."""
        self.step()
        self.check_recovery()

    def check_recovery(self) -> None:
        SWITCHES.failing = False
        quietly("process_spark_sources")
        # Another retry process reads its due list now and runs it last: by then the
        # retries below took every call in it.
        seen_by_other = list(due_outcomes(stale_after=0, ignore_schedule=True))
        self.run_retry("--stale-after", "0")  # first retries run at once
        self.run_retry("--stale-after", "0", "--all")  # the rest: the backoff is ignored
        result = retry_outcomes(seen_by_other)
        assert result.skipped == len(seen_by_other), (result, seen_by_other)
        self.must |= all_batch_keys(self.rows)
        self.may_have_pending = False

        records = set(EventRecord.objects.values_list("key", flat=True))
        assert self.must <= records, f"committed keys never claimed: {self.must - records}"
        calls = {(handler, key) for key in records for handler in handlers_of(key)}
        outcomes = Counter(
            (SHORT_NAMES[handler], key, status) for (key, handler), status in all_calls().items()
        )
        assert outcomes == Counter((handler, key, "done") for handler, key in calls)
        assert Counter(HandlerLog.objects.values_list("handler", "key")) == Counter(calls)
        self.done = calls

    def teardown(self) -> None:
        try:
            if self.clean:
                self.check_recovery()
        finally:
            if self.override is not None:
                self.override.disable()
            SWITCHES.reset()

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def semantics_hold(self) -> None:
        assert not SWITCHES.problems, SWITCHES.problems
        today = timezone.localdate()
        rows = {
            pk: Row(title, active, end < today)
            for pk, title, active, end in Challenge.objects.values_list(
                "pk", "title", "is_active", "end_date"
            )
        }
        assert rows == self.rows

        # 1. Once per key: no handler's effect is there twice for one key.
        log = Counter(HandlerLog.objects.values_list("handler", "key"))
        twice = {call: n for call, n in log.items() if n > 1}
        assert not twice, f"handled more than once: {twice}"
        # ... and its on_commit effect (the mail) ran once with it, never for a failed call.
        assert Counter(SWITCHES.sent) == log, (SWITCHES.sent, log)

        # 2. A rolled-back save leaves no claim, unless a later commit made the key.
        records = set(EventRecord.objects.values_list("key", flat=True))
        only_rolled_back = self.rolled_back - self.must - self.may
        assert not records & only_rolled_back, records & only_rolled_back
        assert records <= self.must | self.may, records - self.must - self.may

        # One outcome per matching handler, created with the claim.
        outcomes: dict[tuple[str, str], tuple[str, int, str]] = {}
        stored = HandlerOutcome.objects.values_list(
            "handler", "record__key", "status", "attempts", "last_error"
        )
        for handler, key, status, attempts, error in stored:
            assert (SHORT_NAMES[handler], key) not in outcomes, "two rows for one call"
            outcomes[SHORT_NAMES[handler], key] = (status, attempts, error)
        assert set(outcomes) == {(h, key) for key in records for h in handlers_of(key)}

        # 3. A call is done exactly when its write is there: a failed or dead call left
        # nothing, a done one left its one row.
        done = {call for call, (status, _, _) in outcomes.items() if status == "done"}
        assert set(log) == done, (set(log) - done, done - set(log))
        assert self.done <= done, f"should have been handled: {self.done - done}"
        for call, (status, attempts, error) in outcomes.items():
            if status == "pending":
                # Only a dead process leaves a call pending, and none of its attempts.
                assert self.may_have_pending, call
                assert attempts == 0, (call, attempts)
            elif status == "failed":
                assert call[0] == "flaky", call
                assert self.ever_failed, call
                assert attempts >= 1, (call, attempts)
                assert error.startswith("Boom: "), (call, error)
            else:
                assert status == "done", (call, status)
                assert attempts >= 1, (call, attempts)
        self.clean = True


@pytest.mark.django_db(transaction=True)
def test_saves_batches_crashes_failures_and_retries(isolated_registry: Registry) -> None:
    isolated_registry.clear()
    register()
    run_state_machine_as_test(
        EventSourcingMachine,
        settings=settings(max_examples=40, stateful_step_count=18, deadline=None),
    )
