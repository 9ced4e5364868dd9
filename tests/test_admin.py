"""The read-only admin for claimed events (the operations side: test_admin_ops.py)."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils.html import escape
from hypothesis import given
from hypothesis import strategies as st
from pytest_django import Settings

import spark_decl
from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.admin import context_pieces
from spark_decl.dispatch import claim_and_run
from spark_decl.models import EventRecord
from spark_decl.registry import Registry
from spark_decl.validation import validate_event
from tests.testapp.models import Challenge

ROOT = Path(__file__).resolve().parent.parent

CHANGELIST = reverse("admin:spark_decl_eventrecord_changelist")


@pytest.fixture(autouse=True)
def fast_passwords(settings: Settings) -> None:
    """admin_client's superuser needs a password hash; the default hasher is slow by design."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(params=["claimed_then_run", "run_at_claim"])
def events(
    request: pytest.FixtureRequest, transactional_db: None, isolated_registry: Registry
) -> dict[str, EventRecord]:
    """challenge_created_1 (handled), challenge_ended_2 (one handler failed), other_3.

    Claimed and then run, or run in the claiming transaction, as a save does."""

    @handles(r"^challenge_ended$")
    def explode(event: Event[Any]) -> None:
        raise RuntimeError("boom")

    made = [
        event("challenge_created", 1, {"note": "<b>bold</b>"}),
        event("challenge_ended", 2),
        event("other", 3),
    ]
    if request.param == "claimed_then_run":
        process_events(only_new_events(made))
    else:
        claim_and_run([validate_event(candidate) for candidate in made], using="default")
    return {record.key: record for record in EventRecord.objects.all()}


def changelist_keys(client: Client, query: str = "") -> list[str]:
    response = client.get(f"{CHANGELIST}{query}")
    assert response.status_code == 200
    return sorted(record.key for record in response.context["cl"].result_list)


def test_changelist_lists_every_event(
    admin_client: Client, events: dict[str, EventRecord]
) -> None:
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    content = response.content.decode()
    for key in events:
        assert key in content
    assert "1/1 done" in content
    assert "1/2 done, 1 failed" in content
    assert changelist_keys(admin_client) == sorted(events)


def test_changelist_filters_by_group(admin_client: Client, events: dict[str, EventRecord]) -> None:
    assert changelist_keys(admin_client, "?group=challenge_ended") == ["challenge_ended_2"]
    assert changelist_keys(admin_client, "?group=other") == ["other_3"]


def test_changelist_filters_by_outcome_status(
    admin_client: Client, events: dict[str, EventRecord]
) -> None:
    response = admin_client.get(CHANGELIST)
    assert "?status=failed" in response.content.decode()
    assert changelist_keys(admin_client, "?status=failed") == ["challenge_ended_2"]
    assert changelist_keys(admin_client, "?status=done") == [
        "challenge_created_1",
        "challenge_ended_2",
    ]
    assert changelist_keys(admin_client, "?status=given_up") == []
    # Filtering through the outcomes must not distort the per-event counts.
    filtered = admin_client.get(f"{CHANGELIST}?status=done").content.decode()
    assert "1/2 done, 1 failed" in filtered
    assert "1/1 done" in filtered


def test_changelist_searches_by_key(admin_client: Client, events: dict[str, EventRecord]) -> None:
    assert changelist_keys(admin_client, "?q=ended_2") == ["challenge_ended_2"]
    assert changelist_keys(admin_client, "?q=challenge") == [
        "challenge_created_1",
        "challenge_ended_2",
    ]
    assert changelist_keys(admin_client, "?q=nothing") == []


