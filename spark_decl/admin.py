"""The admin as an operations console for claimed events and their handler outcomes.

Read-only: events and outcomes are written by spark_decl alone. The one thing staff can do
is the "Retry failed handlers" action, which runs :func:`spark_decl.retry.retry_records`,
the same code as ``retry_spark_events``, and needs the *change* permission on events
(viewing needs *view* or *change*, as everywhere in the admin).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db.models import Count, Exists, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import URLPattern
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .dashboard import dashboard_urls
from .models import EventRecord, HandlerOutcome
from .outcomes import TRACEBACK_MAX_CHARS, clip
from .retry import retry_records

CONTEXT_PREVIEW_CHARS = 5_000
# The filters' query parameters. Constants, because django-stubs declares
# SimpleListFilter.parameter_name as ``str | None``.
STATUS_PARAMETER = "status"
HANDLER_PARAMETER = "handler"

# The admin classes are generic only for the type checker (django-stubs).
if TYPE_CHECKING:
    InlineBase = admin.TabularInline[HandlerOutcome, EventRecord]
    ModelAdminBase = admin.ModelAdmin[EventRecord]
else:
    InlineBase = admin.TabularInline
    ModelAdminBase = admin.ModelAdmin


def has_event_permission(request: HttpRequest, action: str) -> bool:
    opts = EventRecord._meta
    # has_perm is on the AUTH_USER_MODEL, which only django-stubs' mypy plugin resolves.
    return request.user.has_perm(  # pyright: ignore[reportAttributeAccessIssue]
        f"{opts.app_label}.{get_permission_codename(action, opts)}"
    )


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def count_outcomes(**filters: Any) -> Coalesce:
    """The number of the event's outcomes matching ``filters``, as a subquery."""
    matching = (
        HandlerOutcome.objects.filter(record=OuterRef("pk"), **filters)
        .order_by()
        .values("record")
        .annotate(count=Count("pk"))
        .values("count")
    )
    return Coalesce(Subquery(matching), 0)


# -- filters -------------------------------------------------------------------------------


def outcome_exists(request: HttpRequest) -> Exists:
    """Events with an outcome matching both the status and the handler filter, so that
    "failed" + "send_mail" means *send_mail failed*, not "something failed and send_mail
    ran". ``Exists`` rather than a join keeps each event once and its counts intact."""
    status = request.GET.get(STATUS_PARAMETER)
    handler = request.GET.get(HANDLER_PARAMETER)
    wanted = {name: value for name, value in (("status", status), ("handler", handler)) if value}
    return Exists(HandlerOutcome.objects.filter(record=OuterRef("pk"), **wanted))


class OutcomeStatusFilter(admin.SimpleListFilter):
    title = _("handler status")
    parameter_name = STATUS_PARAMETER

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[Any, str]]:
        return [(value, str(label)) for value, label in HandlerOutcome.Status.choices]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if not self.value():
            return queryset
        return queryset.filter(outcome_exists(request))


class HandlerFilter(admin.SimpleListFilter):
    title = _("handler")
    parameter_name = HANDLER_PARAMETER

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[Any, str]]:
        names = HandlerOutcome.objects.order_by("handler").values_list("handler", flat=True)
        return [(name, name) for name in names.distinct()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        # With a status chosen too, OutcomeStatusFilter already applied both.
        if not self.value() or request.GET.get(STATUS_PARAMETER):
            return queryset
        return queryset.filter(outcome_exists(request))


# -- the event and its outcomes --------------------------------------------------------------


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
        "error_display",
        "traceback_display",
    )
    readonly_fields = fields
    can_delete = False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Outcomes are part of the event: whoever may see an event sees them.
        return has_event_permission(request, "view") or has_event_permission(request, "change")

    @admin.display(description=_("last error"))
    def error_display(self, obj: HandlerOutcome) -> SafeString | str:
        if not obj.last_error:
            return "-"
        if is_history(obj):
            return format_html(
                "<em>{}</em><br>{}", _("error of an earlier attempt:"), obj.last_error
            )
        return obj.last_error

    @admin.display(description=_("traceback"))
    def traceback_display(self, obj: HandlerOutcome) -> SafeString | str:
        if not obj.traceback:
            return "-"
        # Stored tracebacks are already this long at most; a row written some other way
        # is cut the same way, keeping the first and the last exception.
        text = clip(obj.traceback, TRACEBACK_MAX_CHARS)
        summary = _("show (earlier attempt)") if is_history(obj) else _("show")
        return format_html("<details><summary>{}</summary><pre>{}</pre></details>", summary, text)


