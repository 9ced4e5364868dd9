"""The admin as an operations console for claimed events and their handler outcomes.

Read-only: events and outcomes are written by spark_decl alone. The one thing staff can do
is the "Retry failed handlers" action, which runs :func:`spark_decl.retry.retry_records`,
the same code as ``retry_spark_events``, and needs the *change* permission on events
(viewing needs *view* or *change*, as everywhere in the admin).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import ValidationError
from django.db.models import (
    Count,
    Exists,
    F,
    JSONField,
    Model,
    OuterRef,
    QuerySet,
    Subquery,
)
from django.db.models.functions import Coalesce, JSONObject, Left
from django.http import HttpRequest
from django.urls import NoReverseMatch, URLPattern, reverse
from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext_lazy as _

from .context import stored_model, stored_scalar, wraps_dict
from .dashboard import dashboard_urls
from .models import EventRecord, HandlerOutcome
from .outcomes import TRACEBACK_MAX_CHARS, clip
from .retry import retry_records

CONTEXT_PREVIEW_CHARS = 5_000
#: The list's "problem" column shows this much of the problem; its title all of it, up to
#: PROBLEM_ERROR_CHARS of the error (the change page has the whole error).
PROBLEM_CHARS = 120
PROBLEM_ERROR_CHARS = 1_000
# The class of the admin's <pre> and error text: stylesheet spark_decl/admin.css wraps it.
WRAP_CLASS = "spark-decl-wrap"
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
                '<em>{}</em><br><span class="{}">{}</span>',
                _("error of an earlier attempt:"),
                WRAP_CLASS,
                obj.last_error,
            )
        return format_html('<span class="{}">{}</span>', WRAP_CLASS, obj.last_error)

    @admin.display(description=_("traceback"))
    def traceback_display(self, obj: HandlerOutcome) -> SafeString | str:
        if not obj.traceback:
            return "-"
        # Stored tracebacks are already this long at most; a row written some other way
        # is cut the same way, keeping the first and the last exception.
        text = clip(obj.traceback, TRACEBACK_MAX_CHARS)
        summary = _("show (earlier attempt)") if is_history(obj) else _("show")
        return format_html(
            '<details><summary>{}</summary><pre class="{}">{}</pre></details>',
            summary,
            WRAP_CLASS,
            text,
        )


def is_history(outcome: HandlerOutcome) -> bool:
    """Whether the outcome's error is from an attempt before the one that succeeded.

    A successful retry keeps the error of the failed attempt before it: it tells what went
    wrong (and may again), but it is no longer the call's state.
    """
    return outcome.status == HandlerOutcome.Status.DONE


# -- the list's "problem" column ---------------------------------------------------------------

# The states in which a call's error is its state; a done call's error is history.
FAILING = ("failed", "given_up")


def newest_problem() -> Subquery:
    """The event's newest failing call (``handler``, ``status``, ``attempts`` and the start
    of ``error``) as one JSON object, from one subquery.

    Correlated, like :func:`count_outcomes`: computed for the rows shown only, in the
    page's one query."""
    failing = HandlerOutcome.objects.filter(record=OuterRef("pk"), status__in=FAILING)
    problem = JSONObject(
        handler=F("handler"),
        status=F("status"),
        attempts=F("attempts"),
        # One character more than shown: tells whether there is more.
        error=Left("last_error", PROBLEM_ERROR_CHARS + 1),
    )
    return Subquery(failing.order_by("-pk").values(problem=problem)[:1], output_field=JSONField())


def describe_problem(handler: str, status: str, attempts: int, error: str) -> str:
    """``send_mail failed (attempt 3): ValueError: boom``."""
    if status == "given_up":
        text = _("%(handler)s given up after %(attempts)d attempts") % {
            "handler": handler,
            "attempts": attempts,
        }
    else:
        text = _("%(handler)s failed (attempt %(attempts)d)") % {
            "handler": handler,
            "attempts": attempts,
        }
    return f"{text}: {error}" if error else text


