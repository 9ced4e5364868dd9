"""Background work on backends that talk to a broker: RQ through django-tasks-rq (the real
client against a real ``redis-server``, a port nothing listens on, and a socket that never
answers), and ``SocketBroker`` below, a backend whose ``enqueue`` waits for a TCP answer as
RQ's and Celery's clients do, for the Python/Django versions django-tasks-rq does not
serve.

The ``redis-server`` these tests start is a throwaway one, on a free port, stopped by pid.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.http import HttpRequest, HttpResponse
from django.test import Client, override_settings
from django.urls import path

from spark_decl import Event, handles
from spark_decl._tasks import BaseTaskBackend, DummyBackend, TaskResult
from spark_decl.conf import get_settings
from spark_decl.enqueue import get_task
from spark_decl.models import HandlerOutcome
from spark_decl.registry import Registry
from tests import workers
from tests.testapp.models import Challenge, HandlerLog
from tests.workers import Workers, assert_all_handled_once, key

NOTIFY = "tests.test_background_brokers.notify"
RQ_BACKEND = "django_tasks_rq.backend.RQBackend"
RQ_MISSING = (
    "django-tasks-rq is not installed: its only release (0.12) is built on the django-tasks "
    "backport, so the dev extra installs it on Python < 3.12 (Django 5.2) only"
)
# Generous: a shared machine. A request must come back within this many times the bound.
SLACK = 5
TIMEOUT = 1.0


def notify(event: Event[Any]) -> None:
    HandlerLog.objects.create(handler="notify", key=event["key"])


def create_challenge(request: HttpRequest) -> HttpResponse:
    challenge = Challenge.objects.create(title=request.POST["title"])
    return HttpResponse(str(challenge.pk), status=201)


urlpatterns = [path("challenges/", create_challenge)]


# -- brokers -----------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on (the kernel's pick, released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) and never answers.

    After a minute it hangs up on them, so that code without a bound fails the test
    instead of hanging it."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    hang_up = threading.Timer(60, listener.close)
    hang_up.start()
    try:
        yield listener.getsockname()[1]
    finally:
        hang_up.cancel()
        # Resets the connections still waiting: the threads stuck on them end.
        listener.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[int]:
    """A throwaway ``redis-server`` on a free port; its port. Stopped by its pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary (Debian: apt-get install redis-server)")
    port = free_port()
    log = tmp_path / "redis.log"
    with log.open("w") as out:
        # Nothing persisted: --save "" and no append-only file.
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [binary, "--port", str(port), *options, "--dir", str(tmp_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + workers.TIMEOUT
        while not answers_ping(port):
            assert process.poll() is None, f"redis-server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"redis-server never answered:\n{log.read_text()}"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# -- backends -------------------------------------------------------------------------------


TAKEN: list[TaskResult[Any]] = []


class SocketBroker(BaseTaskBackend):
    """Enqueues by asking a broker at ``OPTIONS["PORT"]`` over TCP and waiting for its
    ``OK``, with no timeout of its own (RQ's client waits the same way by default). The
    tasks the broker took are kept in :data:`TAKEN`, for a test to run as a worker would.
    """

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        self.validate_task(task)
        with socket.create_connection(("127.0.0.1", self.options["PORT"])) as conn:
            conn.sendall(b"ENQUEUE\n")
            if conn.recv(16) != b"OK\n":
                raise ConnectionError("the broker hung up")
        result = DummyBackend(self.alias, {}).enqueue(task, args, kwargs)
        TAKEN.append(result)
        return result


@dataclass
class Broker:
    """A backend that talks to a broker, as Django settings for a broker's port."""

    backend: str
    settings: Callable[[int], dict[str, Any]]


def rq_settings(port: int) -> dict[str, Any]:
    return {
        "TASKS": {"default": {"BACKEND": "django_tasks_rq.RQBackend"}},
        "RQ_QUEUES": {"default": {"URL": f"redis://127.0.0.1:{port}/0"}},
    }


def socket_settings(port: int) -> dict[str, Any]:
    backend = "tests.test_background_brokers.SocketBroker"
    return {"TASKS": {"default": {"BACKEND": backend, "OPTIONS": {"PORT": port}}}}


@pytest.fixture(params=["rq", "socket"])
def broker(request: pytest.FixtureRequest) -> Broker:
    if request.param == "rq":
        pytest.importorskip("django_tasks_rq", reason=RQ_MISSING)
        return Broker(RQ_BACKEND, rq_settings)
    TAKEN.clear()
    return Broker("tests.test_background_brokers.SocketBroker", socket_settings)


@pytest.fixture
def notifying(isolated_registry: Registry) -> Iterator[Registry]:
    """``notify`` as a background handler of new challenges, the bound at ``TIMEOUT``."""
    handles(r"^challenge_created$", background=True)(notify)
    with override_settings(SPARK_DECL={"ENQUEUE_TIMEOUT": TIMEOUT}):
        yield isolated_registry


def notified() -> list[str]:
    return list(HandlerLog.objects.filter(handler="notify").values_list("key", flat=True))


def status(key: str) -> str:
    return HandlerOutcome.objects.get(record__key=key, handler=NOTIFY).status


# -- the setting -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, True, "5", None])
def test_enqueue_timeout_must_be_a_positive_number_of_seconds(value: object) -> None:
    with (
        override_settings(SPARK_DECL={"ENQUEUE_TIMEOUT": value}),
        pytest.raises(ImproperlyConfigured, match=r"'ENQUEUE_TIMEOUT'\] must be a number of"),
    ):
        get_settings()


def test_enqueue_timeout_takes_seconds() -> None:
    assert get_settings().ENQUEUE_TIMEOUT == 5.0
    for seconds in (0.25, 30):
        with override_settings(SPARK_DECL={"ENQUEUE_TIMEOUT": seconds}):
            assert seconds == get_settings().ENQUEUE_TIMEOUT


# -- a broker that refuses connections -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("notifying")
def test_a_save_whose_call_a_refusing_broker_cannot_take_leaves_it_pending(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        override_settings(**broker.settings(free_port())),
        caplog.at_level(logging.ERROR, "spark_decl"),
    ):
        challenge = Challenge.objects.create(title="Refused")
    key = f"challenge_created_{challenge.pk}"
    [record] = [r for r in caplog.records if r.name == "spark_decl"]
    assert record.getMessage() == (
        f"Could not enqueue {NOTIFY} for event {key!r} on the task backend 'default' "
        f"({broker.backend}); the call stays pending and retry_spark_events --stale-after "
        "runs it."
    )
    assert "Connection refused" in caplog.text
    assert status(key) == "pending"
    assert notified() == []
    call_command("retry_spark_events", "--stale-after", "0", verbosity=0)
    assert status(key) == "done"
    assert notified() == [key]


@pytest.mark.django_db(transaction=True)
def test_enqueue_to_a_refusing_broker_is_a_command_error_naming_the_backend(
    broker: Broker,
) -> None:
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(3))
    with (
        override_settings(**broker.settings(free_port())),
        pytest.raises(CommandError) as raised,
    ):
        call_command("process_spark_sources", "--enqueue", verbosity=0)
    message = str(raised.value)
    assert message.startswith(f"The task backend 'default' ({broker.backend}) could not enqueue: ")
    assert "Connection refused" in message
    assert "run the command again once the backend works" in message


# -- a broker that never answers ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("notifying")
@override_settings(ROOT_URLCONF=__name__)
def test_a_save_in_a_view_waits_for_a_silent_broker_at_most_the_bound(
    broker: Broker, silent_broker: int, caplog: pytest.LogCaptureFixture
) -> None:
    with override_settings(**broker.settings(silent_broker)):
        started = time.monotonic()
        response = Client().post("/challenges/", {"title": "Silence"})
        waited = time.monotonic() - started
    assert response.status_code == 201
    assert waited < SLACK * TIMEOUT
    key = f"challenge_created_{int(response.content)}"
    assert status(key) == "pending"
    assert f"did not enqueue within {TIMEOUT:g} s (SPARK_DECL['ENQUEUE_TIMEOUT'])" in caplog.text
    assert f"on the task backend 'default' ({broker.backend})" in caplog.text
    call_command("retry_spark_events", "--stale-after", "0", verbosity=0)
    assert status(key) == "done"
    assert notified() == [key]


@pytest.mark.django_db(transaction=True)
@override_settings(SPARK_DECL={"ENQUEUE_TIMEOUT": TIMEOUT})
def test_enqueue_to_a_silent_broker_is_a_command_error_within_the_bound(
    broker: Broker, silent_broker: int
) -> None:
    Challenge.objects.bulk_create(Challenge(title=f"c{n}") for n in range(3))
    started = time.monotonic()
    with (
        override_settings(**broker.settings(silent_broker)),
        pytest.raises(CommandError) as raised,
    ):
        call_command("process_spark_sources", "--enqueue", verbosity=0)
    assert time.monotonic() - started < SLACK * TIMEOUT
    assert str(raised.value).startswith(
        f"The task backend 'default' ({broker.backend}) did not enqueue within 1 s "
        "(SPARK_DECL['ENQUEUE_TIMEOUT']): its broker does not answer."
    )


@pytest.fixture
def late_broker() -> Iterator[tuple[int, threading.Event]]:
    """A broker that takes one connection and answers only once the event is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(16)
            # Bounded, like silent_broker: code without a bound fails the test, not hangs it.
            answer.wait(60)
            conn.sendall(b"OK\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1], answer
    finally:
        answer.set()
        listener.close()
        server.join(workers.TIMEOUT)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("notifying")
def test_a_task_a_late_broker_takes_after_the_retry_does_not_run_the_call_again(
    late_broker: tuple[int, threading.Event],
) -> None:
    port, answer = late_broker
    TAKEN.clear()
    with override_settings(**socket_settings(port)):
        started = time.monotonic()
        challenge = Challenge.objects.create(title="Late")
        assert time.monotonic() - started < SLACK * TIMEOUT
        key = f"challenge_created_{challenge.pk}"
        assert status(key) == "pending"
        assert TAKEN == []
        call_command("retry_spark_events", "--stale-after", "0", verbosity=0)
        assert notified() == [key]
        # The enqueue the save gave up on goes on in its thread, and gets through.
        answer.set()
        deadline = time.monotonic() + workers.TIMEOUT
        while not TAKEN:
            assert time.monotonic() < deadline, "the broker's answer never got through"
            time.sleep(0.01)
    [task] = TAKEN
    assert task.kwargs == {"handler": NOTIFY, "key": key}
    assert task.task.call(**task.kwargs) == "skipped"
    assert notified() == [key]


# -- a real RQ worker ---------------------------------------------------------------------------


@pytest.fixture
def rq_pool(
    tmp_path: Path, transactional_db: None, isolated_registry: Registry, redis_server: int
) -> Iterator[tuple[Workers, dict[str, Any]]]:
    """tests/workers.py's handlers as background handlers, here and in worker processes
    configured for RQ on ``redis_server`` (with django_rq, without django_tasks_db)."""
    pytest.importorskip("django_tasks_rq", reason=RQ_MISSING)
    rq = rq_settings(redis_server)
    apps = [app for app in settings.INSTALLED_APPS if app != "django_tasks_db"]
    isolated_registry.clear()
    workers.register(Challenge, workers.HANDLERS, background=True)
    pool = Workers(
        tmp_path, background=True, django_settings={**rq, "INSTALLED_APPS": [*apps, "django_rq"]}
    )
    try:
        yield pool, rq
    finally:
        pool.stop_all()
        workers.PLAN.with_instance = False


RQ_WORKER = ("command", "rqworker", "--burst", "--job-class", "django_tasks_rq.Job", "default")


def test_a_real_rq_worker_runs_each_background_call_of_a_save_once(
    rq_pool: tuple[Workers, dict[str, Any]],
) -> None:
    pool, rq = rq_pool
    with override_settings(**rq):
        saved = [Challenge.objects.create(title=f"saved {n}") for n in range(3)]
    pks = [challenge.pk for challenge in saved]
    # Enqueued in Redis; nothing ran in this process.
    assert set(HandlerOutcome.objects.values_list("status", flat=True)) == {"pending"}
    assert not HandlerLog.objects.exists()
    for pk in pks:
        Challenge.objects.filter(pk=pk).update(title=f"fresh {pk}")

    pool.start(*RQ_WORKER).succeed()

    assert_all_handled_once(pks)
    logs = HandlerLog.objects.all()
    assert os.getpid() not in {log.pid for log in logs}
    assert {(log.key, log.detail) for log in logs} == {(key(pk), f"fresh {pk}") for pk in pks}

    # The same tasks delivered again: the calls are done, nothing runs twice.
    with override_settings(**rq):
        task = get_task("run_background_handler")
        results = [
            task.enqueue(handler=f"tests.workers.{handler}", key=key(pk))
            for pk in pks
            for handler in workers.HANDLERS
        ]
        pool.start(*RQ_WORKER).succeed()
        assert {task.get_result(result.id).return_value for result in results} == {"skipped"}
    assert_all_handled_once(pks)
