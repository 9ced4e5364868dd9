"""The read-only admin for claimed events (the operations side: test_admin_ops.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.test import Client, RequestFactory
from django.urls import reverse
from pytest_django import Settings

from spark_decl import Event, event, handles, only_new_events, process_events
from spark_decl.dispatch import claim_and_run
from spark_decl.models import EventRecord
from spark_decl.registry import Registry
from spark_decl.validation import validate_event

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
