"""What a pool's status shows, assembled from its slots, replica pods and their reports. Pure.

After the slots are reconciled and the old pods retired, the status gets what people and
``kubectl get`` read: the replica counts (ready, spot, on-demand, draining) and the ``Ready``,
``SpotUnavailable`` and ``Degraded`` conditions (with an event when an adapter error appears).
"""

from __future__ import annotations

from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.inferencepool.actions import Pass
from cheapspot_operator.inferencepool.observed import ReplicaPod
from cheapspot_operator.planning.conditions import ConditionWriter


def summarise(work: Pass) -> None:
    st, obs, now, gen = work.status, work.obs, work.now, work.obs.pool.generation
    active = [s for s in st.slots if not s.held]
    st.replicas = len(active)
    serving = {
        rp.index
        for rp in obs.replicas
        if rp.live and rp.ready and rp.draining_until is None and not _doomed(rp, work)
    }
    st.ready_replicas = sum(1 for s in active if s.index in serving)
    st.spot_replicas = sum(1 for s in active if s.capacity_type is CapacityType.SPOT)
    st.on_demand_replicas = len(active) - st.spot_replicas
    st.replicas_display = f"{st.ready_replicas}/{work.replicas}"
    st.placement_display = f"{st.spot_replicas}/{st.on_demand_replicas}"
    st.draining_replicas = len(st.draining)

    out = ConditionWriter(st.conditions, now, gen)
    put = out.put
    router_ready = obs.router is not None and obs.router.ready_replicas > 0
    if work.replicas == 0 and work.over_budget:
        put("Ready", "False", "BudgetExceeded", "every replica stopped: spec.budget reached")
    elif work.replicas == 0:
        put("Ready", "False", "ScaledToZero", "spec.replicas is 0")
    elif st.ready_replicas == 0:
        put("Ready", "False", "NoReplicaReady", f"0/{work.replicas} replicas ready")
    elif not router_ready:
        put("Ready", "False", "RouterNotReady", "no router pod is ready")
    else:
        put(
            "Ready",
            "True",
            "Serving",
            f"{st.ready_replicas}/{work.replicas} replicas ready",
        )
    fallback = [s for s in active if not s.anchor and s.capacity_type is CapacityType.ON_DEMAND]
    if fallback:
        put(
            "SpotUnavailable",
            "True",
            "FellBackToOnDemand",
            "on on-demand: " + ", ".join(str(s.index) for s in fallback),
        )
    else:
        put("SpotUnavailable", "False", "OnSpot")
    problems = [s.held for s in st.slots if s.held]
    problems += sorted(f"{name}: {r.message}" for name, r in obs.reports.items() if r.message)
    previous = next((x for x in st.conditions if x.type == "Degraded"), None)
    if problems:
        message = "; ".join(problems)[:2000]
        reason = "ReplicaFailed" if any(s.held for s in st.slots) else "AdapterError"
        changed = previous is None or previous.status != "True" or previous.message != message
        if changed and reason == "AdapterError":
            work.event("Warning", reason, message, reason)
        put("Degraded", "True", reason, message)
    else:
        put("Degraded", "False", "AsExpected")
    st.conditions = out.conditions


def _doomed(rp: ReplicaPod, work: Pass) -> bool:
    return rp.pod.node_name in work.avoid
