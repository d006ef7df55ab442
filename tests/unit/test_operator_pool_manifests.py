"""The pool's pure builders: what the API server receives."""

from __future__ import annotations

import pytest

from cheapspot.contract import (
    ADMIN_PORT,
    ANNOTATION_DRAINING,
    ROUTER_READY_PATH,
    TASK_ENV,
    ServeTask,
)
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import PROFILES
from cheapspot_operator.cluster.pods import NO_VOLUNTARY_DISRUPTION, Placement
from cheapspot_operator.inferencepool.manifests import (
    PoolInfo,
    build_pdbs,
    build_replica_pod,
    build_router_deployment,
    build_router_rbac,
    build_router_service,
    router_patch,
)
from cheapspot_operator.inferencepool.observed import replica_pod_view
from cheapspot_operator.router.server import parser as router_parser
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.testing.pool import make_pool

CONFIG = OperatorConfig()
INFO = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(engine={"shutdownTimeoutSeconds": 40}))


def _placement(capacity: CapacityType) -> Placement:
    return Placement(PROFILES["eks-karpenter"], capacity, avoid_nodes=("doomed-1",))


def test_a_replica_pod_is_restricted_probed_owned_and_waits_out_the_drain() -> None:
    pod = build_replica_pod(
        INFO, 2, 3, _placement(CapacityType.SPOT), CONFIG.worker, serving=CONFIG.serving
    )
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "qa-serve-replica-2-3"
    assert meta["labels"]["cheapspot.dev/pool"] == "qa-serve"
    assert meta["labels"]["cheapspot.dev/pool-role"] == "replica"
    assert meta["labels"]["cheapspot.dev/replica"] == "2"
    assert meta["ownerReferences"][0]["uid"] == "uid-7"
    assert meta["ownerReferences"][0]["kind"] == "CheapInferencePool"
    # Grace covers vLLM's drain (40 s + margin) and the cloud's notice (120 s here).
    assert spec["terminationGracePeriodSeconds"] == 120
    (c,) = spec["containers"]
    assert c["image"] == CONFIG.serving.image
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/cheapspot/ready", ADMIN_PORT)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    task = ServeTask.model_validate_json(
        next(e["value"] for e in c["env"] if e["name"] == TASK_ENV)
    )
    assert (task.replica_index, task.attempt) == (2, 3)
    assert [a.name for a in task.adapters] == ["qa"]
    assert task.engine.shutdown_timeout_seconds == 40
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = terms["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == ["spot"]
    assert term["matchFields"][0]["values"] == ["doomed-1"]


def test_the_planner_reads_back_what_the_builder_writes() -> None:
    pod = build_replica_pod(
        INFO, 1, 0, _placement(CapacityType.ON_DEMAND), CONFIG.worker, serving=CONFIG.serving
    )
    pod["metadata"]["annotations"][ANNOTATION_DRAINING] = "2026-01-01T12:00:30Z"
    pod["status"] = {
        "phase": "Running",
        "podIP": "127.0.0.9",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    view = replica_pod_view(pod)
    assert view is not None
    assert (view.index, view.attempt, view.ready, view.ip) == (1, 0, True, "127.0.0.9")
    assert view.draining_until is not None and view.draining_until.second == 30
    assert view.pod.capacity == "on-demand"


def test_the_router_runs_on_demand_behind_a_service_reading_pods_of_its_namespace_only() -> None:
    dep = build_router_deployment(
        INFO, 2, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    assert dep["spec"]["replicas"] == 2
    tmpl = dep["spec"]["template"]
    (c,) = tmpl["spec"]["containers"]
    assert c["command"][:2] == ["cheapspot", "router"]
    assert c["command"][c["command"].index("--pool") + 1] == "qa-serve"
    assert tmpl["spec"]["serviceAccountName"] == "qa-serve-router"
    terms = tmpl["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["on-demand"]
    assert dep["spec"]["selector"]["matchLabels"]["cheapspot.dev/pool-role"] == "router"
    svc = build_router_service(INFO)
    assert svc["metadata"]["name"] == "qa-serve"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == 8080
    sa, role, binding = build_router_rbac(INFO)
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == "team-a"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "uid-7" for o in (sa, role, binding))


def test_the_router_is_probed_and_drains_within_its_grace_period() -> None:
    info = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(router={"maxQueueSeconds": 45}))
    dep = build_router_deployment(
        info, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == (ROUTER_READY_PATH, c["ports"][0]["containerPort"])
    # A request may queue maxQueueSeconds before a replica takes it: the drain covers that,
    # and the grace period the drain plus the time to exit.
    drain = float(c["command"][c["command"].index("--drain-seconds") + 1])
    assert 45 < drain < pod["terminationGracePeriodSeconds"]
    # A rolling update never has fewer ready routers than asked for.
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_router_gets_the_pools_stall_bounds() -> None:
    """The router's bounds on a silent replica come from the pool's router section, and its
    command line parses them."""
    for router, expect in (
        ({}, ("60", "20")),
        ({"firstTokenSeconds": 90, "stallSeconds": 7.5}, ("90", "7.5")),
    ):
        info = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(router=router))
        dep = build_router_deployment(
            info, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
        )
        command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
        got = tuple(
            command[command.index(f) + 1] for f in ("--first-token-seconds", "--stall-seconds")
        )
        assert got == expect
        args = router_parser().parse_args(command[command.index("--pool") :])
        assert (args.first_token_seconds, args.stall_seconds) == tuple(map(float, expect))


def test_the_router_gets_the_pools_memory_bounds_with_the_routers_own_defaults() -> None:
    """The pool's router.max* settings reach the router's command line, which parses them
    into its limits; left out, they are the router's own defaults (one set of numbers)."""
    from cheapspot_operator.router import limits
    from cheapspot_operator.router.server import bounds_from

    for router, expect in (
        ({}, limits.Limits()),
        (
            {
                "maxRequestBytes": 65536,
                "maxConcurrentRequests": 10,
                "maxQueuedRequests": 0,
                "maxBufferedBytes": 131072,
            },
            limits.Limits(65536, 10, 0, 131072),
        ),
    ):
        info = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(router=router))
        dep = build_router_deployment(
            info, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
        )
        command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
        assert bounds_from(router_parser().parse_args(command[command.index("--pool") :])) == (
            expect
        )
    with pytest.raises(ValueError, match="maxBufferedBytes"):
        make_pool(router={"maxRequestBytes": 65536, "maxBufferedBytes": 4096})


def test_a_replica_pods_scratch_is_bounded_like_a_shards() -> None:
    """A replica that fills /tmp (the base model, its adapters) is evicted for it, instead of
    filling the node's disk and getting every pod there evicted."""
    placement = _placement(CapacityType.SPOT)
    for resources, size in (({}, "100Gi"), ({"scratchSize": "300Gi"}, "300Gi")):
        info = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(resources=resources))
        assert info.spec.resources.scratch_size == size
        pod = build_replica_pod(info, 0, 0, placement, CONFIG.worker, serving=CONFIG.serving)
        (volume,) = pod["spec"]["volumes"]
        (mount,) = pod["spec"]["containers"][0]["volumeMounts"]
        assert (volume["name"], mount["mountPath"]) == (mount["name"], "/tmp")
        assert volume["emptyDir"] == {"sizeLimit": size}


