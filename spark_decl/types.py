"""The settled types: the event and its constructor, and what dispatches and batches
report (they appear in public signatures, so everything else may import them)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar, overload

C = TypeVar("C")


class Event(TypedDict, Generic[C]):
    """One event: a ``group`` for routing, a globally unique ``key``, and a typed ``context``.

    ``Event[ChallengeContext]`` makes ``event["context"]["challenge"]`` a ``Challenge`` in
    the type checker::

        class ChallengeContext(TypedDict):
            challenge: Challenge

        def handler(event: Event[ChallengeContext]) -> None:
            event["context"]["challenge"].title
    """

    group: str
    key: str
    context: C


@overload
def event(group: str, instance_id: object, context: None = None) -> Event[dict[str, Any]]: ...
@overload
def event(group: str, instance_id: object, context: C) -> Event[C]: ...
def event(group: str, instance_id: object, context: object = None) -> Event[Any]:
    """Build an event whose key is ``f"{group}_{instance_id}"``.

    >>> event("challenge_created", 42, {"points": 3})
    {'group': 'challenge_created', 'key': 'challenge_created_42', 'context': {'points': 3}}
    """
    return {"group": group, "key": f"{group}_{instance_id}", "context": context or {}}


@dataclass
class DispatchResult:
    """Counts of what a dispatch did."""

    events: int = 0
    calls: int = 0
    failed: int = 0
    skipped: int = 0
    #: Background calls enqueued (or to be enqueued when the transaction commits).
    enqueued: int = 0

    def __iadd__(self, other: DispatchResult) -> DispatchResult:
        self.events += other.events
        self.calls += other.calls
        self.failed += other.failed
        self.skipped += other.skipped
        self.enqueued += other.enqueued
        return self


@dataclass
class BatchResult:
    """What a batch run over one or more querysets did."""

    rows: int = 0
    events: int = 0
    new: int = 0
    source_errors: int = 0
    dispatch: DispatchResult = field(default_factory=DispatchResult)

    def __iadd__(self, other: BatchResult) -> BatchResult:
        self.rows += other.rows
        self.events += other.events
        self.new += other.new
        self.source_errors += other.source_errors
        self.dispatch += other.dispatch
        return self

    def copy(self) -> BatchResult:
        return dataclasses.replace(self, dispatch=dataclasses.replace(self.dispatch))


class Mode(enum.Enum):
    """What a batch does with the events its sources produce."""

    #: Claim the new events and run their handlers.
    HANDLE = "handle"
    #: Claim the new events without running any handler (switching spark_decl on over
    #: existing data without mailing everyone).
    MARK_ONLY = "mark_only"
    #: Claim nothing, run nothing; only count what is new.
    DRY_RUN = "dry_run"
