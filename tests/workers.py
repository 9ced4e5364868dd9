"""Worker processes for the multi-process tests (crash, concurrency, graceful stop).

A test starts workers with :meth:`Workers.start`; each is a fresh Python process running
:func:`main`, which points Django at the test database and replaces the autodiscovered
sources and handlers with this module's: one source on ``testapp.Challenge`` (an event
``worker_<pk>`` per row, on save and in the batch) and up to two handlers that each write
one ``HandlerLog`` row (``handler="first"`` / ``"second"``; ``--handlers`` picks them).
Every process of a test registers the same functions, so the handler names stored in
``HandlerOutcome`` resolve everywhere.

Workers are steered with files in a directory shared with the test, never with sleeps:

* ``--pause-at KIND:N`` (repeatable): at the N-th call of a checkpoint (``handler``: each
  handler call, after its write; ``committed``: each handler call, right after the
  transaction it ran in committed; ``claimed``: each statement claiming keys, right after
  it; ``taken``: each statement marking calls done before they run, right after it;
  ``source``: each row; ``saved``: after a save, inside its transaction; ``start``: before
  the action) the worker creates ``paused-<i>`` (i counts the pauses, from 1) and waits for
  ``resume-<i>``. A test that never creates it kills the worker there.
* Outputs are written to files, not pipes, so a worker that prints a lot never blocks.

``--background`` registers the handlers with ``background=True`` and puts the challenge
itself in the context (the handlers log its title, as the worker read it); ``--tasks
database`` points Django's tasks framework at django-tasks-db, so ``command db_worker``
runs a real database worker. ``--django-settings JSON`` replaces Django settings
(``TASKS``, ``INSTALLED_APPS``, ...) before Django is set up: an RQ worker, or a project
without some app. Every ``HandlerLog`` row records the process that wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spark_decl import Event
    from tests.testapp.models import Challenge

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = ("first", "second")
GROUP = "worker"
# The longest anything here waits for another process: generous, the machine is shared.
TIMEOUT = 300.0


# -- inside the worker ---------------------------------------------------------------------


@dataclass
class Plan:
    """Where this worker pauses; set by :func:`main`."""

    sync: Path | None = None
    with_instance: bool = False
    handler_seconds: float = 0.0
    pauses: list[tuple[str, int]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    paused: int = 0


PLAN = Plan()


def checkpoint(kind: str) -> None:
    """Count a call of ``kind``; pause if the plan says so."""
    PLAN.counts[kind] += 1
    if (kind, PLAN.counts[kind]) in PLAN.pauses:
        assert PLAN.sync is not None
        PLAN.paused += 1
        (PLAN.sync / f"paused-{PLAN.paused}").touch()
        wait_for(PLAN.sync / f"resume-{PLAN.paused}")


def wait_for(path: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            # Never linger: a test that forgot a worker must not leave it running.
            raise SystemExit(f"worker {os.getpid()}: gave up waiting for {path}")
        time.sleep(0.005)


def worker_events(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
    from spark_decl import event

    checkpoint("source")
    context: dict[str, Any] = {"n": challenge.pk}
    if PLAN.with_instance:
        context["challenge"] = challenge
    yield event(GROUP, challenge.pk, context)


def first(event: Event[dict[str, Any]]) -> None:
    log("first", event)


def second(event: Event[dict[str, Any]]) -> None:
    log("second", event)


def log(handler: str, event: Event[dict[str, Any]]) -> None:
    from django.db import transaction

    from tests.testapp.models import HandlerLog

    challenge = event["context"].get("challenge")
    if PLAN.handler_seconds:
        time.sleep(PLAN.handler_seconds)  # a handler that waits for a server (mail)
    HandlerLog.objects.create(
        handler=handler,
        key=event["key"],
        pid=os.getpid(),
        detail=challenge.title if challenge is not None else "",
    )
    # After the write: a worker killed here dies with an uncommitted handler effect.
    checkpoint("handler")
    # Right after the call's transaction commits, before spark_decl goes on.
    transaction.on_commit(lambda: checkpoint("committed"))


def watch_statements(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    """Checkpoints right after spark_decl's own statements, inside their transaction."""
    result = execute(sql, params, many, context)
    if sql.startswith('INSERT INTO "spark_decl_eventrecord"'):
        checkpoint("claimed")
    elif sql.startswith('UPDATE "spark_decl_handleroutcome"') and "RETURNING" in sql:
        checkpoint("taken")
    return result


def setup(
    database: str,
    database_options: dict[str, Any],
    spark_settings: dict[str, Any],
    handlers: Sequence[str],
    *,
    background: bool = False,
    tasks: str = "immediate",
    django_settings: dict[str, Any] | None = None,
) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    if tasks == "database":
        os.environ["SPARK_DECL_TEST_TASKS"] = "database"
    from django.conf import settings

    # The test database, not the development one.
    settings.DATABASES["default"]["NAME"] = database
    settings.DATABASES["default"].setdefault("OPTIONS", {}).update(database_options)
    settings.SPARK_DECL = spark_settings
    for name, value in (django_settings or {}).items():
        setattr(settings, name, value)
    import django

    django.setup()
    from django.db import connections

    from spark_decl.registry import registry
    from tests.testapp.models import Challenge

    connections["default"].execute_wrappers.append(watch_statements)
    registry.clear()
    register(Challenge, handlers, background=background)