def is_history(outcome: HandlerOutcome) -> bool:
    """Whether the outcome's error is from an attempt before the one that succeeded.

    A successful retry keeps the error of the failed attempt before it: it tells what went
    wrong (and may again), but it is no longer the call's state.
    """
    return outcome.status == HandlerOutcome.Status.DONE


@admin.register(EventRecord)
class EventRecordAdmin(ReadOnlyMixin, ModelAdminBase):
    list_display = ("key", "group", "created_at", "outcome_summary")
    list_filter = ("group", OutcomeStatusFilter, HandlerFilter, "created_at")
    search_fields = ("key",)
    # No date_hierarchy: created_at has no index (see EventRecord), and the hierarchy's
    # date query would read the whole table on every page. The created_at filter's
    # ranges end now, and the newest events, which match them, come first in -pk order.
    fields = ("key", "group", "created_at", "context_preview")
    readonly_fields = fields
    inlines = (HandlerOutcomeInline,)
    actions = ("retry_failed_handlers",)
    show_full_result_count = False
    # The list with a link to the Event health page (spark_decl.dashboard).
    change_list_template = "admin/spark_decl/eventrecord/change_list.html"

    def get_urls(self) -> list[URLPattern]:
        return [*dashboard_urls(self), *super().get_urls()]

    def get_queryset(self, request: HttpRequest) -> QuerySet[EventRecord]:
        # Counts as correlated subqueries: one query for the whole page, computed only for
        # the rows shown (a Count() over a join would make the filters' queries group the
        # whole table). The context can be large and is only read on the change page.
        return (
            super()
            .get_queryset(request)
            .defer("context")
            .annotate(
                outcomes_total=count_outcomes(),
                outcomes_done=count_outcomes(status__in=["done"]),
                outcomes_failed=count_outcomes(status__in=["failed", "given_up"]),
            )
        )

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return has_event_permission(request, "change")

    @admin.action(description=_("Retry failed handlers"), permissions=["retry"])
    def retry_failed_handlers(self, request: HttpRequest, queryset: QuerySet[EventRecord]) -> None:
        result = retry_records(queryset)
        if not result.due:
            self.message_user(
                request, _("No failed handler calls in the selected events."), messages.WARNING
            )
            return
        text = _(
            "Retried %(due)d failed handler calls: %(succeeded)d succeeded, %(failed)d failed."
        ) % {"due": result.due, "succeeded": result.succeeded, "failed": result.failed}
        if result.skipped:
            text += " " + _("%(skipped)d were done by another process.") % {
                "skipped": result.skipped
            }
        if result.unknown_handler:
            text += " " + _("%(unknown)d have no registered handler.") % {
                "unknown": result.unknown_handler
            }
        ok = not result.failed and not result.unknown_handler
        self.message_user(request, text, messages.SUCCESS if ok else messages.WARNING)

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
    def context_preview(self, obj: EventRecord) -> SafeString:
        text = json.dumps(obj.context, indent=2, sort_keys=True, default=str)
        if len(text) > CONTEXT_PREVIEW_CHARS:
            text = f"{text[:CONTEXT_PREVIEW_CHARS]}\n… ({len(text)} characters in all)"
        return format_html("<pre>{}</pre>", text)
