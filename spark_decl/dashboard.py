"""The admin's *Event health* page: is everything healthy, and if not, what and since when.

One call to :func:`spark_decl.health.health` per page load, so the page costs the same
few dozen queries however many handlers, groups and events there are. The charts are
inline SVG built here, on the server: no JavaScript, no build step, nothing fetched from
another host (the machine running the admin may have no internet). Every name that came
from the database or the registry goes through :func:`~django.utils.html.format_html`.

The page is registered by :meth:`spark_decl.admin.EventRecordAdmin.get_urls` and shown
to whoever may view events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied
from django.db import router
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .health import (
    OUTBOX_TOO_LONG,
    PENDING_TOO_LONG,
    RECENT,
    WINDOWS,
    Counts,
    GroupHealth,
    HandlerHealth,
    Health,
    Window,
    describe_duration,
    health,
    the_last,
)
from .outcomes import DONE, FAILED, GIVEN_UP, PENDING

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    from .models import EventRecord

TEMPLATE = "admin/spark_decl/dashboard.html"
WINDOW_PARAMETER = "window"
DEFAULT_WINDOW = "24h"
# The event list's filters (spark_decl.admin): its own two, and the field filter on group.
STATUS_PARAMETER = "status"
HANDLER_PARAMETER = "handler"
GROUP_PARAMETER = "group"

#: Stacked bottom to top in this order. Colours from the Okabe-Ito palette, told apart
#: with the common colour vision deficiencies; the legend and tooltips name them too.
STACK = (DONE, FAILED, GIVEN_UP, PENDING)
COLOURS = {DONE: "#009e73", FAILED: "#e69f00", GIVEN_UP: "#b2182b", PENDING: "#8c8c8c"}
LABELS = {DONE: "done", FAILED: "failed, to retry", GIVEN_UP: "given up", PENDING: "pending"}
EVENT_COLOUR = "#417690"  # the admin's own blue

# Chart geometry, in SVG user units (the SVG scales down to its box): the plot's width
# whatever the number of buckets, and the margins that hold the axes' labels.
PLOT_WIDTH, SMALL_PLOT_WIDTH = 600, 168
LEFT, RIGHT, TOP, BOTTOM = 36, 16, 6, 16
#: Every how many buckets the x axis is labelled: every 3 hours, once a day.
AXIS_EVERY = {"24h": 3, "7d": 4}


def dashboard_urls(model_admin: ModelAdmin[EventRecord]) -> list[URLPattern]:
    """The page's URL, for ``EventRecordAdmin.get_urls()`` (before the admin's own, whose
    ``<path:object_id>/`` would take ``dashboard/`` for an event's id)."""

    def view(request: HttpRequest) -> HttpResponse:
        return dashboard_view(model_admin, request)

    return [
        path(
            "dashboard/",
            model_admin.admin_site.admin_view(view),
            name="spark_decl_dashboard",
        )
    ]


def dashboard_view(model_admin: ModelAdmin[EventRecord], request: HttpRequest) -> HttpResponse:
    """The page. Viewing it needs what viewing events needs (the *view* or *change*
    permission on events); an unknown ``?window=`` is a 400 that names the choices."""
    # ModelAdmin.has_view_permission accepts view or change: the event list's own check.
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    name = request.GET.get(WINDOW_PARAMETER, DEFAULT_WINDOW)
    if name not in WINDOWS:
        # Not quietly the default: the page would then answer another question than the
        # one asked (a bookmarked "?window=30d" showing one day).
        choices = ", ".join(WINDOWS)
        return HttpResponseBadRequest(
            f"Unknown window {name!r}: choose one of {choices}.", content_type="text/plain"
        )
    site = model_admin.admin_site
    found = health(WINDOWS[name], using=router.db_for_read(model_admin.model))
    changelist = reverse(f"{site.name}:spark_decl_eventrecord_changelist")
    context = {
        **site.each_context(request),
        "title": "Event health",
        "opts": model_admin.opts,
        "page": Page.of(found, changelist),
        "windows": [
            (
                describe_span(window.span),
                key == found.window.name,
                f"?{urlencode({WINDOW_PARAMETER: key})}",
            )
            for key, window in WINDOWS.items()
        ],
    }
    request.current_app = site.name
    return TemplateResponse(request, TEMPLATE, context)


