"""A task run's Prefect state, as a site's status: one definition, for the flow's summary,
`history` and `doctor`.

The site's own report (in the state's data, or the summary artifact) says more, e.g.
`timed_out`: prefer it where it is at hand. This is what the state alone tells.
"""

from __future__ import annotations

from prefect.client.schemas.objects import State, StateType

_BY_TYPE: dict[StateType, str] = {
    StateType.COMPLETED: "succeeded",
    StateType.FAILED: "failed",
    StateType.CANCELLED: "cancelled",
    StateType.CRASHED: "crashed",
    StateType.RUNNING: "running",
}


def site_status(state: State | None) -> str:
    """`succeeded`, `failed`, `cancelled`, `crashed`, `running`, or the state's own name in
    lower case (`scheduled`, `pending`, `awaitingretry`, ...); `unknown` for no state."""
    if state is None:
        return "unknown"
    return _BY_TYPE.get(state.type) or (state.name or state.type.value).lower()
