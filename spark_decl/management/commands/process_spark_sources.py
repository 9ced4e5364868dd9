"""``manage.py process_spark_sources``: every instance through every source (cron)."""

from __future__ import annotations

import gc
import signal
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from spark_decl.conf import get_settings
from spark_decl.exceptions import BackgroundUnavailable, EnqueueFailed
from spark_decl.registry import registry
from spark_decl.sources import SkippedInstances, enqueue_chunks, process_model
from spark_decl.types import BatchResult, Mode

if TYPE_CHECKING:
    from django.db.models import Model


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = (
        "Send every instance of every model with event sources through its sources, "
        "claim the events never seen before and run their handlers. SIGTERM or SIGINT "
        "stops it after the chunk in progress (exit status 0); a second one stops it at "
        "once, rolling back the handler calls in progress."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            metavar="app_label.Model",
            help="Only process this model (repeatable).",
        )
        parser.add_argument(
            "--chunk-size",
            type=positive_int,
            default=None,
            metavar="N",
            help="Rows read and events claimed at a time (default: SPARK_DECL['CHUNK_SIZE']).",
        )
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--dry-run",
            action="store_true",
            help="Report what would be produced and how many events are new; claim nothing, "
            "run nothing. (A key that rows in different chunks produce is counted once per "
            "chunk: memory stays bounded.)",
        )
        mode.add_argument(
            "--mark-only",
            action="store_true",
            help="Claim the new events without running any handler: switch spark_decl on "
            "over existing data without mailing everyone about the past.",
        )
        parser.add_argument(
            "--enqueue",
            action="store_true",
            help="Do not process the rows here: split each model's rows into chunks of "
            "--chunk-size primary keys and enqueue one task per chunk on Django's tasks "
            "framework (SPARK_DECL['TASK_BACKEND']), for any number of workers to process. "
            "Combines with --mark-only, not with --dry-run.",
        )
        parser.add_argument(
            "--quiet", action="store_true", help="Print nothing unless something failed."
        )

    def handle(
        self,
        *args: Any,
        models: list[str] | None,
        chunk_size: int | None,
        dry_run: bool,
        mark_only: bool,
        enqueue: bool,
        quiet: bool,
        verbosity: int,
        **options: Any,
    ) -> None:
        selected = self.select(models)
        mode = Mode.DRY_RUN if dry_run else Mode.MARK_ONLY if mark_only else Mode.HANDLE
        if enqueue:
            if dry_run:
                raise CommandError("--enqueue cannot be combined with --dry-run.")
            self.enqueue(selected, chunk_size=chunk_size, mode=mode, quiet=quiet)
            return
        skipped = SkippedInstances()
        progress = Progress(self.stderr) if not quiet and self.stderr.isatty() else None
        started = time.monotonic()
        total = BatchResult()
        with GracefulStop() as stop, frozen_for_the_run():
            for model in selected:
                if stop.requested():
                    break
                if progress is not None:
                    progress.start(model)
                result = process_model(
                    model,
                    chunk_size=chunk_size,
                    mode=mode,
                    on_source_error=skipped,
                    on_chunk=progress.update if progress is not None else None,
                    should_stop=stop.requested,
                )
                if progress is not None:
                    progress.finish()
                total += result
                if verbosity >= 2 and not quiet:
                    self.stdout.write(f"{model._meta.label}: {describe(result, mode)}")
        elapsed = time.monotonic() - started
        if not quiet:
            self.stdout.write(f"{describe(total, mode)} in {elapsed:.2f}s")
            if stop.signal is not None:
                self.stdout.write(
                    f"Interrupted by {stop.signal.name}: stopped after the chunk in progress; "
                    "run the command again to process the rest."
                )
        if skipped.messages:
            raise CommandError(skipped.summary())
        if total.dispatch.failed and quiet:
            self.stderr.write(f"{total.dispatch.failed} handler call(s) failed.")

    def enqueue(
        self, models: list[type[Model]], *, chunk_size: int | None, mode: Mode, quiet: bool
    ) -> None:
        size = chunk_size or get_settings().CHUNK_SIZE
        total = 0
        try:
            for model in models:
                count = enqueue_chunks(model, chunk_size=size, mode=mode.value)
                total += count
                if not quiet:
                    self.stdout.write(
                        f"{model._meta.label}: {count} chunk task(s) of up to {size} rows"
                    )
        except BackgroundUnavailable as exc:
            raise CommandError(str(exc)) from exc
        except EnqueueFailed as exc:
            raise CommandError(
                f"{exc} The chunk tasks enqueued before are processed as usual; run the "
                "command again once the backend works (no key is handled twice)."
            ) from exc
        if not quiet:
            config = get_settings()
            self.stdout.write(
                f"Enqueued {total} chunk task(s) on task backend {config.TASK_BACKEND!r}, "
                f"queue {config.TASK_QUEUE!r}"
                + (" (claim only, no handlers)" if mode is Mode.MARK_ONLY else "")
                + ". Workers process them; outcomes are in the admin and spark_inspect."
            )

    def select(self, labels: list[str] | None) -> list[type[Model]]:
        registered = registry.models()
        if not labels:
            return registered
        selected = []
        for label in labels:
            try:
                model = apps.get_model(label)
            except (LookupError, ValueError) as exc:
                raise CommandError(f"Unknown model {label!r}: {exc}") from exc
            if model not in registered:
                known = ", ".join(m._meta.label for m in registered) or "none"
                raise CommandError(
                    f"{model._meta.label} has no event sources (models with sources: {known})."
                )
            selected.append(model)
        return selected