# -- what the template shows ------------------------------------------------------------------


@dataclass
class Link:
    text: str
    url: str


@dataclass
class Row:
    """One bucket of a chart, for the table under it."""

    when: str
    counts: dict[str, int]
    total: int


@dataclass
class HandlerPanel:
    number: int
    name: str
    registered: bool
    calls: Counts
    problems: list[str]
    chart: SafeString | None
    rows: list[Row]
    failure_rate: str
    failing: bool
    open_calls: list[tuple[Link, str]]
    stuck: bool
    failing_since: str | None
    links: list[Link]

    @property
    def idle(self) -> bool:
        return not self.calls.total and not self.open_calls


@dataclass
class GroupRow:
    name: str
    events: int
    #: Its events' calls, by state, each linking to those events.
    calls: list[Link]
    chart: SafeString
    handlers: list[str]
    link: Link


@dataclass
class Page:
    window: Window
    #: "24 hours", "7 days"; "1 h", "6 h".
    span: str
    bucket: str
    now: datetime
    problems: list[str]
    events: int
    calls: Counts
    failure_rate: str
    oldest_pending: str | None
    outbox: str | None
    outbox_stale: bool
    handlers: list[HandlerPanel] = field(default_factory=list)
    groups: list[GroupRow] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)

    @property
    def idle_handlers(self) -> list[HandlerPanel]:
        return [panel for panel in self.handlers if panel.idle]

    @property
    def busy_handlers(self) -> list[HandlerPanel]:
        return [panel for panel in self.handlers if not panel.idle]

    @classmethod
    def of(cls, found: Health, changelist: str) -> Page:
        problems = found.problems()
        panels = [
            handler_panel(number, handler, found, problems, changelist)
            for number, handler in enumerate(found.handlers, start=1)
        ]
        # The handlers with a problem first: they are what the page is looked at for.
        panels.sort(key=lambda panel: not panel.problems)
        now = found.now
        return cls(
            window=found.window,
            span=describe_span(found.window.span),
            bucket=describe_duration(found.window.bucket),
            now=now,
            problems=problems,
            events=sum(group.events for group in found.groups),
            calls=found.totals,
            failure_rate=describe_rate(found.recent),
            oldest_pending=(
                describe_wait(now, found.oldest_pending) if found.oldest_pending else None
            ),
            outbox=(
                f"{found.outbox} saved events not claimed yet, the oldest for "
                f"{describe_duration(now - found.oldest_outbox)}"
                if found.outbox and found.oldest_outbox
                else None
            ),
            outbox_stale=bool(found.oldest_outbox and now - found.oldest_outbox > OUTBOX_TOO_LONG),
            handlers=panels,
            groups=[group_row(group, found, changelist) for group in found.groups],
            legend=[(COLOURS[status], LABELS[status]) for status in STACK],
        )


