"""The batch at scale: ``queryset=`` restrictions, ``process_queryset`` and its modes, keyset
pagination, and the options and output of ``process_spark_sources``."""

from __future__ import annotations

import datetime as dt
import gc
import logging
import re
from collections import Counter
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import Model, QuerySet
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pytest_django import Settings

from spark_decl import Event, event, event_source, handles, process_queryset
from spark_decl.exceptions import InvalidContext, RegistrationError
from spark_decl.management.commands.process_spark_sources import Command
from spark_decl.models import EventRecord, HandlerOutcome
from spark_decl.registry import Registry, SourceSpec, function_name
from spark_decl.sources import process_model
from spark_decl.testing import capture_events
from spark_decl.types import BatchResult, DispatchResult, Mode
from tests.conftest import logged_keys
from tests.testapp.models import Challenge, Donation, HandlerLog

CHALLENGES = Challenge._meta.db_table
DONATIONS = Donation._meta.db_table


class TTY(StringIO):
    """An output stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def selects_from(context: CaptureQueriesContext, table: str) -> list[str]:
    """The captured SELECTs whose main table (the first ``FROM``) is ``table``."""
    found = []
    for query in context.captured_queries:
        sql = query["sql"]
        main = re.search(r'\bFROM\s+"?(\w+)"?', sql)
        if sql.lstrip().upper().startswith("SELECT") and main and main.group(1) == table:
            found.append(sql)
    return found


def statements(context: CaptureQueriesContext) -> list[str]:
    """The captured SQL minus transaction control, which backends log differently."""
    control = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
    return [q["sql"] for q in context.captured_queries if not q["sql"].upper().startswith(control)]


def created(*challenges: Challenge) -> list[str]:
    return [f"challenge_created_{challenge.pk}" for challenge in challenges]


def claimed_keys() -> set[str]:
    return set(EventRecord.objects.values_list("key", flat=True))


def run(*args: str, stderr: StringIO | None = None) -> str:
    """``process_spark_sources`` with ``args``; its stdout without the timing."""
    out = StringIO()
    call_command("process_spark_sources", *args, stdout=out, stderr=stderr or StringIO())
    return re.sub(r" in [0-9.]+s$", "", out.getvalue(), flags=re.MULTILINE)


@pytest.fixture
def bare_registry(isolated_registry: Registry) -> Registry:
    """An empty registry: only what the test registers runs (testapp's come back after)."""
    isolated_registry.clear()
    return isolated_registry


# -- @event_source(Model, queryset=...) ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_batch_scans_only_the_rows_of_the_sources_queryset(
    isolated_registry: Registry,
) -> None:
    seen: list[int] = []

    @event_source(
        Challenge, on_save=False, queryset=lambda: Challenge.objects.filter(is_active=True)
    )
    def active_only(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        seen.append(challenge.pk)
        yield event("reminder", challenge.pk)

    today = timezone.localdate()
    first, second = Challenge.objects.bulk_create(
        [Challenge(title="first"), Challenge(title="second")]
    )
    (ended,) = Challenge.objects.bulk_create(
        [Challenge(title="ended", is_active=False, end_date=today - dt.timedelta(days=1))]
    )

    run("--model", "testapp.Challenge")

    assert seen == [first.pk, second.pk]
    reminders = {key for key in claimed_keys() if key.startswith("reminder_")}
    assert reminders == {f"reminder_{first.pk}", f"reminder_{second.pk}"}
    # testapp's sources have no queryset=: they still scan the default manager, inactive
    # rows included.
    assert f"challenge_ended_{ended.pk}" in logged_keys()
    assert set(created(first, second)) <= set(logged_keys())


@pytest.mark.django_db(transaction=True)
def test_the_queryset_callable_is_called_for_each_batch_not_at_registration(
    bare_registry: Registry,
) -> None:
    calls: list[str] = []

    def candidates() -> QuerySet[Challenge]:
        calls.append("called")
        return Challenge.objects.filter(title__startswith="due")

    @event_source(Challenge, on_save=False, queryset=candidates)
    def due(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("due", challenge.pk)

    assert calls == []
    (early,) = Challenge.objects.bulk_create([Challenge(title="due early")])

    assert process_model(Challenge).new == 1
    assert calls == ["called"]

    # A row created after the first batch is found by the next one: a fresh queryset.
    (late,) = Challenge.objects.bulk_create([Challenge(title="due late")])
    assert process_model(Challenge).new == 1
    assert calls == ["called", "called"]
    assert claimed_keys() == {f"due_{early.pk}", f"due_{late.pk}"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("related", "lazy_loads"), [(True, 0), (False, 12)])
def test_select_related_in_the_queryset_is_honoured(
    bare_registry: Registry, related: bool, lazy_loads: int
) -> None:
    def donations() -> QuerySet[Donation]:
        queryset = Donation.objects.all()
        return queryset.select_related("challenge") if related else queryset

    @event_source(Donation, on_save=False, queryset=donations)
    def thanks(donation: Donation) -> Iterator[Event[dict[str, str]]]:
        yield event("thanks", donation.pk, {"title": donation.challenge.title})

    challenges = Challenge.objects.bulk_create(Challenge(title=f"c{i}") for i in range(3))
    Donation.objects.bulk_create(Donation(challenge=challenges[i % 3]) for i in range(4))

    with CaptureQueriesContext(connection) as few:
        process_model(Donation)
    Donation.objects.bulk_create(Donation(challenge=challenges[i % 3]) for i in range(8))
    with CaptureQueriesContext(connection) as many:
        result = process_model(Donation)

    assert (result.rows, result.new) == (12, 8)
    assert len(selects_from(many, CHALLENGES)) == lazy_loads
    if related:
        # Three times the rows, the same statements.
        assert len(statements(many)) == len(statements(few))
    assert EventRecord.objects.filter(group="thanks", context__title="c2").count() == 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("prefetch", "donation_selects"), [(True, 2), (False, 6)])
def test_prefetch_related_in_the_queryset_is_honoured(
    bare_registry: Registry, prefetch: bool, donation_selects: int
) -> None:
    def challenges() -> QuerySet[Challenge]:
        queryset = Challenge.objects.all()
        return queryset.prefetch_related("donations") if prefetch else queryset

    @event_source(Challenge, on_save=False, queryset=challenges)
    def raised(challenge: Challenge) -> Iterator[Event[dict[str, int]]]:
        total = sum(donation.amount for donation in challenge.donations.all())
        yield event("raised", challenge.pk, {"total": total})

    rows = Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(6))
    Donation.objects.bulk_create(
        Donation(challenge=challenge, amount=amount)
        for index, challenge in enumerate(rows)
        for amount in (index, 10)
    )

    with CaptureQueriesContext(connection) as context:
        result = process_model(Challenge, chunk_size=3)

    assert result.new == 6
    # One prefetch per chunk of three, not one query per challenge.
    assert len(selects_from(context, DONATIONS)) == donation_selects
    totals = dict(EventRecord.objects.filter(group="raised").values_list("key", "context"))
    assert totals == {f"raised_{c.pk}": {"total": i + 10} for i, c in enumerate(rows)}


