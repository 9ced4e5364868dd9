"""``manage.py process_spark_sources``."""

from __future__ import annotations

import datetime as dt
import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from spark_decl.models import EventRecord
from tests.conftest import logged_keys
from tests.testapp.models import Challenge, Donation


def process(*args: str) -> str:
    """The command's output at verbosity 2 (a line per model), minus the timing."""
    out = StringIO()
    call_command("process_spark_sources", "--verbosity", "2", *args, stdout=out)
    return re.sub(r" in [0-9.]+s$", "", out.getvalue(), flags=re.MULTILINE)


@pytest.fixture
def world(transactional_db: None) -> tuple[Challenge, Challenge, Donation]:
    """An active challenge ending in two days, an inactive one that ended, a donation."""
    today = timezone.localdate()
    ending = Challenge.objects.create(title="Ending", end_date=today + dt.timedelta(days=2))
    ended = Challenge.objects.create(
        title="Ended", is_active=False, end_date=today - dt.timedelta(days=3)
    )
    donation = Donation.objects.create(challenge=ending)
    return ending, ended, donation


def test_processes_every_registered_model_then_nothing_new(
    world: tuple[Challenge, Challenge, Donation],
) -> None:
    ending, ended, donation = world
    saved = [f"challenge_created_{ending.pk}"]
    assert logged_keys() == saved

    assert process() == (
        "testapp.Challenge: 2 rows, 3 events, 2 new, 2 handled, 0 failed\n"
        "testapp.Donation: 1 rows, 1 events, 0 new, 0 handled, 0 failed\n"
        "3 rows, 4 events, 2 new, 2 handled, 0 failed\n"
    )
    assert logged_keys() == [
        *saved,
        f"challenge_ends_2d_{ending.pk}",
        f"challenge_ended_{ended.pk}",
    ]
    assert logged_keys("log_donation") == [f"donation_received_{donation.pk}"]

    assert process() == (
        "testapp.Challenge: 2 rows, 3 events, 0 new, 0 handled, 0 failed\n"
        "testapp.Donation: 1 rows, 1 events, 0 new, 0 handled, 0 failed\n"
        "3 rows, 4 events, 0 new, 0 handled, 0 failed\n"
    )
    assert len(logged_keys()) == 3
    assert EventRecord.objects.count() == 4


@pytest.mark.django_db(transaction=True)
def test_model_restricts_the_run_and_is_repeatable() -> None:
    challenge = Challenge.objects.create(title="x", is_active=False)
    Donation.objects.bulk_create([Donation(challenge=challenge)])

    assert process("--model", "testapp.Challenge") == (
        "testapp.Challenge: 1 rows, 0 events, 0 new, 0 handled, 0 failed\n"
        "1 rows, 0 events, 0 new, 0 handled, 0 failed\n"
    )
    assert logged_keys("log_donation") == []

    output = process("--model", "testapp.Donation", "--model", "testapp.Challenge")
    assert output.splitlines() == [
        "testapp.Donation: 1 rows, 1 events, 1 new, 1 handled, 0 failed",
        "testapp.Challenge: 1 rows, 0 events, 0 new, 0 handled, 0 failed",
        "2 rows, 1 events, 1 new, 1 handled, 0 failed",
    ]
    assert len(logged_keys("log_donation")) == 1


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("testapp.Nope", "Unknown model 'testapp.Nope'"),
        ("nope.Challenge", "Unknown model 'nope.Challenge'"),
        ("Challenge", "Unknown model 'Challenge'"),
        ("testapp.HandlerLog", "testapp.HandlerLog has no event sources"),
    ],
)
@pytest.mark.django_db
def test_an_unknown_model_is_a_command_error(label: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("process_spark_sources", "--model", label)


@pytest.mark.django_db
def test_an_unknown_model_processes_nothing() -> None:
    Challenge.objects.bulk_create([Challenge(title="x")])
    with pytest.raises(CommandError):
        call_command("process_spark_sources", "--model", "testapp.Challenge", "--model", "x.Y")
    assert not EventRecord.objects.exists()
