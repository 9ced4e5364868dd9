"""How spark_decl is doing: the numbers behind the admin's dashboard and ``spark_inspect
--health``.

:func:`health` answers "is everything healthy, and if not, what and since when" for one
time window (:data:`WINDOWS`): per event group, the events claimed over time; per handler,
its calls over time by their state now, the failure rate of the last hour, and the calls
still open (pending, failed and waiting for a retry, given up) with the oldest of each.

Every query is an aggregate whose cost does not grow with the table: the rows of a window
are found by id, not by ``created_at`` (which has no index, see
:class:`~spark_decl.models.EventRecord`). Ids ascend with the time a row was written, so a
binary search over the primary key (:func:`first_id_since`, a few dozen one-row index
lookups) finds where a window starts, and the aggregate reads only that window's rows.
The open calls are read from ``spark_decl_due_idx`` alone, which holds every call that is
not done with its handler and creation time: that query grows with the open calls, not the
table. ``benchmarks/README.md`` ("health() on ten million calls") has the measured plans.

The one assumption: ids ascend with ``created_at``, as they do for every row spark_decl
writes. A row written by hand with an older ``created_at`` than rows before it (a fixture,
a copy between databases) is counted in the wrong bucket; one with the highest id and an
old time hides the window's rows from the search.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Count, Max, Min
from django.db.models.functions import TruncHour
from django.utils import timezone

from .outcomes import DONE, FAILED, GIVEN_UP, PENDING, STATUSES
from .registry import registry

if TYPE_CHECKING:
    from django.db.models import Model, QuerySet

M = TypeVar("M", bound="Model")

#: The version of :meth:`Health.as_dict`'s document.
JSON_VERSION = 1
#: The failure rate is that of the calls claimed in this last stretch of time.
RECENT = timedelta(hours=1)
#: A pending call older than this is a problem: its worker, or the process that claimed
#: it, is not keeping up (a call normally leaves ``pending`` within seconds).
PENDING_TOO_LONG = timedelta(minutes=15)
#: An outbox row older than this was left by a crash (rows normally live until their
#: transaction commits); ``retry_spark_events`` claims it.
OUTBOX_TOO_LONG = timedelta(minutes=5)


@dataclass(frozen=True)
class Window:
    """A stretch of time ending now, cut into buckets of ``bucket``."""

    name: str
    span: timedelta
    bucket: timedelta

    @property
    def buckets(self) -> int:
        return self.span // self.bucket

    def starts(self, now: datetime) -> list[datetime]:
        """The buckets' starts, oldest first; the last bucket holds ``now``.

        Buckets are aligned to whole multiples of their length (UTC), so that a bucket
        means the same hours on every page load."""
        step = self.bucket.total_seconds()
        last = datetime.fromtimestamp(now.timestamp() // step * step, tz=UTC)
        return [last - self.bucket * back for back in range(self.buckets - 1, -1, -1)]


WINDOWS: dict[str, Window] = {
    "24h": Window("24h", timedelta(hours=24), timedelta(hours=1)),
    "7d": Window("7d", timedelta(days=7), timedelta(hours=6)),
}


@dataclass
class Counts:
    """Calls by state."""

    pending: int = 0
    done: int = 0
    failed: int = 0
    given_up: int = 0

    def add(self, status: str, calls: int) -> None:
        if status in STATUSES:
            setattr(self, status, getattr(self, status) + calls)

    @property
    def total(self) -> int:
        return self.pending + self.done + self.failed + self.given_up

    @property
    def ran(self) -> int:
        """The calls that ran (pending ones have not)."""
        return self.done + self.failed + self.given_up

    @property
    def failing(self) -> int:
        """The calls whose latest attempt failed: failed or given up."""
        return self.failed + self.given_up

    @property
    def failure_rate(self) -> float | None:
        """The share of the calls that ran whose latest attempt failed (``None`` when
        none ran): a failed call that a retry completed counts as done."""
        return self.failing / self.ran if self.ran else None

    def as_dict(self) -> dict[str, int]:
        return {status: getattr(self, status) for status in STATUSES}

    @classmethod
    def sum(cls, many: Iterable[Counts]) -> Counts:
        total = cls()
        for counts in many:
            for status, calls in counts.as_dict().items():
                total.add(status, calls)
        return total


@dataclass
class Open:
    """The calls of one handler that are not done, whenever their event was claimed."""

    pending: int = 0
    failed: int = 0
    given_up: int = 0
    oldest_pending: datetime | None = None
    oldest_failed: datetime | None = None


@dataclass
class HandlerHealth:
    name: str
    registered: bool
    #: The calls of the events claimed in the window, by their state now.
    window: Counts = field(default_factory=Counts)
    #: The same per bucket, oldest first (see :attr:`Health.starts`).
    timeline: list[Counts] = field(default_factory=list)
    #: The calls of the events claimed in the last :data:`RECENT`.
    recent: Counts = field(default_factory=Counts)
    open: Open = field(default_factory=Open)
    #: When the earliest and the latest call claimed in the window whose latest attempt
    #: failed were claimed: "failing since".
    first_failure: datetime | None = None
    last_failure: datetime | None = None


@dataclass
class GroupHealth:
    name: str
    #: The events claimed in the window, and per bucket.
    events: int = 0
    timeline: list[int] = field(default_factory=list)
    #: The calls those events owe, by their state now, and per bucket: "how many
    #: reminders went out today".
    calls: Counts = field(default_factory=Counts)
    call_timeline: list[Counts] = field(default_factory=list)
    #: The registered handlers whose patterns match the group.
    handlers: list[str] = field(default_factory=list)


@dataclass
class Health:
    """What :func:`health` found, at ``now``."""

    database: str
    window: Window
    now: datetime
    starts: list[datetime]
    groups: list[GroupHealth]
    handlers: list[HandlerHealth]
    outbox: int
    oldest_outbox: datetime | None

    @property
    def since(self) -> datetime:
        return self.starts[0]

    @property
    def totals(self) -> Counts:
        """The calls of every handler in the window."""
        return Counts.sum(handler.window for handler in self.handlers)

    @property
    def recent(self) -> Counts:
        """The calls of every handler in the last :data:`RECENT`."""
        return Counts.sum(handler.recent for handler in self.handlers)

    @property
    def oldest_pending(self) -> datetime | None:
        return min(
            (h.open.oldest_pending for h in self.handlers if h.open.oldest_pending), default=None
        )

    def problems(self) -> list[str]:
        """What an operator should look at, handler by handler (in the order of
        :attr:`handlers`), then the outbox; empty when all is well."""
        found: list[str] = []
        for handler in self.handlers:
            recent, opened = handler.recent, handler.open
            if recent.failing:
                found.append(
                    f"{handler.name}: {recent.failing} of {recent.ran} calls of "
                    f"{the_last(RECENT)} failed" + since_text(handler.first_failure)
                )
            if opened.oldest_pending and self.now - opened.oldest_pending > PENDING_TOO_LONG:
                found.append(
                    f"{handler.name}: {opened.pending} calls pending, the oldest for "
                    f"{describe_duration(self.now - opened.oldest_pending)}"
                )
            if opened.given_up and handler.window.given_up:
                found.append(
                    f"{handler.name}: {handler.window.given_up} calls given up in "
                    f"{the_last(self.window.span)}"
                )
            if not handler.registered and (opened.pending or opened.failed):
                found.append(
                    f"{handler.name}: {opened.pending + opened.failed} open calls of a "
                    "handler that is not registered (renamed or removed?)"
                )
        if self.oldest_outbox and self.now - self.oldest_outbox > OUTBOX_TOO_LONG:
            found.append(
                f"{self.outbox} saved events not claimed for "
                f"{describe_duration(self.now - self.oldest_outbox)} (a crash after a "
                "commit?): run retry_spark_events"
            )
        return found

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready document (``spark_inspect --health --json``). Its keys are
        documented in ``docs/introspection.rst`` and only ever gain new ones (``version``
        changes if one is removed or changes meaning)."""
        return {
            "version": JSON_VERSION,
            "database": self.database,
            "window": self.window.name,
            "now": self.now.isoformat(),
            "buckets": [start.isoformat() for start in self.starts],
            "problems": self.problems(),
            "outbox": {"events": self.outbox, "oldest": iso(self.oldest_outbox)},
            "groups": [
                {
                    "name": group.name,
                    "events": group.events,
                    "timeline": group.timeline,
                    "calls": group.calls.as_dict(),
                    "call_timeline": [counts.as_dict() for counts in group.call_timeline],
                    "handlers": group.handlers,
                }
                for group in self.groups
            ],
            "handlers": [
                {
                    "name": handler.name,
                    "registered": handler.registered,
                    "calls": handler.window.as_dict(),
                    "timeline": [counts.as_dict() for counts in handler.timeline],
                    "recent": {
                        **handler.recent.as_dict(),
                        "failure_rate": handler.recent.failure_rate,
                    },
                    "open": {
                        "pending": handler.open.pending,
                        "failed": handler.open.failed,
                        "given_up": handler.open.given_up,
                        "oldest_pending": iso(handler.open.oldest_pending),
                        "oldest_failed": iso(handler.open.oldest_failed),
                    },
                    "first_failure": iso(handler.first_failure),
                    "last_failure": iso(handler.last_failure),
                }
                for handler in self.handlers
            ],
        }


