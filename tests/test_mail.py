"""``spark_decl.mail``: one template per event group, mailed from a handler.

Templates live in tests/testapp/templates/testapp/mails/; mail goes to Django's locmem
backend (``django.core.mail.outbox``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from io import StringIO
from typing import Any, assert_type, cast

import django
import pytest
from django.core import mail as django_mail
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings

from spark_decl import Event, event, handles, mail, only_new_events, process_events
from spark_decl.exceptions import RegistrationError, SparkError
from spark_decl.models import HandlerOutcome
from spark_decl.registry import Registry, function_name
from tests.conftest import handler_statuses
from tests.testapp.models import Challenge
from tests.testapp.spark import ChallengeContext

TEMPLATE = "testapp/mails/{group}.txt"
OWNER = "owner@example.com"


def to_owner(event: Event[ChallengeContext]) -> list[str]:
    return [OWNER]


def outbox() -> list[EmailMessage]:
    return django_mail.outbox


def outcome(key: str, handler: mail.TemplatedMail) -> HandlerOutcome:
    return HandlerOutcome.objects.get(record__key=key, handler=function_name(handler))


def status(key: str, handler: mail.TemplatedMail) -> str:
    """The call's status, whether it has a row or was done when its event was claimed."""
    return handler_statuses(key)[function_name(handler)]


def handle(*events: Event[Any]) -> None:
    """Claim and handle ``events`` as the batch command does."""
    process_events(only_new_events(events))


class Rollback(Exception):
    pass


class DownBackend(BaseEmailBackend):
    """An SMTP server that refuses every connection."""

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        raise ConnectionRefusedError("SMTP server down")


def default_backend(path: str) -> override_settings:
    """Make ``path`` the default email backend: the default mailer on Django 6.1+
    (``EMAIL_BACKEND`` is deprecated there), else ``EMAIL_BACKEND``."""
    if django.VERSION >= (6, 1):
        return override_settings(MAILERS={"default": {"BACKEND": path}})
    return override_settings(EMAIL_BACKEND=path)


class RecordingBackend(BaseEmailBackend):
    sent: list[EmailMessage] = []

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        self.sent.extend(email_messages)
        return len(email_messages)


# -- sending ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_save_mails_the_group_template_after_commit(isolated_registry: Registry) -> None:
    send_mails = handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner)
    )
    assert_type(send_mails, mail.TemplatedMail)

    challenge = Challenge.objects.create(title='Run "100" km & more')

    [message] = outbox()
    key = f"challenge_created_{challenge.pk}"
    # The first non-blank line ({% load %} renders an empty one), whitespace collapsed.
    assert message.subject == 'Welcome to "Run "100" km & more"'
    assert message.body == f'Hi there,\n\n"Run "100" km & more" is live (event {key}).\n'
    assert message.to == [OWNER]
    assert message.from_email == "webmaster@localhost"  # settings.DEFAULT_FROM_EMAIL
    assert status(key, send_mails) == "done"


@pytest.mark.django_db(transaction=True)
def test_one_template_per_group(isolated_registry: Registry) -> None:
    handles(r"^challenge")(mail.templated(TEMPLATE, name="send_mails", recipients=to_owner))
    challenge = Challenge.objects.create(title="Bake")

    handle(event("challenge_ended", challenge.pk, {"challenge": challenge}))

    assert [message.subject for message in outbox()] == ['Welcome to "Bake"', '"Bake" has ended']
    assert outbox()[1].body == "Thank you for taking part.\n"


@pytest.mark.django_db(transaction=True)
def test_nothing_is_mailed_when_the_save_rolls_back(isolated_registry: Registry) -> None:
    handles(r"^challenge")(mail.templated(TEMPLATE, name="send_mails", recipients=to_owner))

    def save_and_roll_back() -> None:
        with transaction.atomic():
            Challenge.objects.create(title="never")
            assert outbox() == []
            raise Rollback

    with pytest.raises(Rollback):
        save_and_roll_back()

    assert outbox() == []


@pytest.mark.django_db(transaction=True)
def test_the_html_template_beside_the_text_one_becomes_the_alternative(
    isolated_registry: Registry,
) -> None:
    handles(r"^challenge")(mail.templated(TEMPLATE, name="send_mails", recipients=to_owner))
    challenge = Challenge.objects.create(title="<Swim>")
    handle(event("challenge_ended", challenge.pk, {"challenge": challenge}))

    created, ended = outbox()
    assert isinstance(created, django_mail.EmailMultiAlternatives)
    # HTML is autoescaped; the text template turned autoescaping off.
    assert created.alternatives == [
        ("<p>Welcome to <b>&lt;Swim&gt;</b> (challenge_created)</p>\n", "text/html")
    ]
    assert created.subject == 'Welcome to "<Swim>"'
    # challenge_ended has no .html template: plain text only.
    assert isinstance(ended, django_mail.EmailMultiAlternatives)
    assert ended.alternatives == []


