"""The exceptions spark_decl raises. Every one of them derives from :class:`SparkError`."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class SparkError(Exception):
    """Base class of every error raised by spark_decl."""


class InvalidEvent(SparkError, ValueError):
    """An event source produced something that is not a valid event.

    Raised before anything is written, naming the offending field and, where known,
    the source that produced the event.
    """


class InvalidContext(InvalidEvent):
    """An event's context holds a value that cannot be stored (and so cannot be retried)."""


class InvalidPattern(SparkError, ValueError):
    """A handler was registered with a pattern that is not a valid regular expression."""


class RegistrationError(SparkError, ValueError):
    """A decorator or registration function was used wrongly."""


class UnknownHandler(SparkError, LookupError):
    """No handler of the given dotted name is registered (``retry_spark_events --handler``
    and ``--replay-to``, :meth:`spark_decl.testing.CapturedEvents.routed_to`). The message
    suggests registered names close to it.
    """


class UnsupportedDatabase(SparkError):
    """The database cannot claim keys atomically (SQLite older than 3.35, or another vendor)."""


class BackgroundUnavailable(SparkError, ImproperlyConfigured):
    """A background handler or ``--enqueue`` needs Django's tasks framework, and it is
    missing or misconfigured (no ``django.tasks``/``django-tasks``, an unknown
    ``SPARK_DECL["TASK_BACKEND"]``, a queue the backend does not serve)."""


class EnqueueFailed(SparkError):
    """A task backend did not take a task: its ``enqueue`` raised (a broker refusing
    connections), or did not return within ``SPARK_DECL["ENQUEUE_TIMEOUT"]`` (a broker that
    never answers). The message names the backend's alias and class.

    ``process_spark_sources --enqueue`` turns it into a ``CommandError``. After a save it is
    only logged: the call stays pending for ``retry_spark_events --stale-after``.
    """


class ContextUnavailable(SparkError):
    """A stored context cannot be rebuilt: it refers to something that no longer exists (a
    deleted row, a model no longer installed), or holds what no reader can take. The call
    it was rebuilt for counts as a failed attempt."""


class SourceErrors(SparkError):
    """Sources raised for some rows of an enqueued chunk (``process_spark_sources
    --enqueue``); the chunk's other rows were processed."""


class MailError(SparkError):
    """A mail handler (:func:`spark_decl.mail.templated`) could not build its message (the
    handler call fails and is recorded). Also importable from ``spark_decl.mail``."""


class MailTemplateMissing(MailError):
    """The template of a mail handler for an event's group does not exist."""