# -- the stored context ------------------------------------------------------------------------

# Where get_object leaves the request for context_preview, which Django calls with the
# object alone (a per-request object: the admin instance is shared between threads).
REQUEST_ATTRIBUTE = "_spark_decl_admin_request"


# eq=False: each reference is one spot in the context (and its stored pk may be a list).
@dataclass(frozen=True, eq=False)
class Reference:
    """A model instance stored in a context: ``{"__spark__": "model", "model": ..., "pk": ...}``
    (see :mod:`spark_decl.context`)."""

    label: str
    pk: Any

    def text(self, label: str | None = None) -> str:
        """``app.Model #pk``, with the stored label unless given the model's."""
        pk = self.stored_pk()
        shown = json.dumps(self.pk, sort_keys=True) if pk is None else str(pk)
        return f"{label or self.label} #{shown}"

    def stored_pk(self) -> object:
        """The primary key as stored, rebuilt; ``None`` for what no key can be."""
        return stored_scalar(self.pk)


Piece = str | Reference


def as_reference(data: dict[str, Any]) -> Reference | None:
    stored = stored_model(data)
    return Reference(*stored) if stored is not None else None


def context_pieces(data: Any, level: int = 0, *, user_dict: bool = False) -> Iterator[Piece]:
    """The stored context as ``json.dumps(data, indent=2, sort_keys=True)`` writes it, with
    each stored model instance as one :class:`Reference` instead of its JSON.

    ``user_dict``: ``data`` is the value of a wrapped dict (``{"__spark__": "dict", ...}``),
    the user's own, which is never a reference whatever its keys.
    """
    if isinstance(data, dict):
        reference = None if user_dict else as_reference(data)
        if reference is not None:
            yield reference
            return
        if not data:
            yield "{}"
            return
        wrapper = not user_dict and wraps_dict(data)
        inner = "\n" + "  " * (level + 1)
        yield "{"
        for index, key in enumerate(sorted(data)):
            yield f"{',' if index else ''}{inner}{json.dumps(key)}: "
            yield from context_pieces(data[key], level + 1, user_dict=wrapper and key == "value")
        yield "\n" + "  " * level + "}"
    elif isinstance(data, list):
        if not data:
            yield "[]"
            return
        inner = "\n" + "  " * (level + 1)
        yield "["
        for index, item in enumerate(data):
            yield f"{',' if index else ''}{inner}"
            yield from context_pieces(item, level + 1)
        yield "\n" + "  " * level + "]"
    else:
        yield json.dumps(data, default=str)


def preview_pieces(data: Any, max_chars: int) -> tuple[list[Piece], int]:
    """The first ``max_chars`` characters of the context's pieces, and how many it has in
    all."""
    shown: list[Piece] = []
    total = 0
    for piece in context_pieces(data):
        size = len(piece) if isinstance(piece, str) else len(piece.text())
        if total < max_chars:
            if isinstance(piece, str) and total + size > max_chars:
                shown.append(piece[: max_chars - total])
            else:
                shown.append(piece)
        total += size
    return shown, total


@dataclass(frozen=True)
class Resolved:
    """What the page can say about a :class:`Reference`."""

    model: type[Model] | None  # None: no installed model has the stored label
    pk: object  # None: the stored primary key cannot be one of the model's
    exists: bool


def resolve(references: list[Reference]) -> dict[Reference, Resolved]:
    """Look the references up: one query per model, whatever the number of references.

    The model is the installed one the label names (``apps.get_model``): nothing a row
    says is imported."""
    by_label: dict[str, list[Reference]] = defaultdict(list)
    for reference in references:
        by_label[reference.label].append(reference)
    resolved: dict[Reference, Resolved] = {}
    for label, group in by_label.items():
        try:
            model = apps.get_model(label)
        except (LookupError, ValueError):
            resolved.update((reference, Resolved(None, None, False)) for reference in group)
            continue
        keys = {reference: primary_key(model, reference.stored_pk()) for reference in group}
        wanted = {pk for pk in keys.values() if pk is not None}
        found = set(model._base_manager.filter(pk__in=wanted).values_list("pk", flat=True))
        resolved.update(
            (reference, Resolved(model, pk, pk is not None and pk in found))
            for reference, pk in keys.items()
        )
    return resolved