def health(
    window: Window | str = "24h", *, using: str = DEFAULT_DB_ALIAS, now: datetime | None = None
) -> Health:
    """Measure the health of the events and calls stored on the database ``using``.

    Handlers are listed in registration order, then the names of unregistered handlers
    that still have calls in the window or open; groups alphabetically.
    """
    from .models import EventRecord, HandlerOutcome, OutboxEvent

    if isinstance(window, str):
        try:
            window = WINDOWS[window]
        except KeyError:
            choices = ", ".join(WINDOWS)
            raise ValueError(f"Unknown window {window!r}: choose one of {choices}.") from None
    now = now or timezone.now()
    starts = window.starts(now)
    since = starts[0]

    def bucket_of(moment: datetime) -> int | None:
        index = int((moment - since) / window.bucket)
        return index if 0 <= index < len(starts) else None

    def new_handler(name: str, *, registered: bool) -> HandlerHealth:
        return HandlerHealth(name, registered, timeline=[Counts() for _ in starts])

    handlers: dict[str, HandlerHealth] = {
        spec.name: new_handler(spec.name, registered=True) for spec in registry.handlers()
    }

    def handler(name: str) -> HandlerHealth:
        if name not in handlers:
            handlers[name] = new_handler(name, registered=False)
        return handlers[name]

    groups: dict[str, GroupHealth] = {}

    def group_entry(name: str) -> GroupHealth:
        if name not in groups:
            groups[name] = GroupHealth(
                name,
                timeline=[0] * len(starts),
                call_timeline=[Counts() for _ in starts],
                handlers=[spec.name for spec in registry.handlers() if spec.matches(name)],
            )
        return groups[name]

    for group, hour, count in (
        in_window(EventRecord.objects.using(using), since)
        .annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .order_by()
        .values_list("group", "hour")
        .annotate(events=Count("pk"))
    ):
        stored = group_entry(group)
        stored.events += count
        index = bucket_of(hour)
        if index is not None:
            stored.timeline[index] += count

    # The window's calls by their event's group too: a join on the event's primary key.
    calls = HandlerOutcome.objects.using(using)
    for group, name, status, hour, count, first, last in (
        in_window(calls, since)
        .annotate(hour=TruncHour("created_at", tzinfo=UTC))
        .order_by()
        .values_list("record__group", "handler", "status", "hour")
        .annotate(calls=Count("pk"), first=Min("created_at"), last=Max("created_at"))
    ):
        entry = handler(name)
        entry.window.add(status, count)
        by_group = group_entry(group)
        by_group.calls.add(status, count)
        index = bucket_of(hour)
        if index is not None:
            entry.timeline[index].add(status, count)
            by_group.call_timeline[index].add(status, count)
        if status in {FAILED, GIVEN_UP}:
            entry.first_failure = min(filter(None, (entry.first_failure, first)))
            entry.last_failure = max(filter(None, (entry.last_failure, last)))

    for name, status, count in (
        in_window(calls, now - RECENT)
        .order_by()
        .values_list("handler", "status")
        .annotate(calls=Count("pk"))
    ):
        handler(name).recent.add(status, count)

    # The calls that are not done: the condition of spark_decl_due_idx, which holds every
    # column this reads, so the database reads the index instead of the table (an index-only
    # scan). COUNT(*), not COUNT(id): the id is not in the index.
    for name, status, count, oldest in (
        calls.exclude(status=DONE)
        .order_by()
        .values_list("handler", "status")
        .annotate(calls=Count("*"), oldest=Min("created_at"))
    ):
        opened = handler(name).open
        if status == PENDING:
            opened.pending, opened.oldest_pending = count, oldest
        elif status == FAILED:
            opened.failed, opened.oldest_failed = count, oldest
        elif status == GIVEN_UP:
            opened.given_up = count

    outbox = OutboxEvent.objects.using(using).aggregate(
        events=Count("pk"), oldest=Min("created_at")
    )
    registered = [entry for entry in handlers.values() if entry.registered]
    unregistered = sorted(
        (
            entry
            for entry in handlers.values()
            if not entry.registered
            and (entry.window.total or entry.open.pending or entry.open.failed)
        ),
        key=lambda entry: entry.name,
    )
    return Health(
        database=using,
        window=window,
        now=now,
        starts=starts,
        groups=[groups[name] for name in sorted(groups)],
        handlers=[*registered, *unregistered],
        outbox=outbox["events"],
        oldest_outbox=outbox["oldest"],
    )


