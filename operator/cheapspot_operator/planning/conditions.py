"""Conditions in the ``metav1.Condition`` shape, kept per type."""

from __future__ import annotations

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
