"""Sending mail from handlers: one template per event group.

::

    from spark_decl import handles, mail

    send_challenge_mails = handles(r"^challenge")(
        mail.templated(
            "challenges/mails/{group}.txt",
            name="send_challenge_mails",
            recipients=lambda event: [event["context"]["challenge"].user.email],
        )
    )

``challenges/mails/challenge_created.txt`` then holds the subject on its first line and the
body after it; ``challenges/mails/challenge_created.html``, if it exists, becomes the HTML
alternative. Sending errors are not silenced: spark_decl records the failed call and
``manage.py retry_spark_events`` sends the mail later.
"""

from __future__ import annotations

import logging
import string
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import django
from django.core.mail import EmailMultiAlternatives
from django.template import TemplateDoesNotExist
from django.template.loader import get_template

from .exceptions import MailError, MailTemplateMissing, RegistrationError

if TYPE_CHECKING:
    from django.core.mail.backends.base import BaseEmailBackend

    from .types import Event

__all__ = ["MailError", "MailTemplateMissing", "TemplatedMail", "templated"]

logger = logging.getLogger(__name__)


def templated(
    template: str,
    *,
    name: str,
    recipients: Callable[[Event[Any]], Iterable[str]],
    html_template: str | Literal[False] | None = None,
    context: Callable[[Event[Any]], Mapping[str, Any]] | None = None,
    from_email: str | None = None,
    connection: Callable[[], BaseEmailBackend] | None = None,
    using: str | None = None,
    fail_silently: bool = False,
    module: str | None = None,
) -> TemplatedMail:
    """Return a handler that renders ``template`` for the event's group and mails it.

    ``template`` is a template name in which ``{group}`` is replaced by the event's group,
    e.g. ``"challenges/mails/{group}.txt"``. The first non-blank line it renders is the
    subject (whitespace collapsed to single spaces, so it can never span lines); the lines
    after it are the plain-text body. Templates see the event's context (its keys as
    variables), ``event`` itself, and whatever ``context(event)`` returns.

    The handler is named ``f"{module}.{name}"``: ``module`` defaults to the module calling
    ``templated()``, and ``name`` should be the variable it is assigned to, as with
    ``TypeVar("T")``. That name is what outcome rows, the admin and ``retry_spark_events
    --handler`` show, so keeping it when you replace a hand-written handler keeps its
    pending retries working.

    :param recipients: called with the event; returns the addresses to send to. Blank
        addresses are dropped; if none are left, no mail is sent and the call succeeds.
    :param html_template: ``None`` (default): the ``template`` name with ``.txt`` replaced
        by ``.html`` is the HTML alternative *if it exists*. A pattern: that template is the
        HTML alternative and must exist. ``False``: plain text only.
    :param context: called with the event; returns extra template variables.
    :param from_email: the sender; ``None`` means ``settings.DEFAULT_FROM_EMAIL``.
    :param connection: called once per mail; returns the email backend to send with
        (e.g. ``lambda: get_connection("...")``). ``None``: Django's default (the
        ``"default"`` mailer of ``settings.MAILERS`` on Django 6.1+, else
        ``settings.EMAIL_BACKEND``).
    :param using: Django 6.1+: the alias of the mailer in ``settings.MAILERS`` to send
        with, instead of the default one. Not with ``connection``.
    :param fail_silently: ``False`` (default) lets sending errors fail the handler call,
        so it is recorded and retried. ``True`` catches them: the error is logged at
        ``WARNING`` on the ``spark_decl.mail`` logger, the call succeeds, and the mail is
        lost. (spark_decl does this itself, without Django's ``fail_silently``
        arguments, which Django 6.1 deprecates.)
    :param module: the first half of the handler's name, when ``templated()`` is called
        from a helper instead of the module that registers the handler.
    """
    if module is None:
        # The caller's module, as collections.namedtuple finds it.
        caller = sys._getframe(1)  # pyright: ignore[reportPrivateUsage]
        module = str(caller.f_globals.get("__name__", "__main__"))
    return TemplatedMail(
        template,
        name=name,
        recipients=recipients,
        html_template=html_template,
        context=context,
        from_email=from_email,
        connection=connection,
        using=using,
        fail_silently=fail_silently,
        module=module,
    )