@pytest.mark.django_db(transaction=True)
def test_html_template_false_sends_plain_text_only(isolated_registry: Registry) -> None:
    handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner, html_template=False)
    )
    Challenge.objects.create(title="Swim")

    [message] = outbox()
    assert isinstance(message, django_mail.EmailMultiAlternatives)
    assert message.alternatives == []


@pytest.mark.django_db(transaction=True)
def test_an_explicit_html_template_must_exist(isolated_registry: Registry) -> None:
    send_mails = handles(r"^challenge")(
        mail.templated(
            TEMPLATE,
            name="send_mails",
            recipients=to_owner,
            html_template="testapp/mails/{group}.html",
        )
    )
    challenge = Challenge.objects.create(title="Swim")
    handle(event("challenge_ended", challenge.pk, {"challenge": challenge}))

    # challenge_created has both templates; challenge_ended lacks the HTML one it asked for.
    [created] = outbox()
    assert isinstance(created, django_mail.EmailMultiAlternatives)
    assert len(created.alternatives) == 1
    failed = outcome(f"challenge_ended_{challenge.pk}", send_mails)
    assert failed.status == HandlerOutcome.Status.FAILED
    assert "'testapp/mails/challenge_ended.html'" in failed.last_error


@pytest.mark.django_db(transaction=True)
def test_recipients_and_extra_context_are_called_with_the_event(
    isolated_registry: Registry,
) -> None:
    seen: list[Event[Any]] = []

    def recipients(event: Event[ChallengeContext]) -> list[str]:
        seen.append(event)
        title = event["context"]["challenge"].title
        # Blanks (a user without an address) and duplicates are dropped.
        return [f"{title}@example.com", "", "  ", "team@example.com", f"{title}@example.com"]

    handles(r"^challenge_created$")(
        mail.templated(
            TEMPLATE,
            name="send_mails",
            recipients=recipients,
            context=lambda event: {"greeting": event["context"]["challenge"].title.upper()},
            from_email="Challenges <noreply@example.com>",
        )
    )
    challenge = Challenge.objects.create(title="alice")

    assert [e["key"] for e in seen] == [f"challenge_created_{challenge.pk}"]
    assert seen[0]["context"]["challenge"] == challenge
    [message] = outbox()
    assert message.to == ["alice@example.com", "team@example.com"]
    assert message.from_email == "Challenges <noreply@example.com>"
    assert message.body.startswith("Hi ALICE,\n")


@pytest.mark.django_db(transaction=True)
def test_no_recipients_sends_nothing_and_the_call_succeeds(
    isolated_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    send_mails = handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=lambda event: [""])
    )
    with caplog.at_level(logging.INFO, logger="spark_decl.mail"):
        challenge = Challenge.objects.create(title="nobody")

    key = f"challenge_created_{challenge.pk}"
    assert outbox() == []
    assert status(key, send_mails) == "done"
    assert f"tests.test_mail.send_mails sent no mail for event {key!r}" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("returned", "error"),
    [
        (OWNER, f"returned the str {OWNER!r}"),
        ([OWNER, None], "returned None for event"),
    ],
)
def test_recipients_must_return_addresses(
    isolated_registry: Registry, returned: object, error: str
) -> None:
    send_mails = handles(r"^challenge")(
        mail.templated(
            TEMPLATE, name="send_mails", recipients=lambda event: cast("list[str]", returned)
        )
    )
    challenge = Challenge.objects.create(title="typo")

    failed = outcome(f"challenge_created_{challenge.pk}", send_mails)
    assert failed.status == HandlerOutcome.Status.FAILED
    assert failed.last_error.startswith("MailError: recipients() of tests.test_mail.send_mails")
    assert error in failed.last_error
    assert outbox() == []


@pytest.mark.django_db(transaction=True)
def test_a_connection_callable_gives_each_mail_its_backend(isolated_registry: Registry) -> None:
    backends: list[BaseEmailBackend] = []

    def connection() -> BaseEmailBackend:
        backends.append(RecordingBackend())
        return backends[-1]

    RecordingBackend.sent = []
    handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner, connection=connection)
    )
    first = Challenge.objects.create(title="first")
    Challenge.objects.create(title="second")

    assert len(backends) == 2
    assert [message.subject for message in RecordingBackend.sent] == [
        'Welcome to "first"',
        'Welcome to "second"',
    ]
    assert outbox() == []
    # Building a message (a preview) opens no connection.
    mail.templated(TEMPLATE, name="preview", recipients=to_owner, connection=connection).message(
        event("challenge_created", first.pk, {"challenge": first})
    )
    assert len(backends) == 2


