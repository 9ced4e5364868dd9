"""The event type and the :func:`event` constructor."""

from __future__ import annotations

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