@pytest.mark.django_db(transaction=True)
def test_a_queryset_of_another_model_is_an_error_naming_the_source_before_any_work(
    isolated_registry: Registry,
) -> None:
    def wrong_model() -> QuerySet[Any]:
        return Donation.objects.all()

    @event_source(Challenge, queryset=wrong_model)
    def misconfigured(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("never", challenge.pk)

    Challenge.objects.bulk_create([Challenge(title="x")])
    name = function_name(misconfigured)

    with pytest.raises(RegistrationError, match=rf"{re.escape(name)}.*testapp\.Donation"):
        process_model(Challenge)
    with pytest.raises(RegistrationError, match=re.escape(name)):
        run("--model", "testapp.Challenge")
    # testapp's own sources for Challenge (registered first) did not run either.
    assert not EventRecord.objects.exists()
    assert logged_keys() == []


@pytest.mark.django_db(transaction=True)
def test_a_queryset_callable_returning_something_else_is_an_error_naming_the_source(
    bare_registry: Registry,
) -> None:
    def a_list() -> Any:
        return list(Challenge.objects.all())

    @event_source(Challenge, queryset=a_list)
    def misconfigured(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("never", challenge.pk)

    Challenge.objects.bulk_create([Challenge(title="x")])
    with pytest.raises(RegistrationError, match=rf"{re.escape(function_name(misconfigured))}"):
        process_model(Challenge)


@pytest.mark.django_db(transaction=True)
def test_on_save_runs_a_restricted_source_for_any_saved_instance(
    bare_registry: Registry,
) -> None:
    handled: list[str] = []

    @event_source(Challenge, queryset=lambda: Challenge.objects.filter(is_active=True))
    def saved(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("saved", challenge.pk)

    @handles(r"^saved$")
    def record(event: Event[Any]) -> None:
        handled.append(event["key"])

    inactive = Challenge.objects.create(title="inactive", is_active=False)

    # queryset= restricts the batch only.
    assert handled == [f"saved_{inactive.pk}"]
    assert process_model(Challenge).rows == 0


# -- process_queryset ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_process_queryset_after_bulk_create_handles_each_event_once() -> None:
    today = timezone.localdate()
    ending, ended = Challenge.objects.bulk_create(
        [
            Challenge(title="ending", end_date=today + dt.timedelta(days=2)),
            Challenge(title="ended", is_active=False, end_date=today - dt.timedelta(days=1)),
        ]
    )
    assert logged_keys() == []  # bulk_create sends no post_save

    result = process_queryset(Challenge.objects.filter(pk__in=[ending.pk, ended.pk]))

    # The batch-only (on_save=False) source ran too: the two deadline events.
    expected = [
        f"challenge_created_{ending.pk}",
        f"challenge_ends_2d_{ending.pk}",
        f"challenge_ended_{ended.pk}",
    ]
    assert logged_keys() == expected
    assert (result.rows, result.events, result.new, result.source_errors) == (2, 3, 3, 0)
    assert result.dispatch == DispatchResult(events=3, calls=3, failed=0, skipped=0)

    again = process_queryset(Challenge.objects.filter(pk__in=[ending.pk, ended.pk]))
    assert (again.rows, again.events, again.new) == (2, 3, 0)
    assert again.dispatch == DispatchResult()
    assert logged_keys() == expected


@pytest.mark.django_db(transaction=True)
def test_process_queryset_after_queryset_update_handles_each_event_once() -> None:
    later = timezone.localdate() + dt.timedelta(days=30)
    first = Challenge.objects.create(title="first", is_active=False, end_date=later)
    second = Challenge.objects.create(title="second", is_active=False, end_date=later)
    untouched = Challenge.objects.create(title="untouched", is_active=False, end_date=later)
    assert logged_keys() == []

    pks = [first.pk, second.pk]
    Challenge.objects.filter(pk__in=pks).update(
        is_active=True, end_date=timezone.localdate() + dt.timedelta(days=1)
    )
    assert logged_keys() == []  # update() sends no post_save

    result = process_queryset(Challenge.objects.filter(pk__in=pks))

    assert logged_keys() == [
        f"challenge_created_{first.pk}",
        f"challenge_ends_2d_{first.pk}",
        f"challenge_created_{second.pk}",
        f"challenge_ends_2d_{second.pk}",
    ]
    assert (result.rows, result.new, result.dispatch.calls) == (2, 4, 4)
    assert process_queryset(Challenge.objects.filter(pk__in=pks)).new == 0
    assert process_queryset(Challenge.objects.all()).new == 0
    assert len(logged_keys()) == 4
    assert not any(key.endswith(f"_{untouched.pk}") for key in claimed_keys())


@pytest.mark.django_db(transaction=True)
def test_dry_run_counts_new_keys_and_writes_nothing(isolated_registry: Registry) -> None:
    @event_source(Challenge, on_save=False)
    def digest(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        # The same key from every instance: new once, however many rows produce it.
        yield event("digest", "today")

    seen = Challenge.objects.create(title="seen")  # its challenge_created is claimed on save
    unseen = Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(3))
    records, outcomes = EventRecord.objects.count(), HandlerOutcome.objects.count()
    assert logged_keys() == created(seen)

    with capture_events() as dispatched:
        result = process_queryset(Challenge.objects.all(), mode=Mode.DRY_RUN)

    assert (result.rows, result.events) == (4, 8)
    # Three unseen challenge_created keys and the digest; the seen key is not new.
    assert result.new == 4
    assert result.dispatch == DispatchResult()
    assert dispatched == []
    assert EventRecord.objects.count() == records
    assert HandlerOutcome.objects.count() == outcomes
    assert logged_keys() == created(seen)

    # What a real run then claims is what the dry run announced.
    assert process_queryset(Challenge.objects.all()).new == 4
    assert logged_keys() == [*created(seen), *created(*unseen)]
    assert "digest_today" in claimed_keys()


@pytest.mark.django_db(transaction=True)
def test_mark_only_claims_without_handlers_and_later_runs_handle_nothing() -> None:
    challenges = Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(3))
    with capture_events() as dispatched:
        result = process_queryset(Challenge.objects.all(), mode=Mode.MARK_ONLY)

    assert (result.rows, result.events, result.new) == (3, 3, 3)
    assert result.dispatch == DispatchResult()
    assert claimed_keys() == set(created(*challenges))
    assert not HandlerOutcome.objects.exists()
    assert logged_keys() == []
    assert dispatched == []

    assert process_queryset(Challenge.objects.all()).new == 0
    challenges[0].title = "saved again"
    challenges[0].save()
    assert logged_keys() == []
    assert not HandlerOutcome.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_on_source_error_gets_the_instance_source_and_exception_and_the_run_goes_on(
    isolated_registry: Registry,
) -> None:
    @event_source(Challenge, on_save=False)
    def picky(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        if challenge.title == "bad":
            raise LookupError(f"cannot handle {challenge.pk}")
        yield event("picky", challenge.pk)

    errors: list[tuple[Model, SourceSpec, Exception]] = []

    def on_source_error(instance: Model, source: SourceSpec, exc: Exception) -> None:
        errors.append((instance, source, exc))

    good, bad, other = Challenge.objects.bulk_create(
        Challenge(title=title) for title in ("good", "bad", "other")
    )

    result = process_queryset(
        Challenge.objects.all(), chunk_size=2, on_source_error=on_source_error
    )

    [(instance, source, exc)] = errors
    assert isinstance(instance, Challenge)
    assert instance.pk == bad.pk
    assert source.function is picky
    assert source.name == function_name(picky)
    assert isinstance(exc, LookupError)
    assert str(exc) == f"cannot handle {bad.pk}"
    assert (result.rows, result.source_errors, result.new) == (3, 1, 4)
    # None of the failing instance's events is claimed, not even other sources' ones.
    assert logged_keys() == created(good, other)
    assert claimed_keys() == {*created(good, other), f"picky_{good.pk}", f"picky_{other.pk}"}


@pytest.mark.django_db(transaction=True)
def test_on_chunk_is_called_once_per_chunk_with_running_totals() -> None:
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(7))
    totals: list[tuple[int, int, int, int]] = []

    def on_chunk(result: BatchResult) -> None:
        totals.append((result.rows, result.events, result.new, result.dispatch.calls))

    process_queryset(Challenge.objects.all(), chunk_size=3, on_chunk=on_chunk)

    assert totals == [(3, 3, 3, 3), (6, 6, 6, 6), (7, 7, 7, 7)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("rows", "selects"), [(10, 3), (8, 3), (3, 1), (0, 1)])
def test_chunk_size_bounds_every_read(rows: int, selects: int) -> None:
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(rows))

    with CaptureQueriesContext(connection) as context:
        result = process_queryset(Challenge.objects.all(), chunk_size=4)

    reads = selects_from(context, CHALLENGES)
    assert len(reads) == selects
    assert all(re.search(r"\bLIMIT 4\b", sql) for sql in reads)
    assert result.rows == rows
    assert len(logged_keys()) == rows


@pytest.mark.django_db(transaction=True)
def test_keyset_pagination_reads_each_row_once_while_handlers_add_rows(
    bare_registry: Registry,
) -> None:
    seen: list[int] = []
    originals = {c.pk for c in Challenge.objects.bulk_create(Challenge() for _ in range(10))}

    @event_source(Challenge, on_save=False)
    def track(challenge: Challenge) -> Iterator[Event[dict[str, int]]]:
        seen.append(challenge.pk)
        yield event("track", challenge.pk, {"pk": challenge.pk})

    @handles(r"^track$")
    def spawn(event: Event[dict[str, int]]) -> None:
        # Rows with higher primary keys, created while the batch runs.
        if event["context"]["pk"] in originals:
            Challenge.objects.create(title="spawned")

    process_queryset(Challenge.objects.all(), chunk_size=3)

    spawned = set(Challenge.objects.filter(title="spawned").values_list("pk", flat=True))
    assert len(spawned) == 10
    assert max(Counter(seen).values()) == 1
    assert originals <= set(seen)
    assert set(seen) <= originals | spawned
    assert seen == sorted(seen)
    assert EventRecord.objects.count() == len(seen)


@pytest.mark.django_db(transaction=True)
def test_keyset_pagination_survives_rows_deleted_during_the_run(
    bare_registry: Registry,
) -> None:
    seen: list[int] = []
    pks = [c.pk for c in Challenge.objects.bulk_create(Challenge() for _ in range(10))]

    @event_source(Challenge, on_save=False)
    def track(challenge: Challenge) -> Iterator[Event[dict[str, int]]]:
        seen.append(challenge.pk)
        yield event("track", challenge.pk, {"pk": challenge.pk})

    @handles(r"^track$")
    def delete(event: Event[dict[str, int]]) -> None:
        pk = event["context"]["pk"]
        # Every row deletes itself, so each chunk's last row (where the next chunk starts)
        # is gone before the next read; the second row also deletes one of the next chunk.
        Challenge.objects.filter(pk=pk).delete()
        if pk == pks[1]:
            Challenge.objects.filter(pk=pks[5]).delete()

    result = process_queryset(Challenge.objects.all(), chunk_size=3)

    assert seen == [pk for pk in pks if pk != pks[5]]
    assert result.rows == 9
    assert not Challenge.objects.exists()


# -- process_spark_sources options --------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", ""])
def test_a_bad_chunk_size_is_an_argument_error(value: str) -> None:
    Challenge.objects.bulk_create([Challenge(title="x")])
    with pytest.raises(CommandError, match="--chunk-size"):
        call_command("process_spark_sources", f"--chunk-size={value}", stdout=StringIO())
    assert not EventRecord.objects.exists()


@pytest.mark.django_db
def test_dry_run_and_mark_only_together_are_an_argument_error() -> None:
    Challenge.objects.bulk_create([Challenge(title="x")])
    with pytest.raises(CommandError, match="not allowed with"):
        call_command("process_spark_sources", "--dry-run", "--mark-only", stdout=StringIO())
    assert not EventRecord.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_dry_run_says_nothing_was_claimed_and_changes_nothing() -> None:
    seen = Challenge.objects.create(title="seen")
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(2))
    before = (
        sorted(claimed_keys()),
        list(HandlerOutcome.objects.values_list("pk", "status", "attempts")),
        logged_keys(),
    )

    output = run("--model", "testapp.Challenge", "--dry-run")

    assert output == "3 rows, 3 events, 2 new (dry run: nothing claimed, nothing run)\n"
    after = (
        sorted(claimed_keys()),
        list(HandlerOutcome.objects.values_list("pk", "status", "attempts")),
        logged_keys(),
    )
    assert after == before
    assert logged_keys() == created(seen)