def test_the_router_lets_its_longest_stream_finish_by_default_and_as_configured() -> None:
    for router, at_least in (({}, 600), ({"drainSeconds": 1800}, 1800), ({"drainSeconds": 0}, 30)):
        info = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(router=router))
        dep = build_router_deployment(
            info, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
        )
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        drain = float(c["command"][c["command"].index("--drain-seconds") + 1])
        # The drain covers drainSeconds (or maxQueueSeconds, 30 s by default); the grace
        # period the drain plus the time to exit.
        assert at_least <= drain < pod["terminationGracePeriodSeconds"], router


def test_replica_and_router_pods_are_not_disrupted_voluntarily() -> None:
    pod = build_replica_pod(
        INFO, 1, 0, _placement(CapacityType.SPOT), CONFIG.worker, serving=CONFIG.serving
    )
    dep = build_router_deployment(
        INFO, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    for marks in (
        pod["metadata"]["annotations"],
        dep["spec"]["template"]["metadata"]["annotations"],
    ):
        assert marks["karpenter.sh/do-not-disrupt"] == "true"
        assert marks["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert NO_VOLUNTARY_DISRUPTION.items() <= marks.items()


def test_the_anchors_and_the_router_have_disruption_budgets_owned_by_the_pool() -> None:
    info = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(replicas=4, anchor={"replicas": 2}))
    anchors, router = build_pdbs(info)
    assert anchors["kind"] == router["kind"] == "PodDisruptionBudget"
    assert anchors["spec"]["maxUnavailable"] == 0
    sel = anchors["spec"]["selector"]
    assert sel["matchLabels"] == {
        "cheapspot.dev/pool": "qa-serve",
        "cheapspot.dev/pool-role": "replica",
    }
    assert sel["matchExpressions"] == [
        {"key": "cheapspot.dev/replica", "operator": "In", "values": ["0", "1"]}
    ]
    # The router's selector is its Deployment's: one router always stays.
    dep = build_router_deployment(
        info, 2, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    assert router["spec"]["selector"] == dep["spec"]["selector"]
    assert router["spec"]["minAvailable"] == 1
    for pdb in (anchors, router):
        assert pdb["metadata"]["ownerReferences"][0]["uid"] == "uid-7"
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # No anchors: only the router's.
    none = PoolInfo("team-a", "qa-serve", "uid-7", make_pool(replicas=2, anchor={"replicas": 0}))
    assert [p["metadata"]["name"] for p in build_pdbs(none)] == ["qa-serve-router"]


def test_a_changed_router_template_is_patched_in_an_unchanged_one_left_alone() -> None:
    old = build_router_deployment(
        INFO, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    # Same template, another count: only the count.
    same = build_router_deployment(
        INFO, 2, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
    )
    assert router_patch(old, same) == {"spec": {"replicas": 2}}
    # A new image: the template and its hash.
    serving = CONFIG.serving.model_copy(update={"router_image": "example.org/router:2"})
    new = build_router_deployment(
        INFO, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, serving
    )
    patch = router_patch(old, new)
    assert patch["spec"]["template"]["spec"]["containers"][0]["image"] == "example.org/router:2"
    key = "cheapspot.dev/template-hash"
    assert patch["metadata"]["annotations"][key] == new["metadata"]["annotations"][key]
    assert new["metadata"]["annotations"][key] != old["metadata"]["annotations"][key]
    # A Deployment from before the hash existed gets the template too.
    del old["metadata"]["annotations"]
    assert "template" in router_patch(old, same)["spec"]