def handler_panel(
    number: int, handler: HandlerHealth, found: Health, problems: list[str], changelist: str
) -> HandlerPanel:
    def events_of(status: str | None = None) -> str:
        query = {HANDLER_PARAMETER: handler.name}
        if status:
            query[STATUS_PARAMETER] = status
        return f"{changelist}?{urlencode(query)}"

    opened, now = handler.open, found.now
    open_calls: list[tuple[Link, str]] = []
    if opened.pending:
        waited = describe_wait(now, opened.oldest_pending) if opened.oldest_pending else ""
        open_calls.append((Link(f"{opened.pending} pending", events_of(PENDING)), waited))
    if opened.failed:
        since = f"the oldest claimed {when(opened.oldest_failed, now)}"
        open_calls.append(
            (Link(f"{opened.failed} failed, waiting for a retry", events_of(FAILED)), since)
        )
    if opened.given_up:
        open_calls.append((Link(f"{opened.given_up} given up", events_of(GIVEN_UP)), ""))
    failing = bool(handler.recent.failure_rate)
    failing_since = None
    if handler.first_failure and handler.last_failure:
        first, last = when(handler.first_failure, now), when(handler.last_failure, now)
        failing_since = (
            f"failing since {first}, last failure {last}"
            if failing
            else f"first failure {first}, last failure {last}, none in {the_last(RECENT)}"
        )
    bars = [
        Bar(
            start,
            bucket_title(start, found.window.bucket, counts),
            [(status, getattr(counts, status)) for status in STACK],
        )
        for start, counts in zip(found.starts, handler.timeline, strict=True)
    ]
    total = handler.window
    return HandlerPanel(
        number=number,
        name=handler.name,
        registered=handler.registered,
        calls=total,
        # problems() starts each handler's sentences with its name and a colon.
        problems=[problem for problem in problems if problem.startswith(f"{handler.name}: ")],
        chart=(
            bar_chart(
                bars,
                found.window,
                label=f"Calls of {handler.name} per {describe_duration(found.window.bucket)}, "
                f"last {describe_span(found.window.span)}: {describe_counts(total)}",
                height=130,
            )
            if total.total
            else None
        ),
        rows=[
            Row(describe_bucket(start, found.window.bucket), counts.as_dict(), counts.total)
            for start, counts in zip(found.starts, handler.timeline, strict=True)
            if counts.total
        ],
        failure_rate=describe_rate(handler.recent),
        failing=failing,
        open_calls=open_calls,
        stuck=bool(opened.oldest_pending and now - opened.oldest_pending > PENDING_TOO_LONG),
        failing_since=failing_since,
        links=[
            Link("all its events", events_of()),
            Link("failed", events_of(FAILED)),
            Link("given up", events_of(GIVEN_UP)),
            Link("pending", events_of(PENDING)),
        ],
    )


def group_row(group: GroupHealth, found: Health, changelist: str) -> GroupRow:
    """A group's row: its events, and their calls by state (which say what the events
    led to: "how many reminders went out"), drawn per bucket; the events alone when they
    owe no call."""
    span, bucket = describe_span(found.window.span), describe_duration(found.window.bucket)

    def events_of(status: str | None = None) -> str:
        query = {GROUP_PARAMETER: group.name}
        if status:
            query[STATUS_PARAMETER] = status
        return f"{changelist}?{urlencode(query)}"

    buckets = zip(found.starts, group.timeline, group.call_timeline, strict=True)
    if group.calls.total:
        bars = [
            Bar(
                start,
                f"{describe_bucket(start, found.window.bucket)}: {events} events, "
                f"{counts.total} calls ({describe_counts(counts)})",
                [(status, getattr(counts, status)) for status in STACK],
            )
            for start, events, counts in buckets
        ]
        label = (
            f"Calls of the events of {group.name} per {bucket}, last {span}: "
            f"{describe_counts(group.calls)}"
        )
    else:
        bars = [
            Bar(
                start,
                f"{describe_bucket(start, found.window.bucket)}: {events} events",
                [("events", events)],
            )
            for start, events, _ in buckets
        ]
        label = f"Events of {group.name} per {bucket}, last {span}: {group.events} in all"
    return GroupRow(
        name=group.name,
        events=group.events,
        calls=[
            Link(f"{getattr(group.calls, status)} {LABELS[status]}", events_of(status))
            for status in STACK
            if getattr(group.calls, status)
        ],
        chart=bar_chart(bars, found.window, label=label, height=50, axis=False),
        handlers=group.handlers,
        link=Link(group.name, events_of()),
    )


# -- words --------------------------------------------------------------------------------------


def describe_rate(recent: Counts) -> str:
    """The failure rate of the last hour, with what it is a share of."""
    rate = recent.failure_rate
    if rate is None:
        return f"no calls ran in {the_last(RECENT)}"
    return f"{rate:.0%} ({recent.failing} of {recent.ran} calls that ran failed)"


def describe_span(span: timedelta) -> str:
    """A window's length the way a person says it: "24 hours", "7 days"."""
    if span <= timedelta(days=1):
        return f"{span // timedelta(hours=1)} hours"
    return describe_duration(span)


def describe_counts(counts: Counts) -> str:
    return ", ".join(f"{getattr(counts, status)} {LABELS[status]}" for status in STACK)


def describe_wait(now: datetime, oldest: datetime | None) -> str:
    if oldest is None:
        return ""
    return f"the oldest waited {describe_duration(now - oldest)}, since {when(oldest, now)}"