def register(model: type[Challenge], handlers: Sequence[str], *, background: bool) -> None:
    """This module's source and ``handlers``: what every process of a test registers."""
    from spark_decl.registry import registry

    PLAN.with_instance = background
    registry.add_source(model, worker_events)
    for name in handlers:
        registry.add_handler(
            f"^{GROUP}$", {"first": first, "second": second}[name], background=background
        )


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="tests.workers")
    parser.add_argument("--database", required=True)
    parser.add_argument("--database-options", type=json.loads, default={})
    parser.add_argument("--settings", type=json.loads, default={})
    parser.add_argument("--sync", type=Path)
    parser.add_argument("--handlers", default=",".join(HANDLERS))
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--handler-seconds", type=float, default=0.0)
    parser.add_argument("--tasks", choices=["immediate", "database"], default="immediate")
    parser.add_argument("--django-settings", type=json.loads, default={})
    parser.add_argument("--pause-at", action="append", default=[], metavar="KIND:N")
    parser.add_argument("--repeat-until", type=Path, metavar="FILE")
    parser.add_argument("action", choices=["command", "save", "create", "consume", "churn"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    PLAN.sync = options.sync
    PLAN.handler_seconds = options.handler_seconds
    PLAN.pauses = [(kind, int(n)) for kind, n in (p.split(":") for p in options.pause_at)]
    setup(
        options.database,
        options.database_options,
        options.settings,
        options.handlers.split(","),
        background=options.background,
        tasks=options.tasks,
        django_settings=options.django_settings,
    )
    checkpoint("start")
    while True:
        act(options.action, options.args)
        if options.repeat_until is None or options.repeat_until.exists():
            break


def act(action: str, args: list[str]) -> None:
    from django.core.management import call_command
    from django.db import transaction

    from tests.testapp.models import Challenge

    if action == "command":
        call_command(*args)
    elif action == "save":
        # "save PK": fetched before the transaction; "save PK inside": fetched inside it.
        pk, inside = int(args[0]), args[1:] == ["inside"]
        challenge = None if inside else Challenge.objects.get(pk=pk)
        with transaction.atomic():
            if challenge is None:
                challenge = Challenge.objects.get(pk=pk)
            challenge.save()
            checkpoint("saved")
    elif action == "create":
        with transaction.atomic():
            for n in range(int(args[0])):
                Challenge.objects.create(title=f"created {n}")
    elif action == "churn":
        # "churn N": N new rows (bulk_create: no event yet; batch workers may claim them
        # from now on), one saved in autocommit mode, then all saved in one transaction in
        # random order, whose claim after the commit lists their keys in that order. Only
        # this worker saves these rows, so its own locks never conflict with another's.
        rows = Challenge.objects.bulk_create(
            Challenge(title=f"churn {os.getpid()}") for _ in range(int(args[0]))
        )
        rows[0].save()
        random.shuffle(rows)
        with transaction.atomic():
            for row in rows:
                row.save()
    elif action == "consume":
        consume(args[0])


def consume(function: str) -> None:
    """Every challenge's events through ``only_new_events`` (``function``: ``spark_decl``,
    ``api`` or ``aio``, the async twin), each handled by ``process_events`` as the consumer
    gets it: a consumer working on one event at a time."""
    from asgiref.sync import async_to_sync

    from spark_decl import aonly_new_events, api, aprocess_events, only_new_events, process_events
    from tests.testapp.models import Challenge

    events = [
        e for challenge in Challenge.objects.order_by("pk") for e in worker_events(challenge)
    ]
    if function == "aio":

        async def main() -> None:
            async for new in aonly_new_events(events):
                await aprocess_events([new])

        async_to_sync(main)()
        return
    for new in {"spark_decl": only_new_events, "api": api.only_new_events}[function](events):
        process_events([new])


# -- in the test -----------------------------------------------------------------------------


class Worker:
    """A running worker process (see :meth:`Workers.start`)."""

    def __init__(self, args: list[str], sync: Path, name: str) -> None:
        self.sync = sync
        self.stdout_path = sync / f"{name}.out"
        self.stderr_path = sync / f"{name}.err"
        code = "import sys; from tests.workers import main; main(sys.argv[1:])"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, *args],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=err,
                text=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_paused(self, index: int = 1) -> None:
        """Wait until the worker reached its ``index``-th pause."""
        marker = self.sync / f"paused-{index}"
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            returncode = self.process.poll()
            assert returncode is None, (
                f"worker ended ({returncode}) before pause {index}:\n{self.stderr}"
            )
            assert time.monotonic() < deadline, f"worker never reached pause {index}"
            time.sleep(0.005)

    def resume(self, index: int = 1) -> None:
        (self.sync / f"resume-{index}").touch()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """``kill -9``, and wait until the process is gone."""
        self.process.kill()
        assert self.process.wait(timeout=TIMEOUT) == -9

    def finish(self) -> int:
        return self.process.wait(timeout=TIMEOUT)

    def succeed(self) -> str:
        """Wait for a clean exit; return stdout."""
        returncode = self.finish()
        assert returncode == 0, f"exit status {returncode}:\n{self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr
        return self.stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)


