"""The admin's Event health page (spark_decl.dashboard), through Django's test client."""

from __future__ import annotations

import html
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from pytest_django import Settings

from spark_decl.health import PENDING_TOO_LONG
from spark_decl.models import EventRecord, HandlerOutcome, OutboxEvent
from tests.conftest import CHALLENGE_HANDLER, staff

pytestmark = pytest.mark.django_db

DASHBOARD = reverse("admin:spark_decl_dashboard")
CHANGELIST = reverse("admin:spark_decl_eventrecord_changelist")
# 14:20 on a Sunday: the 24 h window's buckets are 15:00 yesterday ... 14:00 today.
NOW = datetime(2026, 12, 6, 14, 20, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"
STATUSES = ("done", "failed", "given_up", "pending")


@pytest.fixture(autouse=True)
def fast_passwords(settings: Settings) -> None:
    """admin_client's superuser needs a password hash; the default hasher is slow by design."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def frozen() -> Iterator[None]:
    """The page measures at NOW, so that buckets and ages are known."""
    with mock.patch("django.utils.timezone.now", return_value=NOW):
        yield


def claim(group: str, at: datetime, calls: dict[str, str], times: int = 1) -> None:
    """``times`` events of ``group`` claimed at ``at``, each with a call per handler in the
    given status. Call in time order: ids ascend with claim times, as spark_decl writes."""
    for _ in range(times):
        record = EventRecord.objects.create(
            key=f"{group}_{EventRecord.objects.count()}", group=group, created_at=at
        )
        HandlerOutcome.objects.bulk_create(
            HandlerOutcome(
                record=record,
                handler=handler,
                status=status,
                attempts=0 if status == "pending" else 1,
                created_at=at,
            )
            for handler, status in calls.items()
        )


def page(client: Client, query: str = "") -> str:
    response = client.get(f"{DASHBOARD}{query}")
    assert response.status_code == 200
    return response.content.decode()


def charts(content: str) -> dict[str, ET.Element]:
    """Every chart on the page, parsed as XML (so it must be well-formed), by the start of
    its aria-label ("Calls of <handler>" or "Events of <group>")."""
    found = {}
    for source in re.findall(
        r"<svg xmlns=[^>]*class=\"spark-chart\".*?</svg>", content, flags=re.DOTALL
    ):
        svg = ET.fromstring(source)
        assert svg.get("role") == "img"
        found[svg.get("aria-label", "").split(" per ")[0]] = svg
    return found


def bars(svg: ET.Element) -> dict[datetime, dict[str, float]]:
    """Each bar's drawn height per status, by the start of its bucket."""
    return {
        datetime.fromisoformat(bar.get("data-start", "")): {
            str(rect.get("class")): float(rect.get("height", 0))
            for rect in bar.iter(f"{SVG}rect")
            if rect.get("class") != "slot"
        }
        for bar in svg.iter(f"{SVG}g")
    }


def links(content: str) -> list[str]:
    return [html.unescape(href) for href in re.findall(r'href="([^"]*)"', content)]


def listed_keys(client: Client, url: str) -> list[str]:
    response = client.get(url)
    assert response.status_code == 200
    return sorted(record.key for record in response.context["cl"].result_list)


# -- what it shows ----------------------------------------------------------------------------


def test_nothing_stored_is_all_healthy(admin_client: Client) -> None:
    content = page(admin_client)
    assert '<li class="success">All handlers healthy</li>' in content
    assert 'class="error"' not in content
    assert "No events claimed in the last 24 hours." in content
    # Registered handlers without calls are named, without a chart.
    assert "No calls in the last 24 hours and none open:" in content
    assert CHALLENGE_HANDLER in content
    assert charts(content) == {}


def test_a_failing_handler_is_the_headline_with_its_rate_and_since_when(
    admin_client: Client,
) -> None:
    claim("challenge_created", NOW - timedelta(hours=5, minutes=18), {CHALLENGE_HANDLER: "failed"})
    claim("challenge_created", NOW - timedelta(minutes=40), {CHALLENGE_HANDLER: "done"}, times=3)
    claim("challenge_created", NOW - timedelta(minutes=10), {CHALLENGE_HANDLER: "failed"})

    content = page(admin_client)

    problem = (
        f"{CHALLENGE_HANDLER}: 1 of 4 calls of the last hour failed, since 2026-12-06 09:02 UTC"
    )
    assert f'<li class="error">{problem}</li>' in content
    assert "All handlers healthy" not in content
    section = content[content.index(f"<h2>{CHALLENGE_HANDLER}</h2>") :]
    section = section[: section.index("</dl>")]
    assert "spark-unhealthy" in content[: content.index(f"<h2>{CHALLENGE_HANDLER}</h2>")]
    assert "25% (1 of 4 calls that ran failed)" in section
    assert "failing since 09:02, last failure 14:10" in section
    assert "2 failed, waiting for a retry" in section
    assert "5: 3 done, 2 failed, 0 given up, 0 pending" in section


def test_failures_that_stopped_are_not_failing_since(admin_client: Client) -> None:
    claim("challenge_created", NOW - timedelta(hours=6), {CHALLENGE_HANDLER: "failed"})
    claim("challenge_created", NOW - timedelta(hours=4), {CHALLENGE_HANDLER: "failed"})
    claim("challenge_created", NOW - timedelta(minutes=30), {CHALLENGE_HANDLER: "done"})

    content = page(admin_client)

    assert "<dd>first failure 08:20, last failure 10:20, none in the last hour</dd>" in content
    assert "failing since" not in content
    assert "<dd>0% (0 of 1 calls that ran failed)</dd>" in content


def test_a_stuck_pending_call_shows_how_long_it_waited(admin_client: Client) -> None:
    claim("challenge_created", NOW - timedelta(hours=2, minutes=5), {CHALLENGE_HANDLER: "pending"})
    claim("challenge_created", NOW - timedelta(minutes=1), {CHALLENGE_HANDLER: "pending"})

    content = page(admin_client)

    assert f"{CHALLENGE_HANDLER}: 2 calls pending, the oldest for 2 h 5 min" in content
    assert '2 pending</a> <span class="spark-bad">(the oldest waited 2 h 5 min, since 12:15)' in (
        content
    )
    # The totals: the oldest pending call of all handlers.
    assert "<td>the oldest waited 2 h 5 min, since 12:15</td>" in content


def test_a_pending_call_younger_than_the_limit_is_not_a_problem(admin_client: Client) -> None:
    claim(
        "challenge_created",
        NOW - PENDING_TOO_LONG + timedelta(minutes=1),
        {CHALLENGE_HANDLER: "pending"},
    )
    content = page(admin_client)
    assert "All handlers healthy" in content
    assert "1 pending</a> <span>(the oldest waited 14 min" in content


def test_links_lead_to_the_filtered_event_list(admin_client: Client) -> None:
    claim("order_paid", NOW - timedelta(hours=3), {"shop.mail": "failed", "shop.audit": "done"})
    claim("order_placed", NOW - timedelta(hours=2), {"shop.mail": "given_up"})
    claim("order_placed", NOW - timedelta(hours=1), {"shop.mail": "pending"})

    content = page(admin_client)
    hrefs = links(content)

    for query, keys in {
        "?handler=shop.mail&status=failed": ["order_paid_0"],
        "?handler=shop.mail&status=given_up": ["order_placed_1"],
        "?handler=shop.mail&status=pending": ["order_placed_2"],
        "?handler=shop.mail": ["order_paid_0", "order_placed_1", "order_placed_2"],
        "?handler=shop.audit": ["order_paid_0"],
        "?group=order_placed": ["order_placed_1", "order_placed_2"],
    }.items():
        assert f"{CHANGELIST}{query}" in hrefs, query
        assert listed_keys(admin_client, f"{CHANGELIST}{query}") == keys, query


def test_the_event_list_and_the_page_link_to_each_other(admin_client: Client) -> None:
    listing = admin_client.get(CHANGELIST).content.decode()
    assert f'<a href="{DASHBOARD}">Event health</a>' in listing
    content = page(admin_client)
    assert f'<a href="{CHANGELIST}">All events</a>' in content
    assert "<title>Event health | " in content
    breadcrumbs = content[content.index('<div class="breadcrumbs">') :]
    assert "Event health\n</div>" in breadcrumbs[: breadcrumbs.index("</div>") + 6]


def test_unregistered_handlers_and_a_stale_outbox_are_warnings(admin_client: Client) -> None:
    claim("order_paid", NOW - timedelta(hours=3), {"gone.handler": "failed"})
    OutboxEvent.objects.create(key="k", group="g", context={})
    OutboxEvent.objects.update(created_at=NOW - timedelta(hours=2))

    content = page(admin_client)

    assert "<h2>gone.handler — not registered</h2>" in content
    assert "No handler of this name is registered (renamed or removed?)" in content
    assert (
        '<p class="spark-outbox spark-bad">\n      Outbox: 1 saved events not claimed yet, '
        "the oldest for 2 h (left by a crash?"
    ) in content


def test_the_groups_table(admin_client: Client) -> None:
    claim("zebra", NOW - timedelta(hours=30), {})  # before the 24 hours
    claim("challenge_created", NOW - timedelta(hours=3), {CHALLENGE_HANDLER: "done"})
    claim("challenge_created", NOW - timedelta(hours=3), {CHALLENGE_HANDLER: "failed"})
    claim("quiet_group", NOW - timedelta(hours=2), {}, times=3)

    content = page(admin_client)

    row = content[
        content.index('<a href="/admin/spark_decl/eventrecord/?group=challenge_created">') :
    ]
    row = row[: row.index("</tr>")]
    assert "<td>2</td>" in row
    assert f"<td>{CHALLENGE_HANDLER}</td>" in row
    # What the events led to, each state linking to those events.
    assert (
        '<a href="/admin/spark_decl/eventrecord/?group=challenge_created&amp;status=done">'
        "1 done</a>, "
        '<a href="/admin/spark_decl/eventrecord/?group=challenge_created&amp;status=failed">'
        "1 failed, to retry</a>"
    ) in row
    assert "zebra" not in content
    found = charts(content)
    calls = found["Calls of the events of challenge_created"]
    assert calls.get("aria-label") == (
        "Calls of the events of challenge_created per 1 h, last 24 hours: "
        "1 done, 1 failed, to retry, 0 given up, 0 pending"
    )
    (bar,) = [heights for heights in bars(calls).values() if heights]
    assert set(bar) == {"done", "failed"}
    # A group whose events owe no call: its events.
    assert found["Events of quiet_group"].get("aria-label") == (
        "Events of quiet_group per 1 h, last 24 hours: 3 in all"
    )


# -- the charts -------------------------------------------------------------------------------


def test_bar_heights_follow_the_counts(admin_client: Client) -> None:
    handler = "shop.mail"
    claim("g", NOW - timedelta(hours=3), {handler: "done"}, times=2)  # 11:20
    claim("g", NOW - timedelta(hours=3), {handler: "failed"})
    claim("g", NOW - timedelta(hours=3), {handler: "given_up"})
    claim("g", NOW - timedelta(hours=1, minutes=10), {handler: "done"}, times=2)  # 13:10
    claim("g", NOW - timedelta(minutes=5), {handler: "pending"})  # 14:15

    svg = charts(page(admin_client))[f"Calls of {handler}"]
    drawn = bars(svg)

    assert len(drawn) == 24
    totals = {start: sum(heights.values()) for start, heights in drawn.items()}
    tallest = max(totals, key=lambda start: totals[start])
    assert tallest == datetime(2026, 12, 6, 11, tzinfo=UTC)
    assert totals[datetime(2026, 12, 6, 13, tzinfo=UTC)] == pytest.approx(totals[tallest] / 2)
    assert totals[datetime(2026, 12, 6, 14, tzinfo=UTC)] == pytest.approx(totals[tallest] / 4)
    assert drawn[tallest]["done"] == pytest.approx(2 * drawn[tallest]["failed"])
    assert drawn[tallest]["given_up"] == pytest.approx(drawn[tallest]["failed"])
    assert drawn[datetime(2026, 12, 6, 14, tzinfo=UTC)].keys() == {"pending"}
    assert sum(1 for heights in drawn.values() if heights) == 3
    # The tooltip of each bar names its bucket and counts.
    titles = [bar.findtext(f"{SVG}title") for bar in svg.iter(f"{SVG}g")]
    assert (
        "Sun 06 Dec 11:00 to 12:00: 4 calls (2 done, 1 failed, to retry, 1 given up, 0 pending)"
        in titles
    )
    assert svg.get("aria-label") == (
        "Calls of shop.mail per 1 h, last 24 hours: "
        "4 done, 1 failed, to retry, 1 given up, 1 pending"
    )


def test_the_window_switch(admin_client: Client) -> None:
    claim("g", NOW - timedelta(days=3), {"shop.mail": "done"})
    claim("g", NOW - timedelta(hours=2), {"shop.mail": "done"})

    day = page(admin_client)
    assert '<strong aria-current="page">24 hours</strong>' in day
    assert '<a href="?window=7d">7 days</a>' in day
    assert len(bars(charts(day)["Calls of shop.mail"])) == 24
    assert "<dd>1: 1 done, 0 failed, 0 given up, 0 pending</dd>" in day

    week = page(admin_client, "?window=7d")
    assert '<strong aria-current="page">7 days</strong>' in week
    assert '<a href="?window=24h">24 hours</a>' in week
    drawn = bars(charts(week)["Calls of shop.mail"])
    assert len(drawn) == 28
    assert drawn[datetime(2026, 12, 3, 12, tzinfo=UTC)]["done"] > 0
    assert "<dd>2: 2 done, 0 failed, 0 given up, 0 pending</dd>" in week
    assert charts(page(admin_client, "?window=24h")).keys() == charts(day).keys()
    assert "?window=24h" in links(week)


def test_an_unknown_window_is_a_400_naming_the_choices(admin_client: Client) -> None:
    response = admin_client.get(f"{DASHBOARD}?window=30d")
    assert response.status_code == 400
    assert response.content.decode() == "Unknown window '30d': choose one of 24h, 7d."


def test_names_are_escaped(admin_client: Client) -> None:
    group = "<script>alert('group')</script>"
    handler = '"><img src=x onerror=alert(1)>'
    claim(group, NOW - timedelta(hours=1), {handler: "failed"})

    content = page(admin_client)

    assert "<script>alert" not in content
    assert "<img src=x" not in content
    assert "&lt;script&gt;alert(&#x27;group&#x27;)&lt;/script&gt;" in content
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in content
    found = charts(content)  # well-formed, names and all
    assert f"Calls of {handler}" in found
    assert f"Calls of the events of {group}" in found
    assert f"{CHANGELIST}?group=%3Cscript%3Ealert%28%27group%27%29%3C%2Fscript%3E" in links(
        content
    )


# -- who may see it -------------------------------------------------------------------------


@pytest.mark.parametrize("permission", ["view_eventrecord", "change_eventrecord"])
def test_staff_who_may_view_events_see_it(permission: str) -> None:
    claim("g", NOW - timedelta(minutes=10), {"shop.mail": "failed"})
    content = page(staff(permission))
    assert "shop.mail: 1 of 1 calls of the last hour failed" in content


def test_staff_without_the_permission_get_403() -> None:
    assert staff().get(DASHBOARD).status_code == 403
    assert staff("view_handleroutcome").get(DASHBOARD).status_code == 403


def test_anonymous_users_are_sent_to_the_login(client: Client) -> None:
    response = client.get(DASHBOARD)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={DASHBOARD}"


# -- cost -------------------------------------------------------------------------------------


def queries_for(client: Client, events: int, handlers: int) -> int:
    """The page's queries over ``events`` events spread over ``handlers`` handlers and as
    many groups, claimed every 7 minutes up to now, a call each, every fifth failed."""
    HandlerOutcome.objects.all().delete()
    EventRecord.objects.all().delete()
    records = EventRecord.objects.bulk_create(
        EventRecord(
            key=f"{handlers}_{n}",
            group=f"group_{n % handlers}",
            created_at=NOW - timedelta(minutes=7 * (events - n)),
        )
        for n in range(events)
    )
    HandlerOutcome.objects.bulk_create(
        HandlerOutcome(
            record=record,
            handler=f"handler_{n % handlers}",
            status="failed" if n % 5 == 0 else "done",
            attempts=1,
            created_at=record.created_at,
        )
        for n, record in enumerate(records)
    )
    with CaptureQueriesContext(connection) as queries:
        content = page(client)
    assert f"handler_{handlers - 1}" in content
    return len(queries)


def test_the_query_count_does_not_grow_with_handlers_groups_or_events(
    admin_client: Client,
) -> None:
    few = queries_for(admin_client, 200, handlers=2)
    assert queries_for(admin_client, 200, handlers=20) == few
    # Ten times the events: each of the three binary searches (health.first_id_since)
    # takes at most log2(10) + 1 more steps.
    assert queries_for(admin_client, 2000, handlers=20) <= few + 3 * math.ceil(math.log2(10) + 1)
