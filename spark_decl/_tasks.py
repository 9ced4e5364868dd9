"""Django's tasks framework: ``django.tasks`` (Django >= 6.0) or, on Django 5.2, the
``django-tasks`` backport it grew from. Importing this module raises ``ImportError`` when
neither is installed; :mod:`spark_decl.enqueue` turns that into a clear error."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Type checkers see the backport (installed in the development environment); the two
    # have the same shape for everything used here.
    from django_tasks import TaskResult, task, task_backends
    from django_tasks.backends.base import BaseTaskBackend
    from django_tasks.backends.dummy import DummyBackend
    from django_tasks.backends.immediate import ImmediateBackend
    from django_tasks.base import Task
    from django_tasks.exceptions import InvalidTaskBackendError as InvalidTaskBackend
    from django_tasks.exceptions import InvalidTaskError as InvalidTask
else:
    try:
        from django.tasks import Task, TaskResult, task, task_backends
        from django.tasks.backends.base import BaseTaskBackend
        from django.tasks.backends.dummy import DummyBackend
        from django.tasks.backends.immediate import ImmediateBackend
        from django.tasks.exceptions import InvalidTask, InvalidTaskBackend
    except ImportError:
        from django_tasks import TaskResult, task, task_backends
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.backends.dummy import DummyBackend
        from django_tasks.backends.immediate import ImmediateBackend
        from django_tasks.base import Task
        from django_tasks.exceptions import InvalidTaskBackendError as InvalidTaskBackend
        from django_tasks.exceptions import InvalidTaskError as InvalidTask

__all__ = [
    "BaseTaskBackend",
    "DummyBackend",
    "ImmediateBackend",
    "InvalidTask",
    "InvalidTaskBackend",
    "Task",
    "TaskResult",
    "task",
    "task_backends",
]