# -- failures are recorded and retried -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_sending_error_is_recorded_and_retry_sends_the_mail(
    isolated_registry: Registry,
) -> None:
    send_mails = handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner)
    )
    with default_backend("tests.test_mail.DownBackend"):
        challenge = Challenge.objects.create(title="Row")

    key = f"challenge_created_{challenge.pk}"
    failed = outcome(key, send_mails)
    assert failed.status == HandlerOutcome.Status.FAILED
    assert failed.last_error == "ConnectionRefusedError: SMTP server down"
    assert outbox() == []

    # The server is back: the retry rebuilds the context from the database and sends.
    call_command("retry_spark_events", stdout=StringIO())

    [message] = outbox()
    assert message.subject == 'Welcome to "Row"'
    assert status(key, send_mails) == "done"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("with_connection", [False, True], ids=["default", "connection"])
def test_fail_silently_loses_the_mail_without_a_failure_and_logs_it(
    isolated_registry: Registry, caplog: pytest.LogCaptureFixture, with_connection: bool
) -> None:
    send_mails = handles(r"^challenge")(
        mail.templated(
            TEMPLATE,
            name="send_mails",
            recipients=to_owner,
            connection=DownBackend if with_connection else None,
            fail_silently=True,
        )
    )
    # Django 6.1 deprecates its own fail_silently arguments: spark_decl passes none.
    with default_backend("tests.test_mail.DownBackend"), warnings.catch_warnings():
        warnings.simplefilter("error")
        challenge = Challenge.objects.create(title="Row")

    key = f"challenge_created_{challenge.pk}"
    assert status(key, send_mails) == "done"
    [record] = [r for r in caplog.records if r.name == "spark_decl.mail"]
    assert record.levelname == "WARNING"
    assert key in record.getMessage()
    assert "ConnectionRefusedError: SMTP server down" in record.getMessage()


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is new in Django 6.1")
@pytest.mark.django_db(transaction=True)
def test_using_sends_with_that_mailer_of_settings_mailers(isolated_registry: Registry) -> None:
    RecordingBackend.sent = []
    mailers = {
        "default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
        "transactional": {"BACKEND": "tests.test_mail.RecordingBackend"},
    }
    handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner, using="transactional")
    )
    with override_settings(MAILERS=mailers), warnings.catch_warnings():
        warnings.simplefilter("error")
        Challenge.objects.create(title="Row")
    assert [message.subject for message in RecordingBackend.sent] == ['Welcome to "Row"']
    assert outbox() == []

    with pytest.raises(RegistrationError, match="connection= or using=, not both"):
        mail.templated(
            TEMPLATE,
            name="both",
            recipients=to_owner,
            using="transactional",
            connection=RecordingBackend,
        )
    with pytest.raises(RegistrationError, match=r"using= of .* must be the alias"):
        mail.templated(TEMPLATE, name="blank", recipients=to_owner, using="")


@pytest.mark.skipif(django.VERSION >= (6, 1), reason="Django 6.1 has MAILERS")
def test_using_before_django_6_1_is_a_registration_error() -> None:
    with pytest.raises(RegistrationError, match=r"Django 6\.1 introduced; this is Django 5"):
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner, using="transactional")


@pytest.mark.django_db(transaction=True)
def test_a_missing_template_is_a_recorded_failure_naming_template_and_group(
    isolated_registry: Registry,
) -> None:
    send_mails = handles(r"^challenge_")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner)
    )
    challenge = Challenge.objects.create(title="Walk")
    handle(event("challenge_ends_2d", challenge.pk, {"challenge": challenge}))

    key = f"challenge_ends_2d_{challenge.pk}"
    failed = outcome(key, send_mails)
    assert failed.status == HandlerOutcome.Status.FAILED
    assert failed.last_error == (
        "MailTemplateMissing: tests.test_mail.send_mails: the template "
        "'testapp/mails/challenge_ends_2d.txt' for event group 'challenge_ends_2d' does not "
        f"exist (event {key!r}, pattern 'testapp/mails/{{group}}.txt')."
    )
    # The other group's mail went out.
    assert [message.subject for message in outbox()] == ['Welcome to "Walk"']


@pytest.mark.django_db(transaction=True)
def test_a_missing_include_is_not_reported_as_a_missing_mail_template(
    isolated_registry: Registry,
) -> None:
    send_mails = handles(r"^challenge_broken$")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner)
    )
    challenge = Challenge.objects.create(title="Walk")
    handle(event("challenge_broken", challenge.pk, {"challenge": challenge}))

    failed = outcome(f"challenge_broken_{challenge.pk}", send_mails)
    assert failed.last_error == "TemplateDoesNotExist: testapp/mails/no_such_part.txt"


