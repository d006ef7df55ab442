"""The operator's kopf wiring: which watch event feeds which cache and wakes which loop, for
CheapTrainJobs and CheapInferencePools alike (:func:`make_registry`).

kopf choices, on purpose:

* **A loop per object without a finalizer** (:mod:`runtime.loops`): an event handler on each
  kind starts one asyncio task per object; pod and node events poke the objects they concern.
* **One handler per watched resource**: kopf's watches feed the reconcilers' caches (the
  objects, their pods, the nodes: :mod:`runtime.watchcache`) before any loop is woken, so a
  woken reconcile reads what woke it. One node handler feeds the shared node list, heartbeats
  included, and wakes the jobs and pools with pods on a node whose change matters.
* **Watch timeouts**: ``settings.watching.server_timeout`` 300 s (the API server ends the
  watch, kopf re-lists: a silently dead connection cannot stall the operator for long),
  ``client_timeout`` a bit above it, ``connect_timeout`` 10 s, and
  ``settings.networking.request_timeout`` 30 s for kopf's own API calls.
* **Handler progress in status**: ``StatusProgressStorage`` under ``status.kopf`` (the CRD
  preserves that field) and the last-handled configuration in a ``cheapspot.dev`` annotation.
  The event handlers here keep no progress; the setting makes the place explicit for any
  change handler added later.
* **Peering**: standalone unless ``peeringPriority`` is configured. The chart runs one replica
  (Deployment strategy Recreate); several replicas need distinct peering priorities.
* **Events**: kopf's own per-handler events are posted at WARNING and above only; the Events a
  user should notice (Preempted, FellBackToOnDemand, ReturnedToSpot, Completed, failures)
  come from the planners and are posted by :meth:`ObjectReconciler.post_event`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from cheapspot.contract import LABEL_POOL
from cheapspot_operator.api import common
from cheapspot_operator.api import inferencepool as ps
from cheapspot_operator.api import trainjob as s
from cheapspot_operator.api.phases import JobPhase
from cheapspot_operator.inferencepool.controller import PoolReconciler
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.loops import loops_for
from cheapspot_operator.trainjob.controller import Reconciler
from cheapspot_operator.trainjob.observed import LABEL_JOB

TERMINAL_PHASES = frozenset(p.value for p in JobPhase if p.is_terminal())


def connection_info(config: Any, settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """kopf's credentials from the reconcilers' API client configuration."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else parts
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        trust_env=settings.networking.trust_env,
    )


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="cheapspot.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "cheapspot.dev/finalizer"
    settings.posting.level = logging.WARNING
    settings.peering.standalone = config.peering_priority is None
    if config.peering_priority is not None:
        settings.peering.priority = config.peering_priority
        settings.peering.name = "cheapspot"


def make_registry(
    jobs: Reconciler, pools: PoolReconciler, config: OperatorConfig
) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers, bound to the two reconcilers (which
    share one node list)."""
    registry = kopf.OperatorRegistry()
    shared = pools.nodes is jobs.nodes
    jobs.watch()
    pools.watch(nodes=not shared)
    job_loops = loops_for(jobs, config, "reconcile")
    pool_loops = loops_for(pools, config, "reconcile-pool")

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, config)

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        # kopf talks with the very credentials the reconcilers use (in-cluster or the given
        # kubeconfig), so both always reach the same API server as the same identity.
        return connection_info(jobs.api.configuration, settings)

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        for loops in (job_loops, pool_loops):
            await loops.stop_all()
            loops.shutdown()

    @kopf.on.event(common.GROUP, common.VERSION, s.PLURAL, registry=registry)
    async def job_event(
        event: Mapping[str, Any], namespace: str | None, name: str | None, **_: Any
    ) -> None:
        if not namespace or not name:
            return
        job = event.get("object") or {}
        news = jobs.observe_object(event.get("type"), job)
        if event.get("type") == "DELETED":
            job_loops.stop((namespace, name))
            return
        if not news and (namespace, name) in job_loops.tasks:
            return  # our own status write coming back: the pass that wrote it saw it all
        phase = str((job.get("status") or {}).get("phase") or "")
        version = str((job.get("metadata") or {}).get("resourceVersion") or "")
        if phase in TERMINAL_PHASES and job_loops.settled.get((namespace, name)) == version:
            return  # our own last status write of a finished job: nothing to do
        if phase in TERMINAL_PHASES:
            job_loops.settled[(namespace, name)] = version
        job_loops.ensure((namespace, name))

    @kopf.on.event(common.GROUP, common.VERSION, ps.PLURAL, registry=registry)
    async def pool_event(
        event: Mapping[str, Any], namespace: str | None, name: str | None, **_: Any
    ) -> None:
        if not namespace or not name:
            return
        pools.observe_object(event.get("type"), event.get("object") or {})
        if event.get("type") == "DELETED":
            pool_loops.stop((namespace, name))
        else:
            pool_loops.ensure((namespace, name))

    @kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def job_pod_event(
        event: Mapping[str, Any], labels: Mapping[str, str], namespace: str | None, **_: Any
    ) -> None:
        pod = event.get("object") or {}
        news = jobs.observe_pod(event.get("type"), pod)
        if namespace:
            key = (namespace, labels[LABEL_JOB])
            job_loops.place(event.get("type"), pod, key)
            if news:
                # A pod's changes within a moment (bound, running) are one pass; a reclaim
                # notice comes from its node, at once.
                job_loops.poke_soon(key)

    @kopf.on.event("", "v1", "pods", labels={LABEL_POOL: kopf.PRESENT}, registry=registry)
    async def pool_pod_event(
        event: Mapping[str, Any], labels: Mapping[str, str], namespace: str | None, **_: Any
    ) -> None:
        pod = event.get("object") or {}
        pools.observe_pod(event.get("type"), pod)
        if namespace:
            key = (namespace, labels[LABEL_POOL])
            pool_loops.place(event.get("type"), pod, key)
            pool_loops.poke(key)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_event(event: Mapping[str, Any], name: str | None, **_: Any) -> None:
        if not name:
            return
        # Every event feeds the node list, heartbeats too; only a change that matters wakes
        # the jobs and pools it concerns.
        node = event.get("object") or {}
        jobs.nodes.observe(event.get("type"), node)
        if not shared:
            pools.nodes.observe(event.get("type"), node)
        for loops in (job_loops, pool_loops):
            loops.node_changed(event.get("type"), name, node)

    return registry