@pytest.mark.django_db(transaction=True)
def test_mark_only_then_a_normal_run_finds_nothing_new() -> None:
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(2))

    assert run("--model", "testapp.Challenge", "--mark-only") == (
        "2 rows, 2 events, 2 new (claimed without running handlers)\n"
    )
    assert run("--model", "testapp.Challenge") == (
        "2 rows, 2 events, 0 new, 0 handled, 0 failed\n"
    )
    assert logged_keys() == []
    assert not HandlerOutcome.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_quiet_prints_nothing_on_success_even_on_a_terminal() -> None:
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(2))
    out, err = StringIO(), TTY()

    call_command("process_spark_sources", "--quiet", stdout=out, stderr=err)

    assert out.getvalue() == ""
    assert err.getvalue() == ""
    assert len(logged_keys()) == 2


@pytest.mark.django_db(transaction=True)
def test_verbosity_2_prints_a_line_per_model_and_the_summary() -> None:
    challenge = Challenge.objects.create(title="x")
    Donation.objects.bulk_create([Donation(challenge=challenge)])

    assert run("--verbosity", "2", "--dry-run").splitlines() == [
        "testapp.Challenge: 1 rows, 1 events, 0 new (dry run: nothing claimed, nothing run)",
        "testapp.Donation: 1 rows, 1 events, 1 new (dry run: nothing claimed, nothing run)",
        "2 rows, 2 events, 1 new (dry run: nothing claimed, nothing run)",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_terminal_gets_a_progress_line_per_model_ending_with_a_newline() -> None:
    challenge = Challenge.objects.create(title="x")
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(4))
    Donation.objects.bulk_create([Donation(challenge=challenge)])
    err = TTY()

    output = run("--chunk-size", "2", stderr=err)

    assert output == "6 rows, 6 events, 5 new, 5 handled, 0 failed\n"
    progress = err.getvalue()
    assert progress.endswith("\n")
    # splitlines() would also split at the carriage returns that redraw the line.
    lines = progress[:-1].split("\n")
    assert len(lines) == 2
    last_frames = [line.split("\r")[-1].replace("\033[K", "") for line in lines]
    pattern = (
        r"{model} \[#{{20}}\] {rows}/{rows} rows, {rows} events, {new} new, {new} handled, "
        r"0 failed, \d+ rows/s, ETA -"
    )
    assert re.fullmatch(pattern.format(model=r"testapp\.Challenge", rows=5, new=4), last_frames[0])
    assert re.fullmatch(pattern.format(model=r"testapp\.Donation", rows=1, new=1), last_frames[1])
    # Redrawn once per chunk (plus the empty start), not once per row.
    assert lines[0].count("\r") == 1 + 3
    first_frame = lines[0].split("\r")[1]
    assert "0/5 rows" in first_frame
    assert "ETA" in first_frame