@pytest.mark.django_db(transaction=True)
def test_a_template_without_a_subject_is_a_recorded_failure(
    isolated_registry: Registry,
) -> None:
    send_mails = handles(r"^challenge_silent$")(
        mail.templated(TEMPLATE, name="send_mails", recipients=to_owner)
    )
    challenge = Challenge.objects.create(title="Walk")
    handle(event("challenge_silent", challenge.pk, {"challenge": challenge}))

    failed = outcome(f"challenge_silent_{challenge.pk}", send_mails)
    assert failed.last_error.startswith(
        "MailError: tests.test_mail.send_mails: the template 'testapp/mails/challenge_silent.txt' "
        "rendered no subject"
    )
    assert outbox() == []


def test_a_line_break_in_the_subject_cannot_inject_headers() -> None:
    handler = mail.templated(TEMPLATE, name="send_mails", recipients=to_owner)
    challenge = Challenge(pk=7, title="Hi\r\nBcc: evil@example.com\n")

    message = handler.message(event("challenge_flagged", 7, {"challenge": challenge}))

    # Only the first line is the subject; the rest went to the body, not to the headers.
    assert message.subject == "Hi"
    assert message.body == "Bcc: evil@example.com\n needs attention\nBody\n"
    assert message.message()["Bcc"] is None
    assert message.recipients() == [OWNER]


# -- names in the registry -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_each_mail_handler_is_registered_under_its_module_and_name(
    isolated_registry: Registry,
) -> None:
    owners = handles(r"^challenge_created$")(
        mail.templated(TEMPLATE, name="mail_owners", recipients=to_owner)
    )
    team = handles(r"^challenge_created$")(
        mail.templated(TEMPLATE, name="mail_team", recipients=lambda event: ["team@x.org"])
    )

    assert function_name(owners) == "tests.test_mail.mail_owners"
    assert function_name(team) == "tests.test_mail.mail_team"
    assert isolated_registry.get_handler("tests.test_mail.mail_owners") is not None
    assert repr(owners) == (
        "<TemplatedMail tests.test_mail.mail_owners 'testapp/mails/{group}.txt'>"
    )

    challenge = Challenge.objects.create(title="Hike")

    assert sorted(message.to[0] for message in outbox()) == [OWNER, "team@x.org"]
    statuses = handler_statuses(f"challenge_created_{challenge.pk}")
    assert statuses["tests.test_mail.mail_owners"] == "done"
    assert statuses["tests.test_mail.mail_team"] == "done"


@pytest.mark.django_db(transaction=True)
def test_the_same_name_again_replaces_the_registration(isolated_registry: Registry) -> None:
    # What happens when a spark.py is imported again (autoreload): one handler, the newest.
    handles(r"^challenge")(mail.templated(TEMPLATE, name="send_mails", recipients=to_owner))
    handles(r"^challenge")(
        mail.templated(TEMPLATE, name="send_mails", recipients=lambda event: ["new@x.org"])
    )
    Challenge.objects.create(title="Hike")

    assert [message.to for message in outbox()] == [["new@x.org"]]


def test_module_names_the_handler_when_a_helper_builds_it() -> None:
    def owner_mail(name: str) -> mail.TemplatedMail:
        return mail.templated(TEMPLATE, name=name, recipients=to_owner, module="shop.spark")

    assert function_name(owner_mail("send_mails")) == "shop.spark.send_mails"
    assert function_name(owner_mail("Mails.owner")) == "shop.spark.Mails.owner"


# -- misuse is an error when the handler is declared ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"template": "mails/{grup}.txt"},
            "template= of mail.templated('mails/{grup}.txt') may only use {group}, not {grup}",
        ),
        ({"template": "mails/{group.txt"}, "'mails/{group.txt' is invalid"),
        ({"template": ""}, "template= of mail.templated('') must be a template name"),
        (
            {"html_template": "mails/{event}.html"},
            "html_template= of mail.templated('m/{group}.txt') may only use {group}, not {event}",
        ),
        ({"name": "send mails"}, "must be a Python name"),
        ({"name": ""}, "must be a Python name"),
        ({"recipients": [OWNER]}, "recipients= of mail.templated('m/{group}.txt') must be a "),
        ({"context": {"a": 1}}, "context= of mail.templated('m/{group}.txt') must be a callable"),
    ],
)
def test_misuse_is_a_registration_error(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "template": "m/{group}.txt",
        "name": "send_mails",
        "recipients": to_owner,
        **kwargs,
    }
    with pytest.raises(RegistrationError) as info:
        mail.templated(**arguments)

    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_mail_errors_are_spark_errors() -> None:
    assert issubclass(mail.MailTemplateMissing, mail.MailError)
    assert issubclass(mail.MailError, SparkError)
