"""pytest fixtures for testing spark_decl events and handlers.

Registered as the ``spark_decl`` pytest plugin through an entry point, so installing
spark_decl is enough (``-p no:spark_decl`` switches it off). Loading it reads no Django
setting; the fixtures do, when a test uses them, so projects that do not configure Django
are unaffected.

``spark_events``
    :func:`spark_decl.testing.capture_events` around the whole test: every event
    dispatched during the test, as a :class:`~spark_decl.testing.CapturedEvents`.
``spark_events_no_handlers``
    The same with ``run_handlers=False``: events are claimed and captured, no handler runs.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from spark_decl.testing import CapturedEvents


@pytest.fixture
def spark_events() -> Generator[CapturedEvents[Any], None, None]:
    """Every event dispatched during the test (``capture_events()``); handlers run."""
    from spark_decl.testing import capture_events

    with capture_events() as events:
        yield events


@pytest.fixture
def spark_events_no_handlers() -> Generator[CapturedEvents[Any], None, None]:
    """Every event dispatched during the test, with no handler run
    (``capture_events(run_handlers=False)``)."""
    from spark_decl.testing import capture_events

    with capture_events(run_handlers=False) as events:
        yield events