@pytest.mark.django_db(transaction=True)
def test_the_progress_line_is_not_styled_as_an_error() -> None:
    Challenge.objects.bulk_create([Challenge(title="x")])
    # What manage.py does on a colour terminal: stderr is styled as errors.
    err = TTY()
    command = Command(stderr=err, force_color=True)

    call_command(command, "--model", "testapp.Challenge", stdout=StringIO())

    assert "1/1 rows" in err.getvalue()
    assert not re.search(r"\033\[[0-9;]*m", err.getvalue())


@pytest.mark.django_db(transaction=True)
def test_without_a_terminal_only_the_summary_is_printed() -> None:
    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(3))
    err = StringIO()

    output = run("--chunk-size", "1", stderr=err)

    assert output == "3 rows, 3 events, 3 new, 3 handled, 0 failed\n"
    assert err.getvalue() == ""


@pytest.mark.django_db(transaction=True)
def test_a_source_raising_for_one_instance_skips_it_logs_and_fails_the_command_at_the_end(
    isolated_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    @event_source(Challenge, on_save=False)
    def fragile(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        if challenge.title == "bad":
            raise ValueError("no end date")
        yield event("fragile", challenge.pk)

    before, bad, after = Challenge.objects.bulk_create(
        Challenge(title=title) for title in ("before", "bad", "after")
    )
    out = StringIO()
    name = function_name(fragile)

    with (
        caplog.at_level(logging.ERROR, logger="spark_decl"),
        pytest.raises(CommandError) as excinfo,
    ):
        call_command(
            "process_spark_sources",
            "--model",
            "testapp.Challenge",
            "--chunk-size",
            "2",
            stdout=out,
            stderr=StringIO(),
        )

    message = str(excinfo.value)
    assert "1 instance(s) skipped" in message
    assert f"{name} failed for testapp.Challenge pk={bad.pk}: no end date" in message
    [record] = [r for r in caplog.records if r.name == "spark_decl"]
    assert record.levelno == logging.ERROR
    assert name in record.getMessage()
    assert f"pk={bad.pk}" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    # The others were handled, in the chunks before and after the failing row.
    assert logged_keys() == created(before, after)
    assert claimed_keys() == {
        *created(before, after),
        f"fragile_{before.pk}",
        f"fragile_{after.pk}",
    }
    assert out.getvalue().startswith("3 rows, 4 events, 4 new, 2 handled, 0 failed in ")


# -- memory: every read is bounded ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_every_read_of_a_model_table_is_a_bounded_keyset_page(settings: Settings) -> None:
    settings.SPARK_DECL = {"CHUNK_SIZE": 50}
    challenges = Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(300))
    Donation.objects.bulk_create(Donation(challenge=challenges[i]) for i in range(120))

    with CaptureQueriesContext(connection) as context:
        output = run()

    assert output == "420 rows, 420 events, 420 new, 420 handled, 0 failed\n"
    challenge_reads = selects_from(context, CHALLENGES)
    donation_reads = selects_from(context, DONATIONS)
    # 300 / 50 full pages and the empty one that ends the scan; 120 rows: 50, 50, 20.
    assert (len(challenge_reads), len(donation_reads)) == (7, 3)
    for sql in challenge_reads + donation_reads:
        assert re.search(r"\bLIMIT 50\b", sql), sql
        assert "ORDER BY" in sql
    # Every page after the first starts after the last primary key read.
    assert sum('"id" >' in sql for sql in challenge_reads) == 6
    assert HandlerLog.objects.count() == 420


@pytest.mark.django_db(transaction=True)
def test_the_command_freezes_what_was_alive_at_its_start_for_the_run_only(
    isolated_registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen_during: list[int] = []

    @handles(r"^challenge_created$")
    def note_frozen(event: Event[Any]) -> None:
        frozen_during.append(gc.get_freeze_count())

    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(2))
    assert gc.get_freeze_count() == 0
    run("--model", "testapp.Challenge")
    assert len(frozen_during) == 2
    assert min(frozen_during) > 0  # the objects alive at its start: Django, the registry
    assert gc.get_freeze_count() == 0

    # Unfrozen however the run ends.
    Challenge.objects.bulk_create([Challenge(title="again")])

    @event_source(Challenge, on_save=False)
    def broken(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        raise RuntimeError("boom")

    with pytest.raises(CommandError):
        run("--model", "testapp.Challenge")
    assert gc.get_freeze_count() == 0

    # A process that froze objects itself keeps them frozen: the command leaves it alone.
    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 1)
    with pytest.raises(CommandError):
        run("--model", "testapp.Challenge")
    assert calls == []


@pytest.mark.django_db(transaction=True)
def test_a_seen_key_whose_context_became_unstorable_never_fails_the_batch(
    bare_registry: Registry,
) -> None:
    unstorable: set[int] = set()

    @event_source(Challenge, on_save=False)
    def numbered(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        bad = challenge.pk in unstorable
        yield event("numbered", challenge.pk, {"value": object() if bad else 1})

    challenges = Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(20))
    late = challenges[15]
    assert process_queryset(Challenge.objects.filter(pk=late.pk)).new == 1
    unstorable.add(late.pk)
    # The first chunk is all new, so the second is claimed without reading its seen keys
    # first; the seen key's unstorable context must not make it fail.
    result = process_queryset(Challenge.objects.all(), chunk_size=10)
    assert (result.rows, result.new) == (20, 19)
    assert claimed_keys() == {f"numbered_{c.pk}" for c in challenges}
    # A new key with an unstorable context is still refused, naming it.
    extra = Challenge.objects.create(title="extra")
    unstorable.add(extra.pk)
    with pytest.raises(InvalidContext, match=f"numbered_{extra.pk}"):
        process_queryset(Challenge.objects.all(), chunk_size=10)


# -- one bad row never blocks the batch -----------------------------------------------------------

UNSTORABLE: dict[str, object] = {
    "set": {1, 2},
    "open-file": StringIO("an open file"),
    "surrogate": "report_\udcff.txt",
    "big-int": 10**5000,
}
_deep: object = 1
for _ in range(200):
    _deep = [_deep]
UNSTORABLE["deep"] = _deep  # beyond context.MAX_DEPTH


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
@pytest.mark.django_db(transaction=True)
def test_an_unstorable_context_skips_its_instance_and_the_rest_of_the_chunk_is_handled(
    bare_registry: Registry, value: object
) -> None:
    @event_source(Challenge, on_save=False)
    def described(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("described", challenge.pk, {"challenge": challenge})
        if challenge.title == "bad":
            yield event("detail", challenge.pk, {"value": value})

    handled: list[str] = []

    @handles(r"^described$")
    def note(event: Event[Any]) -> None:
        handled.append(event["key"])

    before, bad, after = Challenge.objects.bulk_create(
        Challenge(title=title) for title in ("before", "bad", "after")
    )
    name = function_name(described)

    for _ in range(2):  # and the next cron run fares no worse
        err = StringIO()
        with pytest.raises(CommandError) as excinfo:
            run("--chunk-size", "10", stderr=err)
        message = str(excinfo.value)
        assert "1 instance(s) skipped" in message
        assert f"{name} failed for testapp.Challenge pk={bad.pk}: Event 'detail_{bad.pk}'" in (
            message
        )
        # The rows before and after it, in the same chunk, were claimed and handled.
        assert claimed_keys() == {f"described_{before.pk}", f"described_{after.pk}"}
        assert handled == [f"described_{before.pk}", f"described_{after.pk}"]


@pytest.mark.parametrize("mode", ["--dry-run", "--mark-only"])
@pytest.mark.django_db(transaction=True)
def test_dry_run_and_mark_only_report_an_unstorable_context_instead_of_crashing(
    bare_registry: Registry, mode: str
) -> None:
    @event_source(Challenge, on_save=False)
    def described(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        context = {"tags": {"a"}} if challenge.title == "bad" else {}
        yield event("described", challenge.pk, context)

    good, bad = Challenge.objects.bulk_create(Challenge(title=t) for t in ("good", "bad"))
    out = StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command("process_spark_sources", mode, stdout=out, stderr=StringIO())
    assert f"pk={bad.pk}: Event 'described_{bad.pk}': context['tags'] is a builtins.set" in (
        str(excinfo.value)
    )
    assert out.getvalue().startswith("2 rows, 1 events, 1 new")
    expected = set() if mode == "--dry-run" else {f"described_{good.pk}"}
    assert claimed_keys() == expected


@pytest.mark.django_db(transaction=True)
def test_a_chunk_of_large_contexts_is_claimed_in_statements_bounded_by_bytes(
    bare_registry: Registry,
) -> None:
    @event_source(Challenge, on_save=False)
    def bulky(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        yield event("bulky", challenge.pk, {"blob": "x" * 3_000_000})

    Challenge.objects.bulk_create(Challenge(title=str(i)) for i in range(12))
    with CaptureQueriesContext(connection) as context:
        result = process_queryset(Challenge.objects.all(), chunk_size=12)
    assert result.new == 12
    claims = [q["sql"] for q in context.captured_queries if "INSERT INTO" in q["sql"]]
    # 36 MB of contexts, at most MAX_STATEMENT_BYTES (16 MiB) in each statement.
    assert len(claims) == 3
    assert len(claimed_keys()) == 12


class Unprintable(Exception):
    def __str__(self) -> str:
        raise TypeError("no text")


@pytest.mark.django_db(transaction=True)
def test_a_source_raising_an_exception_whose_str_raises_is_skipped_like_any_other(
    bare_registry: Registry,
) -> None:
    @event_source(Challenge, on_save=False)
    def moody(challenge: Challenge) -> Iterator[Event[dict[str, Any]]]:
        if challenge.title == "bad":
            raise Unprintable
        yield event("moody", challenge.pk)

    good, bad = Challenge.objects.bulk_create(Challenge(title=t) for t in ("good", "bad"))
    with pytest.raises(CommandError) as excinfo:
        run()
    assert f"pk={bad.pk}: <unprintable Unprintable: str() raised TypeError: no text>" in str(
        excinfo.value
    )
    assert claimed_keys() == {f"moody_{good.pk}"}