def test_change_view_shows_the_event_read_only(
    admin_client: Client, events: dict[str, EventRecord]
) -> None:
    record = events["challenge_ended_2"]
    url = reverse("admin:spark_decl_eventrecord_change", args=[record.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    content = response.content.decode()
    assert "challenge_ended_2" in content
    assert "RuntimeError: boom" in content
    assert 'name="_save"' not in content

    escaped = admin_client.get(
        reverse("admin:spark_decl_eventrecord_change", args=[events["challenge_created_1"].pk])
    ).content.decode()
    assert "&lt;b&gt;bold&lt;/b&gt;" in escaped
    assert "<b>bold</b>" not in escaped

    response = admin_client.post(url, {"key": "changed", "group": "changed"})
    assert response.status_code == 403
    record.refresh_from_db()
    assert record.key == "challenge_ended_2"


def test_no_add_change_or_delete(admin_client: Client, events: dict[str, EventRecord]) -> None:
    record = events["other_3"]
    assert admin_client.get(reverse("admin:spark_decl_eventrecord_add")).status_code == 403
    delete_url = reverse("admin:spark_decl_eventrecord_delete", args=[record.pk])
    assert admin_client.post(delete_url, {"post": "yes"}).status_code == 403
    assert EventRecord.objects.filter(pk=record.pk).exists()

    model_admin = admin.site.get_model_admin(EventRecord)
    request = RequestFactory().get("/")
    request.user = response_user(admin_client)
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, record)
    assert not model_admin.has_delete_permission(request, record)
    assert model_admin.has_view_permission(request, record)
    for inline in model_admin.get_inline_instances(request, record):
        assert not inline.has_add_permission(request, record)
        assert not inline.has_change_permission(request, record)
        assert not inline.has_delete_permission(request, record)


def response_user(client: Client) -> Any:
    return client.get(CHANGELIST).wsgi_request.user


# -- model instances in the context ----------------------------------------------------------


def claim_with_context(context: dict[str, Any]) -> EventRecord:
    """One claimed event (group ``shown``, no handler) with ``context``."""
    process_events(only_new_events([event("shown", EventRecord.objects.count() + 1, context)]))
    return EventRecord.objects.order_by("-pk")[0]


def store_context(context: dict[str, Any]) -> EventRecord:
    """An event whose stored context is ``context`` as it is, as a row written some other
    way (or by an older version) may hold."""
    record = claim_with_context({})
    EventRecord.objects.filter(pk=record.pk).update(context=context)
    return record


def context_html(client: Client, record: EventRecord) -> str:
    """The context on ``record``'s page, with ``&quot;`` read as ``"`` (for the asserts)."""
    response = client.get(reverse("admin:spark_decl_eventrecord_change", args=[record.pk]))
    assert response.status_code == 200
    found = re.search(r'<pre class="spark-decl-wrap">(.*?)</pre>', response.content.decode(), re.S)
    assert found is not None
    return found.group(1).replace("&quot;", '"')


def user_url(user: User) -> str:
    return reverse("admin:auth_user_change", args=[user.pk])


def staff_client(*permissions: tuple[str, str]) -> Client:
    """A staff user (not a superuser) with ``permissions``, each (app label, codename)."""
    user = User.objects.create_user(username=f"staff{User.objects.count()}", is_staff=True)
    for app_label, codename in permissions:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    client = Client()
    client.force_login(user)
    return client


def test_a_stored_instance_links_to_its_admin_page(admin_client: Client, db: None) -> None:
    alice = User.objects.create_user(username="alice")
    challenge = Challenge.objects.create(title="Run")
    record = claim_with_context({"by": alice, "challenge": challenge, "note": "kept"})
    html = context_html(admin_client, record)
    assert f'"by": <a href="{user_url(alice)}">auth.User #{alice.pk}</a>,' in html
    # Challenge has no admin in this site: its label, as text.
    assert f'"challenge": testapp.Challenge #{challenge.pk},' in html
    assert "<a" not in html.split('"challenge"')[1]
    assert '"note": "kept"' in html


def test_the_link_needs_the_permission_to_view_the_instance(db: None) -> None:
    alice = User.objects.create_user(username="alice")
    record = claim_with_context({"by": alice})
    events_only = staff_client(("spark_decl", "view_eventrecord"))
    assert context_html(events_only, record) == f'{{\n  "by": auth.User #{alice.pk}\n}}'
    with_users = staff_client(("spark_decl", "view_eventrecord"), ("auth", "view_user"))
    assert f'<a href="{user_url(alice)}">' in context_html(with_users, record)


def test_a_deleted_instance_is_shown_as_gone(admin_client: Client, db: None) -> None:
    alice, bob = User.objects.create_user("alice"), User.objects.create_user("bob")
    record = claim_with_context({"people": [alice, bob]})
    gone = bob.pk
    bob.delete()
    html = context_html(admin_client, record)
    assert f'<a href="{user_url(alice)}">auth.User #{alice.pk}</a>' in html
    assert f"auth.User #{gone} <em>(no longer exists)</em>" in html
    assert f"/auth/user/{gone}/" not in html


def test_one_query_per_model_whatever_the_number_of_instances(
    admin_client: Client, db: None
) -> None:
    users = [User.objects.create_user(f"user{n}") for n in range(5)]
    challenges = [Challenge.objects.create(title=f"c{n}") for n in range(5)]
    record = claim_with_context({"users": users, "challenges": challenges, "first": users[0]})
    url = reverse("admin:spark_decl_eventrecord_change", args=[record.pk])
    with CaptureQueriesContext(connection) as queries:
        content = admin_client.get(url).content.decode()
    assert content.count('/change/">auth.User #') == 6
    # (The other query of auth_user is the session's user.)
    for table in ("auth_user", "testapp_challenge"):
        sqls = [query["sql"] for query in queries.captured_queries]
        lookups = [sql for sql in sqls if f'FROM "{table}"' in sql and " IN (" in sql]
        assert len(lookups) == 1, lookups


def test_what_no_installed_model_matches_is_shown_as_stored(
    admin_client: Client, db: None
) -> None:
    alice = User.objects.create_user(username="alice")
    record = store_context(
        {
            "a_uninstalled": {"__spark__": "model", "model": "nowhere.gone", "pk": 1},
            "b_no_app_label": {"__spark__": "model", "model": "user", "pk": 1},
            "c_list_pk": {"__spark__": "model", "model": "auth.user", "pk": [alice.pk]},
            "d_str_pk": {"__spark__": "model", "model": "auth.user", "pk": "abc"},
            "e_huge_pk": {"__spark__": "model", "model": "auth.user", "pk": 10**30},
            "f_ok": {"__spark__": "model", "model": "auth.user", "pk": alice.pk},
        }
    )
    html = context_html(admin_client, record)
    assert '"a_uninstalled": nowhere.gone #1 <em>(model not installed)</em>' in html
    assert '"b_no_app_label": user #1 <em>(model not installed)</em>' in html
    assert f'"c_list_pk": auth.User #[{alice.pk}] <em>(no longer exists)</em>' in html
    assert '"d_str_pk": auth.User #abc <em>(no longer exists)</em>' in html
    assert f'"e_huge_pk": auth.User #{10**30} <em>(no longer exists)</em>' in html
    assert f'"f_ok": <a href="{user_url(alice)}">' in html


def test_a_users_dict_that_looks_like_a_reference_is_shown_as_data(
    admin_client: Client, db: None
) -> None:
    alice = User.objects.create_user(username="alice")
    lookalike = {"__spark__": "model", "model": "auth.user", "pk": alice.pk}
    # Stored wrapped ({"__spark__": "dict", "value": ...}): it is the user's dict.
    html = context_html(admin_client, claim_with_context({"data": lookalike}))
    assert "<a" not in html
    assert '"model": "auth.user"' in html


def test_everything_in_the_context_is_escaped(admin_client: Client, db: None) -> None:
    attack = "<script>alert(1)</script>"
    record = store_context(
        {
            attack: attack,
            "ref": {"__spark__": "model", "model": attack, "pk": attack},
            "pk": {"__spark__": "model", "model": "auth.user", "pk": attack},
        }
    )
    content = admin_client.get(
        reverse("admin:spark_decl_eventrecord_change", args=[record.pk])
    ).content.decode()
    assert "<script>alert" not in content
    assert escape(attack) in content


def test_the_context_reads_as_indented_json(admin_client: Client, db: None) -> None:
    context = {"b": [1, 2.5, None, True], "a": {"x": "é", "y": {}}, "c": []}
    html = context_html(admin_client, claim_with_context(context))
    assert html == escape(json.dumps(context, indent=2, sort_keys=True)).replace("&quot;", '"')


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_without_references_the_pieces_are_exactly_json_dumps(data: Any) -> None:
    pieces = list(context_pieces(data))
    assert all(isinstance(piece, str) for piece in pieces)
    assert "".join(str(piece) for piece in pieces) == json.dumps(data, indent=2, sort_keys=True)


def test_the_stylesheet_that_wraps_long_lines_is_on_the_pages(
    admin_client: Client, db: None
) -> None:
    css = Path(spark_decl.__file__).parent / "static" / "spark_decl" / "admin.css"
    assert "white-space: pre-wrap" in css.read_text()
    record = claim_with_context({})
    for url in (CHANGELIST, reverse("admin:spark_decl_eventrecord_change", args=[record.pk])):
        assert "spark_decl/admin.css" in admin_client.get(url).content.decode()
    # Shipped in the distribution: package-data covers every static file.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["spark_decl"]
    package = Path(spark_decl.__file__).parent
    for path in (package / "static").rglob("*"):
        if path.is_file():
            relative = path.relative_to(package).as_posix()
            assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_a_context_nested_beyond_pythons_limits_is_reported(
    admin_client: Client, db: None
) -> None:
    record = claim_with_context({})
    # Deeper than Python can follow while rendering a page (SQLite takes at most 1,000
    # levels): a row only SQL could write.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE spark_decl_eventrecord SET context = %s WHERE id = %s",
            ["[" * 999 + "]" * 999, record.pk],
        )
    response = admin_client.get(reverse("admin:spark_decl_eventrecord_change", args=[record.pk]))
    assert response.status_code == 200
    assert "The context is nested too deeply to show." in response.content.decode()