SignalHandler = Callable[[int, FrameType | None], Any] | int | None


@contextmanager
def frozen_for_the_run() -> Generator[None, None, None]:
    """``gc.freeze()`` while the batch runs: the objects alive at its start (Django's app
    registry, models, modules, the registry) outlive it, so the collector's full passes
    need not scan them again and again while each chunk's rows, events and calls come and
    go. They are unfrozen (back in the oldest generation) at the end. A re-run spends a
    fifth less time this way. A process that froze objects itself (a pre-fork server, say)
    or turned the collector off is left as it is."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class GracefulStop:
    """While active, the first SIGTERM or SIGINT asks the batch to stop after the chunk in
    progress (whose handlers then run and record their outcomes) instead of killing it.

    A second signal raises ``SystemExit(128 + signal)`` wherever the process is: the
    transaction in progress rolls back and its calls stay pending for
    ``retry_spark_events``, as after a crash. The previous handlers are restored on exit.
    Python runs signal handlers in the main thread only, so elsewhere (``call_command``
    from a thread) nothing is installed and signals keep their usual effect.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, SignalHandler] = {}

    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            # None: the handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise SystemExit(128 + signum)
        self.signal = signal.Signals(signum)


def describe(result: BatchResult, mode: Mode) -> str:
    text = f"{result.rows} rows, {result.events} events, {result.new} new"
    if mode is Mode.DRY_RUN:
        return f"{text} (dry run: nothing claimed, nothing run)"
    if mode is Mode.MARK_ONLY:
        return f"{text} (claimed without running handlers)"
    text = f"{text}, {result.dispatch.calls} handled, {result.dispatch.failed} failed"
    if result.dispatch.enqueued:
        text += f", {result.dispatch.enqueued} enqueued"
    return text


class Progress:
    """One status line per model, redrawn in place on a terminal."""

    def __init__(self, stream: OutputWrapper) -> None:
        self.stream = stream
        self.label = ""
        self.total = 0
        self.started = 0.0

    def start(self, model: type[Model]) -> None:
        self.label = model._meta.label
        # Only the default manager's count: a queryset= restriction may scan fewer rows.
        self.total = model._default_manager.count()
        self.started = time.monotonic()
        self.update(BatchResult())

    def update(self, result: BatchResult) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = result.rows / elapsed
        remaining = max(self.total - result.rows, 0)
        eta = f"{remaining / rate:.0f}s" if rate and remaining else "-"
        share = result.rows / self.total if self.total else 1.0
        bar = "#" * int(share * 20)
        self.stream.write(
            f"\r{self.label} [{bar:<20}] {result.rows}/{self.total} rows, "
            f"{result.events} events, {result.new} new, {result.dispatch.calls} handled, "
            f"{result.dispatch.failed} failed, {rate:.0f} rows/s, ETA {eta}\033[K",
            style_func=plain,
            ending="",
        )
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("", style_func=plain)
        self.stream.flush()


def plain(text: str) -> str:
    # manage.py styles a terminal's stderr as errors; progress is not an error.
    return text