class Workers:
    """Starts workers against the test database (create it once the database is set up);
    :meth:`stop_all` kills the ones still running. Every worker replaces the Django
    settings in ``django_settings`` (``--django-settings``)."""

    def __init__(
        self,
        sync: Path,
        handlers: Sequence[str] = HANDLERS,
        *,
        background: bool = False,
        tasks: str = "immediate",
        django_settings: dict[str, Any] | None = None,
    ) -> None:
        from django.db import connection

        if connection.vendor == "sqlite":
            # Never the in-memory database: other processes could not see it.
            assert Path(connection.settings_dict["NAME"]).is_file()
        self.database = str(connection.settings_dict["NAME"])
        self.sync = sync
        self.handlers = handlers
        self.background = background
        self.tasks = tasks
        self.django_settings = django_settings or {}
        self.started: list[Worker] = []

    def start(
        self,
        action: str,
        *args: str,
        settings: dict[str, Any] | None = None,
        pause_at: Sequence[str] = (),
        repeat_until: Path | None = None,
        database_options: dict[str, Any] | None = None,
        handler_seconds: float = 0.0,
    ) -> Worker:
        """Start a worker that runs ``action`` (``command NAME ARGS...``,
        ``save PK [inside]``, ``create N``, ``consume FUNCTION``, ``churn N``) in its own
        sync directory.
        ``database_options`` are added to the database's ``OPTIONS``."""
        name = f"worker-{len(self.started)}"
        sync = self.sync / name
        sync.mkdir()
        argv = ["--database", self.database, "--sync", str(sync)]
        argv += ["--handlers", ",".join(self.handlers), "--tasks", self.tasks]
        if self.background:
            argv.append("--background")
        argv += ["--settings", json.dumps(settings or {})]
        argv += ["--database-options", json.dumps(database_options or {})]
        argv += ["--django-settings", json.dumps(self.django_settings)]
        for point in pause_at:
            argv += ["--pause-at", point]
        if repeat_until is not None:
            argv += ["--repeat-until", str(repeat_until)]
        if handler_seconds:
            argv += ["--handler-seconds", str(handler_seconds)]
        worker = Worker([*argv, action, *args], sync, name)
        self.started.append(worker)
        return worker

    def run(self, action: str, *args: str, settings: dict[str, Any] | None = None) -> str:
        """Run a worker to completion; return its stdout."""
        return self.start(action, *args, settings=settings).succeed()

    def batch(self, *options: str, settings: dict[str, Any] | None = None) -> str:
        return self.run("command", "process_spark_sources", *options, settings=settings)

    def retry(self, settings: dict[str, Any] | None = None) -> str:
        return self.run("command", "retry_spark_events", "--stale-after", "0", settings=settings)

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


# -- checks, in the test ------------------------------------------------------------------------


def key(pk: int) -> str:
    return f"{GROUP}_{pk}"


def effects() -> Counter[tuple[str, str]]:
    """How many times each (handler, key) wrote its HandlerLog row."""
    from tests.testapp.models import HandlerLog

    return Counter(HandlerLog.objects.filter(handler__in=HANDLERS).values_list("handler", "key"))


def outcomes() -> dict[tuple[str, str], str]:
    """Status of each (handler, key) call, the handler named as in :data:`HANDLERS`."""
    from tests.conftest import all_calls

    return {
        (handler.rsplit(".", 1)[1], key): status for (key, handler), status in all_calls().items()
    }


def assert_consistent(handlers: Sequence[str] = HANDLERS) -> dict[tuple[str, str], str]:
    """What holds at every moment, even right after a kill -9: a call's database effect
    is committed if and only if its outcome is ``done``, and never twice. Every claimed
    event owes a call to each handler. Returns the outcomes."""
    from spark_decl.models import EventRecord

    calls = outcomes()
    written = effects()
    assert max(written.values(), default=1) == 1, "a handler took effect twice"
    assert set(written) == {call for call, status in calls.items() if status == "done"}
    claimed = set(EventRecord.objects.values_list("key", flat=True))
    assert {call[1] for call in calls} == claimed
    assert len(calls) == len(handlers) * len(claimed)
    return calls


def assert_all_handled_once(pks: Sequence[int], handlers: Sequence[str] = HANDLERS) -> None:
    """Every key claimed, every call done, every handler's effect present exactly once."""
    from spark_decl.models import EventRecord

    keys = {key(pk) for pk in pks}
    assert set(EventRecord.objects.values_list("key", flat=True)) == keys
    calls = assert_consistent(handlers)
    assert Counter(calls.values()) == {"done": len(handlers) * len(keys)}
    assert effects() == {(handler, k): 1 for handler in handlers for k in keys}
