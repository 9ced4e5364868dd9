"""The admin as an operations console: filters, outcomes, the retry action, permissions."""

from __future__ import annotations

import re
from html import unescape
from io import StringIO
from typing import Any
from urllib.parse import urlencode

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils.html import escape
from pytest_django import Settings

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.admin import CONTEXT_PREVIEW_CHARS, PROBLEM_CHARS, PROBLEM_ERROR_CHARS
from spark_decl.dispatch import claim_and_run
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.outcomes import TRACEBACK_MAX_CHARS
from spark_decl.registry import Registry, function_name
from spark_decl.validation import validate_event
from tests.conftest import CHALLENGE_HANDLER, staff

CHANGELIST = reverse("admin:spark_decl_eventrecord_changelist")


def change_url(record: EventRecord) -> str:
    return reverse("admin:spark_decl_eventrecord_change", args=[record.pk])


@pytest.fixture(autouse=True)
def fast_passwords(settings: Settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


class Broken:
    """Two handlers of ``^order_``: ``mailer`` fails while ``broken``, ``audit`` always
    succeeds."""

    def __init__(self) -> None:
        self.broken = True
        self.mailed: list[str] = []
        self.mailer = ""
        self.audit = ""


@pytest.fixture(params=["claimed_then_run", "run_at_claim"])
def broken(
    request: pytest.FixtureRequest, transactional_db: None, isolated_registry: Registry
) -> Broken:
    """order_1 and order_2: mailer failed, audit done. order_3: both done (claimed while
    mailer worked). Every call with an outcome row, or, run in the claiming transaction as
    a save's are."""
    state = Broken()

    def claim(events: list[Event[Any]]) -> None:
        if request.param == "claimed_then_run":
            process_events(only_new_events(events))
        else:
            claim_and_run([validate_event(each) for each in events], using="default")

    @handles(r"^order_")
    def mailer(event: Event[Any]) -> None:
        if state.broken:
            raise ConnectionError(f"SMTP down for {event['key']}")
        state.mailed.append(event["key"])

    @handles(r"^order_")
    def audit(event: Event[Any]) -> None:
        pass

    state.mailer, state.audit = function_name(mailer), function_name(audit)
    claim([event("order_placed", 1), event("order_paid", 2)])
    state.broken = False
    claim([event("order_placed", 3)])
    with_rows = HandlerOutcome.objects.order_by().values_list("record__key", flat=True).distinct()
    assert len(with_rows) == 3
    state.mailed.clear()
    state.broken = True
    return state


def calls_of(handler: str) -> list[tuple[str, int]]:
    """(status, attempts) of each of ``handler``'s calls."""
    return sorted(HandlerOutcome.objects.filter(handler=handler).values_list("status", "attempts"))


def keys(client: Client, query: str = "", **params: str) -> list[str]:
    response = client.get(f"{CHANGELIST}{query}", params)
    assert response.status_code == 200
    return sorted(record.key for record in response.context["cl"].result_list)


def run_action(client: Client, records: list[EventRecord], query: str = "") -> Any:
    return client.post(
        f"{CHANGELIST}{query}",
        {"action": "retry_failed_handlers", "_selected_action": [r.pk for r in records]},
        follow=True,
    )


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# -- filters ----------------------------------------------------------------------------------


def test_the_handler_filter_lists_every_handler_name(admin_client: Client, broken: Broken) -> None:
    content = admin_client.get(CHANGELIST).content.decode()
    for name in (broken.mailer, broken.audit):
        assert escape(f"?{urlencode({'handler': name})}") in content
    assert keys(admin_client, handler=broken.mailer) == [
        "order_paid_2",
        "order_placed_1",
        "order_placed_3",
    ]
    assert keys(admin_client, handler=CHALLENGE_HANDLER) == []


def test_status_and_handler_filters_mean_the_same_call(
    admin_client: Client, broken: Broken
) -> None:
    assert keys(admin_client, "?status=failed") == ["order_paid_2", "order_placed_1"]
    assert keys(admin_client, "?status=done") == [
        "order_paid_2",
        "order_placed_1",
        "order_placed_3",
    ]
    # "mailer failed", not "something failed and mailer has an outcome".
    assert keys(admin_client, status="failed", handler=broken.mailer) == [
        "order_paid_2",
        "order_placed_1",
    ]
    assert keys(admin_client, status="failed", handler=broken.audit) == []
    assert keys(admin_client, status="done", handler=broken.mailer) == ["order_placed_3"]
    # Combined with the group filter and the key search.
    assert keys(admin_client, "?status=failed&group=order_paid") == ["order_paid_2"]
    assert keys(admin_client, "?status=failed&q=placed") == ["order_placed_1"]
    content = admin_client.get(f"{CHANGELIST}?status=failed").content.decode()
    assert content.count("1/2 done, 1 failed") == 2


def test_the_changelist_query_count_does_not_grow_with_the_page(
    admin_client: Client, broken: Broken
) -> None:
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(CHANGELIST).status_code == 200
        return len(queries)

    few = count()
    process_events(only_new_events([event("order_placed", n) for n in range(10, 40)]))
    assert EventRecord.objects.count() == 33
    assert count() == few
    # Each row's problem (mailer failed for 32 of them) comes with the page's one query.
    with CaptureQueriesContext(connection) as queries:
        content = admin_client.get(CHANGELIST).content.decode()
    cells = re.findall(r'<td class="field-problem">(.*?)</td>', content, re.S)
    assert len(cells) == 33
    assert len([cell for cell in cells if "failed (attempt 1): ConnectionError" in cell]) == 32
    assert len([q for q in queries.captured_queries if "last_error" in q["sql"]]) == 1


# -- the "problem" column -------------------------------------------------------------------


def problem_cell(client: Client, key: str) -> str:
    """The "problem" cell of the event ``key`` in the changelist."""
    content = client.get(CHANGELIST, {"q": key}).content.decode()
    cells = re.findall(r'<td class="field-problem">(.*?)</td>', content, re.S)
    assert len(cells) == 1
    return str(cells[0])


def test_the_problem_column_names_the_failing_call_and_its_error(
    admin_client: Client, broken: Broken
) -> None:
    expected = f"{broken.mailer} failed (attempt 1): ConnectionError: SMTP down for order_paid_2"
    assert problem_cell(admin_client, "order_paid_2") == (
        f'<span title="{escape(expected)}">{escape(expected)}</span>'
    )
    assert problem_cell(admin_client, "order_placed_3") == "-"


def test_a_given_up_call_is_the_problem_and_says_so(admin_client: Client, broken: Broken) -> None:
    HandlerOutcome.objects.filter(record__key="order_paid_2", handler=broken.mailer).update(
        status="given_up", attempts=10, next_attempt_at=None
    )
    cell = problem_cell(admin_client, "order_paid_2")
    assert f"{escape(broken.mailer)} given up after 10 attempts: ConnectionError" in cell


def problem_parts(client: Client, key: str) -> tuple[str, str]:
    """The title and the text of the event ``key``'s problem."""
    found = re.fullmatch(r'<span title="(.*)">(.*)</span>', problem_cell(client, key), re.S)
    assert found is not None
    title, shown = found.groups()
    return unescape(title), unescape(shown)


def test_a_long_problem_is_cut_and_whole_in_the_title(
    admin_client: Client, broken: Broken
) -> None:
    error = "ValueError: " + "line\n" * 150
    HandlerOutcome.objects.filter(record__key="order_paid_2", handler=broken.mailer).update(
        last_error=error
    )
    title, shown = problem_parts(admin_client, "order_paid_2")
    assert title == f"{broken.mailer} failed (attempt 1): {error}"
    # One line of PROBLEM_CHARS, ending in an ellipsis.
    assert shown == " ".join(title.split())[: PROBLEM_CHARS - 1] + "…"
    assert "\n" not in shown


def test_the_title_holds_a_bounded_part_of_a_huge_error(
    admin_client: Client, broken: Broken
) -> None:
    error = "ValueError: " + "x" * 9_000
    HandlerOutcome.objects.filter(record__key="order_paid_2", handler=broken.mailer).update(
        last_error=error
    )
    title, _ = problem_parts(admin_client, "order_paid_2")
    prefix = f"{broken.mailer} failed (attempt 1): "
    assert title == prefix + error[:PROBLEM_ERROR_CHARS] + "…"


def test_the_problem_is_escaped(admin_client: Client, broken: Broken) -> None:
    attack = '"><script>alert(1)</script>'
    HandlerOutcome.objects.filter(record__key="order_paid_2", handler=broken.mailer).update(
        last_error=attack
    )
    cell = problem_cell(admin_client, "order_paid_2")
    assert "<script>" not in cell
    assert cell.count(escape(attack)) == 2


# -- the change page ------------------------------------------------------------------------


def test_a_long_error_wraps(admin_client: Client, broken: Broken) -> None:
    record = EventRecord.objects.get(key="order_paid_2")
    content = admin_client.get(change_url(record)).content.decode()
    assert (
        '<span class="spark-decl-wrap">ConnectionError: SMTP down for order_paid_2</span>'
        in content
    )
    assert "spark_decl/admin.css" in content


def test_the_change_page_shows_each_outcome_with_its_traceback(
    admin_client: Client, broken: Broken
) -> None:
    record = EventRecord.objects.get(key="order_placed_1")
    content = admin_client.get(change_url(record)).content.decode()
    for name in (broken.mailer, broken.audit):
        assert escape(name) in content
    assert "ConnectionError: SMTP down for order_placed_1" in content
    failed = HandlerOutcome.objects.get(record=record, handler=broken.mailer)
    pre = re.search(
        r'<pre class="spark-decl-wrap">(Traceback \(most recent call last\):.*?)</pre>',
        content,
        re.S,
    )
    assert pre is not None
    assert "raise ConnectionError(f&quot;SMTP down for" in pre.group(1)
    assert failed.next_attempt_at is not None
    assert 'name="_save"' not in content


def test_the_error_of_a_call_done_since_is_shown_as_an_earlier_attempts_error(
    admin_client: Client, broken: Broken
) -> None:
    broken.broken = False
    call_command("retry_spark_events", "--group", "^order_placed$", stdout=StringIO())
    placed, paid = (EventRecord.objects.get(key=k) for k in ("order_placed_1", "order_paid_2"))
    done = HandlerOutcome.objects.get(record=placed, handler=broken.mailer)
    # Kept: what went wrong before the retry succeeded.
    assert (done.status, done.attempts) == ("done", 2)
    assert done.last_error == "ConnectionError: SMTP down for order_placed_1"

    content = admin_client.get(change_url(placed)).content.decode()
    assert re.search(
        r"error of an earlier attempt:.*ConnectionError: SMTP down for order_placed_1",
        content,
        re.S,
    )
    assert "<summary>show (earlier attempt)</summary>" in content
    # A call failing now is shown as failing.
    content = admin_client.get(change_url(paid)).content.decode()
    assert "ConnectionError: SMTP down for order_paid_2" in content
    assert "earlier attempt" not in content
    assert "<summary>show</summary>" in content

    # The list counts the call as done, and the "failed" filter leaves its event out.
    listed = admin_client.get(f"{CHANGELIST}?q=order_placed_1").content.decode()
    assert '<td class="field-outcome_summary">2/2 done</td>' in listed
    assert '<td class="field-problem">-</td>' in listed
    assert keys(admin_client, "?status=failed") == ["order_paid_2"]


def test_a_huge_traceback_is_shown_with_its_head_and_tail(
    admin_client: Client, broken: Broken
) -> None:
    record = EventRecord.objects.get(key="order_placed_1")
    huge = "Traceback (most recent call last):\n" + "  frame\n" * 200_000 + "ValueError: end"
    HandlerOutcome.objects.filter(record=record, handler=broken.mailer).update(traceback=huge)
    content = admin_client.get(change_url(record)).content.decode()
    assert re.search(
        r'<pre class="spark-decl-wrap">Traceback \(most recent call last\):\n  frame\n', content
    )
    assert re.search(r"\[\.\.\. [\d,]+ characters cut \.\.\.\]", content)
    assert "ValueError: end</pre>" in content
    assert len(content) < TRACEBACK_MAX_CHARS + 100_000


def test_a_megabyte_of_context_renders_truncated(admin_client: Client, db: None) -> None:
    process_events(only_new_events([event("big", 1, {"blob": "x" * 1_000_000})]))
    record = EventRecord.objects.get()
    response = admin_client.get(change_url(record))
    assert response.status_code == 200
    content = response.content.decode()
    assert "characters in all)" in content
    assert "x" * CONTEXT_PREVIEW_CHARS not in content
    assert len(content) < 100_000
    # The changelist never reads contexts.
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.get(CHANGELIST).status_code == 200
    assert not any("context" in query["sql"] for query in queries.captured_queries)


# -- the retry action -------------------------------------------------------------------------


def test_retry_failed_handlers_reruns_only_the_failed_calls_of_the_selection(
    admin_client: Client, broken: Broken
) -> None:
    placed, paid = (EventRecord.objects.get(key=k) for k in ("order_placed_1", "order_paid_2"))
    broken.broken = False
    response = run_action(admin_client, [placed, EventRecord.objects.get(key="order_placed_3")])
    assert messages_of(response) == ["Retried 1 failed handler calls: 1 succeeded, 0 failed."]
    assert broken.mailed == ["order_placed_1"]
    outcome = HandlerOutcome.objects.get(record=placed, handler=broken.mailer)
    assert (outcome.status, outcome.attempts) == ("done", 2)
    # Not selected: untouched, even though it is due.
    assert HandlerOutcome.objects.get(record=paid, handler=broken.mailer).status == "failed"
    # The audit handler, which had succeeded, did not run again.
    assert calls_of(broken.audit) == [("done", 1)] * 3


def test_the_action_ignores_the_backoff_and_includes_given_up_calls(
    admin_client: Client, broken: Broken
) -> None:
    HandlerOutcome.objects.filter(record__key="order_placed_1", handler=broken.mailer).update(
        status="given_up", next_attempt_at=None, attempts=10
    )
    HandlerOutcome.objects.filter(record__key="order_paid_2", handler=broken.mailer).update(
        attempts=3, next_attempt_at="2999-01-01T00:00:00Z"
    )
    response = run_action(admin_client, list(EventRecord.objects.all()))
    assert messages_of(response) == ["Retried 2 failed handler calls: 0 succeeded, 2 failed."]
    assert calls_of(broken.mailer) == [("done", 1), ("failed", 4), ("given_up", 11)]


def test_the_action_leaves_pending_calls_to_the_command(admin_client: Client, db: None) -> None:
    from spark_decl.claims import claim_events
    from spark_decl.validation import validate_event

    claim_events([validate_event(event("challenge_created", 1))])
    response = run_action(admin_client, list(EventRecord.objects.all()))
    assert messages_of(response) == ["No failed handler calls in the selected events."]
    assert HandlerOutcome.objects.get().status == "pending"


def test_the_action_works_on_a_filtered_changelist(admin_client: Client, broken: Broken) -> None:
    broken.broken = False
    records = list(EventRecord.objects.filter(key__in=["order_placed_1", "order_paid_2"]))
    query = "?" + urlencode({"status": "failed", "handler": broken.mailer})
    response = run_action(admin_client, records, query)
    assert messages_of(response) == ["Retried 2 failed handler calls: 2 succeeded, 0 failed."]
    assert sorted(broken.mailed) == ["order_paid_2", "order_placed_1"]


# -- permissions ------------------------------------------------------------------------------


def test_staff_without_view_permission_gets_403(broken: Broken) -> None:
    client = staff()
    record = EventRecord.objects.get(key="order_placed_1")
    assert client.get(CHANGELIST).status_code == 403
    assert client.get(change_url(record)).status_code == 403
    assert run_action(client, [record]).status_code == 403
    assert HandlerOutcome.objects.get(record=record, handler=broken.mailer).attempts == 1


def test_view_permission_shows_events_and_outcomes_but_not_the_action(broken: Broken) -> None:
    client = staff("view_eventrecord")
    record = EventRecord.objects.get(key="order_placed_1")
    response = client.get(CHANGELIST)
    assert response.status_code == 200
    assert "retry_failed_handlers" not in response.content.decode()
    page = client.get(change_url(record))
    assert page.status_code == 200
    # Outcomes are part of the event: no separate permission on HandlerOutcome needed.
    assert "ConnectionError: SMTP down for order_placed_1" in page.content.decode()

    broken.broken = False
    response = run_action(client, [record])
    # No action is available to this user: the POST just shows the changelist again.
    assert response.status_code == 200
    assert messages_of(response) == []
    assert broken.mailed == []
    assert HandlerOutcome.objects.get(record=record, handler=broken.mailer).status == "failed"
    # Still read-only.
    assert client.post(change_url(record), {"key": "x"}).status_code == 403


def test_change_permission_allows_the_action_and_nothing_else(broken: Broken) -> None:
    client = staff("change_eventrecord")
    record = EventRecord.objects.get(key="order_placed_1")
    assert "retry_failed_handlers" in client.get(CHANGELIST).content.decode()
    broken.broken = False
    response = run_action(client, [record])
    assert messages_of(response) == ["Retried 1 failed handler calls: 1 succeeded, 0 failed."]
    assert broken.mailed == ["order_placed_1"]

    assert client.post(change_url(record), {"key": "x", "group": "x"}).status_code == 403
    delete = reverse("admin:spark_decl_eventrecord_delete", args=[record.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    record.refresh_from_db()
    assert record.key == "order_placed_1"
