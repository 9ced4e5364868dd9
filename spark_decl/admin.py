"""A read-only admin for claimed events and their handler outcomes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from .models import EventRecord, HandlerOutcome

CONTEXT_PREVIEW_CHARS = 5_000

# The admin classes are generic only for the type checker (django-stubs).
if TYPE_CHECKING:
    InlineBase = admin.TabularInline[HandlerOutcome, EventRecord]
    ModelAdminBase = admin.ModelAdmin[EventRecord]
else:
    InlineBase = admin.TabularInline
    ModelAdminBase = admin.ModelAdmin


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class HandlerOutcomeInline(ReadOnlyMixin, InlineBase):
    model = HandlerOutcome
    extra = 0
    fields = (
        "handler",
        "status",
        "attempts",
        "created_at",
        "finished_at",
        "next_attempt_at",
        "last_error",
    )
    readonly_fields = fields
    can_delete = False


@admin.register(EventRecord)
class EventRecordAdmin(ReadOnlyMixin, ModelAdminBase):
    list_display = ("key", "group", "created_at", "outcome_summary")
    list_filter = ("group", "outcomes__status", "created_at")
    search_fields = ("key",)
    date_hierarchy = "created_at"
    fields = ("key", "group", "created_at", "context_preview")
    readonly_fields = fields
    inlines = (HandlerOutcomeInline,)
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[EventRecord]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                outcomes_total=Count("outcomes"),
                outcomes_done=Count("outcomes", filter=Q(outcomes__status="done")),
                outcomes_failed=Count(
                    "outcomes", filter=Q(outcomes__status__in=["failed", "given_up"])
                ),
            )
        )

    @admin.display(description=_("handlers"))
    def outcome_summary(self, obj: EventRecord) -> str:
        total = getattr(obj, "outcomes_total", 0)
        if not total:
            return "-"
        done = getattr(obj, "outcomes_done", 0)
        failed = getattr(obj, "outcomes_failed", 0)
        text = f"{done}/{total} done"
        return f"{text}, {failed} failed" if failed else text

    @admin.display(description=_("context"))
    def context_preview(self, obj: EventRecord) -> str:
        text = json.dumps(obj.context, indent=2, sort_keys=True, default=str)
        if len(text) > CONTEXT_PREVIEW_CHARS:
            text = f"{text[:CONTEXT_PREVIEW_CHARS]}\n… ({len(text)} characters in all)"
        return format_html("<pre>{}</pre>", text)