def primary_key(model: type[Model], value: object) -> object:
    """``value`` as a valid primary key of ``model``, or ``None``: a lookup with anything
    else could fail the query (an int out of the column's range, a str for an int key)."""
    field = model._meta.pk
    if value is None:
        return None
    try:
        pk = field.to_python(value)
        field.run_validators(pk)
    except (ValidationError, TypeError, ValueError):
        return None
    return pk


def change_url(
    site: admin.AdminSite, request: HttpRequest | None, model: type[Model], pk: object
) -> str | None:
    """The admin page of the ``model`` instance ``pk``, if ``site`` has one this user may
    view."""
    if request is None or not site.is_registered(model):
        return None
    if not site.get_model_admin(model).has_view_permission(request):
        return None
    opts = model._meta
    try:
        return reverse(
            f"{site.name}:{opts.app_label}_{opts.model_name}_change", args=[quote(str(pk))]
        )
    except NoReverseMatch:
        return None


def render_reference(
    reference: Reference, found: Resolved, site: admin.AdminSite, request: HttpRequest | None
) -> SafeString:
    if found.model is None:
        return format_html("{} <em>{}</em>", reference.text(), _("(model not installed)"))
    text = reference.text(found.model._meta.label)
    if not found.exists:
        return format_html("{} <em>{}</em>", text, _("(no longer exists)"))
    url = change_url(site, request, found.model, found.pk)
    return format_html('<a href="{}">{}</a>', url, text) if url else escape(text)


@admin.register(EventRecord)
class EventRecordAdmin(ReadOnlyMixin, ModelAdminBase):
    list_display = ("key", "group", "created_at", "outcome_summary", "problem")
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

    class Media:
        css = {"all": ("spark_decl/admin.css",)}

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
                newest_problem=newest_problem(),
            )
        )

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> EventRecord | None:
        record = super().get_object(request, object_id, from_field)
        if record is not None:
            setattr(record, REQUEST_ATTRIBUTE, request)
        return record

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

    @admin.display(description=_("problem"))
    def problem(self, obj: EventRecord) -> SafeString | str:
        problem: dict[str, Any] | None = getattr(obj, "newest_problem", None)
        if not problem:
            return "-"
        error: str = problem["error"] or ""
        if len(error) > PROBLEM_ERROR_CHARS:
            error = error[:PROBLEM_ERROR_CHARS] + "…"
        text = describe_problem(problem["handler"], problem["status"], problem["attempts"], error)
        # One line in the list, however the error is laid out.
        short = " ".join(text.split())
        if len(short) > PROBLEM_CHARS:
            short = short[: PROBLEM_CHARS - 1] + "…"
        return format_html('<span title="{}">{}</span>', text, short)

    @admin.display(description=_("context"))
    def context_preview(self, obj: EventRecord) -> SafeString:
        """The context as pretty JSON, each stored model instance a link to its admin page
        (or saying that it no longer exists)."""
        try:
            pieces, total = preview_pieces(obj.context, CONTEXT_PREVIEW_CHARS)
        except RecursionError:
            return format_html("<p>{}</p>", _("The context is nested too deeply to show."))
        references = [piece for piece in pieces if isinstance(piece, Reference)]
        found = resolve(references)
        request = getattr(obj, REQUEST_ATTRIBUTE, None)
        html = [
            render_reference(piece, found[piece], self.admin_site, request)
            if isinstance(piece, Reference)
            else escape(piece)
            for piece in pieces
        ]
        if total > CONTEXT_PREVIEW_CHARS:
            html.append(escape(f"\n… ({total} characters in all)"))
        # Every piece is escaped above.
        return format_html('<pre class="{}">{}</pre>', WRAP_CLASS, mark_safe("".join(html)))