class TemplatedMail:
    """The handler :func:`templated` returns: call it with an event to send its mail.

    :meth:`message` builds the mail without sending it (for previews and tests).
    """

    def __init__(
        self,
        template: str,
        *,
        name: str,
        recipients: Callable[[Event[Any]], Iterable[str]],
        html_template: str | Literal[False] | None = None,
        context: Callable[[Event[Any]], Mapping[str, Any]] | None = None,
        from_email: str | None = None,
        connection: Callable[[], BaseEmailBackend] | None = None,
        using: str | None = None,
        fail_silently: bool = False,
        module: str,
    ) -> None:
        where = f"mail.templated({template!r})"
        _check_pattern(template, "template", where)
        if not _is_python_name(name):
            raise RegistrationError(
                f"name= of {where} must be a Python name, usually the variable the handler "
                f"is assigned to (e.g. name='send_challenge_mails'), got {name!r}."
            )
        if html_template is None:
            # Picked up only if it exists, as django-authlib's render_to_mail does.
            html_optional = True
            html_template = (
                f"{template.removesuffix('.txt')}.html" if template.endswith(".txt") else False
            )
        else:
            html_optional = False
            if html_template is not False:
                _check_pattern(html_template, "html_template", where)
        if not callable(recipients):
            raise RegistrationError(
                f"recipients= of {where} must be a callable, got {recipients!r}."
            )
        for argument, value in (("context", context), ("connection", connection)):
            if value is not None and not callable(value):
                raise RegistrationError(
                    f"{argument}= of {where} must be a callable, got {value!r}."
                )
        if using is not None:
            if django.VERSION < (6, 1):
                raise RegistrationError(
                    f"using= of {where} names a mailer of settings.MAILERS, which Django "
                    f"6.1 introduced; this is Django {django.get_version()}: pass "
                    f"connection= instead."
                )
            # Typed as promised; checked as what it may really be.
            if not isinstance(cast("object", using), str) or not using:
                raise RegistrationError(
                    f"using= of {where} must be the alias of a mailer in settings.MAILERS, "
                    f"got {using!r}."
                )
            if connection is not None:
                raise RegistrationError(
                    f"{where} takes connection= or using=, not both: using= picks a "
                    f"mailer of settings.MAILERS, connection= makes the backend itself."
                )

        self.template = template
        self.html_template: str | Literal[False] = html_template
        self.html_optional = html_optional
        self.recipients = recipients
        self.extra_context = context
        self.from_email = from_email
        self.connection = connection
        self.using = using
        self.fail_silently = fail_silently
        # The handler's registry name is f"{__module__}.{__qualname__}".
        self.__module__ = module
        self.__qualname__ = name
        self.__name__ = name.rpartition(".")[2]
        self.__doc__ = f"Mail {template!r} for each event (spark_decl.mail.templated)."

    def __repr__(self) -> str:
        return f"<TemplatedMail {self.__module__}.{self.__qualname__} {self.template!r}>"

    def __call__(self, event: Event[Any]) -> None:
        message = self.message(event)
        if not message.to:
            logger.info(
                "%s.%s sent no mail for event %r: recipients() returned no addresses.",
                self.__module__,
                self.__qualname__,
                event["key"],
            )
            return
        try:
            self._send(message)
        except Exception as exc:
            if not self.fail_silently:
                raise
            logger.warning(
                "%s.%s could not send the mail for event %r, and fail_silently=True "
                "drops it: %s: %s",
                self.__module__,
                self.__qualname__,
                event["key"],
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    def _send(self, message: EmailMultiAlternatives) -> None:
        # Never with Django's fail_silently arguments, which Django 6.1 deprecates (even
        # when False); fail_silently is handled in __call__.
        if self.connection is not None:
            # Handed to the backend directly: Django 6.1 deprecates message.connection.
            self.connection().send_messages([message])
        elif self.using is not None:
            # Django 6.1's signature; django-stubs for 5.2 do not know using= yet.
            send: Callable[..., int] = message.send
            send(using=self.using)
        else:
            message.send()

    def message(self, event: Event[Any]) -> EmailMultiAlternatives:
        """The mail for ``event``, rendered and addressed but not sent."""
        to = self.get_recipients(event)
        variables = self.get_context(event)
        subject, body = self._split(self._render(self.template, event, variables), event)
        message = EmailMultiAlternatives(
            subject=subject,
            body=body,
            from_email=self.from_email,
            to=to,
        )
        if self.html_template is not False:
            try:
                html = self._render(self.html_template, event, variables)
            except MailTemplateMissing:
                if not self.html_optional:
                    raise
            else:
                message.attach_alternative(html, "text/html")
        return message

    def get_recipients(self, event: Event[Any]) -> list[str]:
        """``recipients(event)``, checked, without blanks and duplicates."""
        # Typed as the user's callable promises; checked as what it may really return.
        addresses: object = self.recipients(event)
        if isinstance(addresses, str):
            raise MailError(
                f"recipients() of {self.__module__}.{self.__qualname__} returned the str "
                f"{addresses!r} for event {event['key']!r}; return a list of addresses."
            )
        result: list[str] = []
        for address in cast("Iterable[object]", addresses):
            if not isinstance(address, str):
                raise MailError(
                    f"recipients() of {self.__module__}.{self.__qualname__} returned "
                    f"{address!r} for event {event['key']!r}; addresses must be str."
                )
            if address.strip() and address not in result:
                result.append(address)
        return result

    def get_context(self, event: Event[Any]) -> dict[str, Any]:
        """The template variables: the event's context, ``event``, then ``context(event)``."""
        variables: dict[str, Any] = {}
        if isinstance(event["context"], Mapping):
            variables.update(event["context"])
        variables["event"] = event
        if self.extra_context is not None:
            variables.update(self.extra_context(event))
        return variables

    def _render(self, pattern: str, event: Event[Any], variables: dict[str, Any]) -> str:
        name = pattern.format(group=event["group"])
        try:
            template = get_template(name)
        except TemplateDoesNotExist as exc:
            # Only the template itself: a missing {% include %} inside it is raised by
            # render() below, as the error it is.
            raise MailTemplateMissing(
                f"{self.__module__}.{self.__qualname__}: the template {name!r} for event "
                f"group {event['group']!r} does not exist (event {event['key']!r}, "
                f"pattern {pattern!r})."
            ) from exc
        return template.render(variables)

    def _split(self, text: str, event: Event[Any]) -> tuple[str, str]:
        lines = text.splitlines()
        while lines and not lines[0].strip():
            del lines[0]
        if not lines:
            raise MailError(
                f"{self.__module__}.{self.__qualname__}: the template "
                f"{self.template.format(group=event['group'])!r} rendered no subject for "
                f"event {event['key']!r}; its first non-blank line is the subject."
            )
        subject = " ".join(lines[0].split())
        body = lines[1:]
        while body and not body[0].strip():
            del body[0]
        while body and not body[-1].strip():
            del body[-1]
        return subject, "".join(f"{line}\n" for line in body)


def _is_python_name(name: object) -> bool:
    return isinstance(name, str) and all(part.isidentifier() for part in name.split("."))


def _check_pattern(pattern: object, argument: str, where: str) -> None:
    """A template name pattern may use ``{group}`` and nothing else."""
    if not isinstance(pattern, str) or not pattern:
        raise RegistrationError(
            f"{argument}= of {where} must be a template name such as "
            f"'challenges/mails/{{group}}.txt', got {pattern!r}."
        )
    try:
        fields = {
            field for _, field, _, _ in string.Formatter().parse(pattern) if field is not None
        }
    except ValueError as exc:
        raise RegistrationError(f"{argument}= of {where}: {pattern!r} is invalid: {exc}.") from exc
    unknown = sorted(fields - {"group"})
    if unknown:
        raise RegistrationError(
            f"{argument}= of {where} may only use {{group}}, not "
            f"{', '.join('{' + field + '}' for field in unknown)}: {pattern!r}."
        )
