"""Typed, declarative event sourcing and handling for Django.

Importable before the app registry is ready: nothing here imports models at module level.
"""

from __future__ import annotations

from .aio import aonly_new_events, aprocess_events
from .claims import only_new_events
from .decorators import event_source, handles
from .dispatch import process_events
from .sources import process_queryset
from .types import BatchResult, DispatchResult, Event, Mode, event

__all__ = [
    "BatchResult",
    "DispatchResult",
    "Event",
    "Mode",
    "aonly_new_events",
    "aprocess_events",
    "event",
    "event_source",
    "handles",
    "only_new_events",
    "process_events",
    "process_queryset",
]