def in_window(queryset: QuerySet[M], since: datetime) -> QuerySet[M]:
    """The rows of ``queryset`` created at or after ``since``, found by id (see the module
    docstring); ``created_at`` is compared too, which keeps out an older row written
    after a newer one (concurrent writers, milliseconds apart). The converse, a row of the
    window with an id below the window's first, is missed: the same milliseconds."""
    first = first_id_since(queryset, since)
    if first is None:
        return queryset.none()
    return queryset.filter(pk__gte=first, created_at__gte=since)


def first_id_since(queryset: QuerySet[Any], since: datetime) -> int | None:
    """The id of the first row of ``queryset`` (in id order) created at or after ``since``,
    or ``None`` when there is none.

    A binary search over ids: each step reads the first row at or after an id through the
    primary key's index (one row), so it takes about log2(highest id - lowest id) lookups,
    whatever the table holds. It assumes that ``created_at`` ascends with the id, as it does
    for rows spark_decl writes.
    """
    bounds = queryset.aggregate(low=Min("pk"), high=Max("pk"))
    low, high = bounds["low"], bounds["high"]
    if high is None:
        return None

    def first_at_or_after(pk: int) -> tuple[int, datetime]:
        row = queryset.filter(pk__gte=pk).order_by("pk").values_list("pk", "created_at")[:1]
        return next(iter(row))  # type: ignore[no-any-return]

    if first_at_or_after(high)[1] < since:
        return None
    # The smallest position whose first row is new enough, between low and high.
    while low < high:
        middle = (low + high) // 2
        if first_at_or_after(middle)[1] >= since:
            high = middle
        else:
            low = middle + 1
    return first_at_or_after(low)[0]


def describe_duration(span: timedelta) -> str:
    """``span`` for a person: "3 h 5 min", "40 s", "2 days 4 h"."""
    seconds = int(span.total_seconds())
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days} day{'s' if days != 1 else ''}" + (f" {hours} h" if hours else "")
    if hours:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"


def the_last(span: timedelta) -> str:
    """ "the last hour", "the last day", "the last 7 days", "the last 90 min"."""
    for unit, name in ((timedelta(days=1), "day"), (timedelta(hours=1), "hour")):
        if span == unit:
            return f"the last {name}"
        if not span % unit:
            return f"the last {span // unit} {name}s"
    return f"the last {describe_duration(span)}"


def since_text(moment: datetime | None) -> str:
    return f", since {moment:%Y-%m-%d %H:%M} UTC" if moment else ""


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