def when(moment: datetime | None, now: datetime) -> str:
    """``moment`` in the current time zone: the time alone when it is today."""
    if moment is None:
        return ""
    local = timezone.localtime(moment)
    if local.date() == timezone.localtime(now).date():
        return f"{local:%H:%M}"
    return f"{local:%Y-%m-%d %H:%M}"


def describe_bucket(start: datetime, bucket: timedelta) -> str:
    local, end = timezone.localtime(start), timezone.localtime(start + bucket)
    return f"{local:%a %d %b %H:%M} to {end:%H:%M}"


def bucket_title(start: datetime, bucket: timedelta, counts: Counts) -> str:
    return f"{describe_bucket(start, bucket)}: {counts.total} calls ({describe_counts(counts)})"


# -- the charts -------------------------------------------------------------------------------


@dataclass
class Bar:
    start: datetime
    title: str
    #: (status, count), stacked bottom up.
    segments: list[tuple[str, int]]

    @property
    def total(self) -> int:
        return sum(count for _, count in self.segments)


def bar_chart(
    bars: list[Bar], window: Window, *, label: str, height: int, axis: bool = True
) -> SafeString:
    """A stacked bar chart as inline SVG: one ``<g class="bar">`` per bucket with a
    ``<title>`` (the browser's tooltip) and a ``<rect>`` per non-zero segment, heights in
    proportion to the counts (at least one unit, so a single call stays visible)."""
    left, right = (LEFT, RIGHT) if axis else (0, 0)
    width = left + (PLOT_WIDTH if axis else SMALL_PLOT_WIDTH) + right
    bottom = height - (BOTTOM if axis else 0)
    top = TOP if axis else 2
    slot = (width - left - right) / len(bars)
    peak = max((bar.total for bar in bars), default=0)
    scale = (bottom - top) / peak if peak else 0.0
    every = AXIS_EVERY.get(window.name, 1)
    drawn: list[SafeString] = []
    for index, bar in enumerate(bars):
        x = left + index * slot
        y = float(bottom)
        rects = [
            # The whole slot, transparent: the tooltip shows over an empty or tiny bar.
            svg_rect("slot", x, top, slot, bottom - top, "transparent")
        ]
        for status, count in bar.segments:
            if count:
                size = max(count * scale, 1.0)
                y -= size
                colour = COLOURS.get(status, EVENT_COLOUR)
                rects.append(svg_rect(status, x + slot * 0.1, y, slot * 0.8, size, colour))
        drawn.append(
            format_html(
                '<g class="bar" data-start="{}" data-total="{}"><title>{}</title>{}</g>',
                bar.start.isoformat(),
                bar.total,
                bar.title,
                join(rects),
            )
        )
        if axis and (len(bars) - 1 - index) % every == 0:
            local = timezone.localtime(bar.start)
            text = f"{local:%H:%M}" if window.bucket < timedelta(hours=6) else f"{local:%a %H}h"
            drawn.append(
                format_html(
                    '<text x="{}" y="{}" text-anchor="middle">{}</text>',
                    num(x + slot / 2),
                    height - 3,
                    text,
                )
            )
    if axis:
        drawn.append(
            format_html(
                '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="currentColor" '
                'stroke-opacity="0.3" />'
                '<text x="{}" y="{}" text-anchor="end">{}</text>'
                '<text x="{}" y="{}" text-anchor="end">0</text>',
                left,
                top,
                width - right,
                top,
                left - 4,
                top + 8,
                peak,
                left - 4,
                bottom,
            )
        )
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="spark-chart" role="img" '
        'aria-label="{}" viewBox="0 0 {} {}" width="{}" height="{}" '
        'fill="currentColor" font-size="9">'
        '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="currentColor" />{}</svg>',
        label,
        width,
        height,
        width,
        height,
        left,
        bottom,
        width,
        bottom,
        join(drawn),
    )


def svg_rect(
    status: str, x: float, y: float, width: float, height: float, fill: str
) -> SafeString:
    return format_html(
        '<rect class="{}" x="{}" y="{}" width="{}" height="{}" fill="{}" />',
        status,
        num(x),
        num(y),
        num(width),
        num(height),
        fill,
    )


def num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def join(parts: list[SafeString]) -> SafeString:
    return format_html_join("", "{}", ((part,) for part in parts))
