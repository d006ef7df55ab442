"""Conditions in the ``metav1.Condition`` shape, kept per type."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cheapspot_operator.api.common import Condition


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """``conditions`` with ``new`` in place of its type; lastTransitionTime (``new``'s, the
    current time) is kept from the old condition while the status stays the same."""
    out: list[Condition] = []
    for old in conditions:
        if old.type != new.type:
            out.append(old)
        elif old.status == new.status and old.last_transition_time is not None:
            out.append(new.model_copy(update={"last_transition_time": old.last_transition_time}))
        else:
            out.append(new)
    if all(c.type != new.type for c in conditions):
        out.append(new)
    return out


@dataclass
class ConditionWriter:
    """A status's conditions as one pass rewrites them: each set now, for ``generation``."""

    conditions: list[Condition]
    now: datetime
    generation: int

    def put(self, type_: str, status: str, reason: str, message: str = "") -> None:
        new = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=self.now,
            observed_generation=self.generation,
        )
        self.conditions = set_condition(self.conditions, new)
