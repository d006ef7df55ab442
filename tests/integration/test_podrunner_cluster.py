"""The pod runner against the REAL control plane: pods run as local processes.

What a user of the local cluster relies on: a pod's process runs with the environment
Kubernetes would give it; its exit code becomes the pod's phase with the termination message;
deleting the pod delivers SIGTERM and, after the grace period, SIGKILL; and a reclaimed node
kills its pods' processes as a machine going away would.

(Named apart from tests/unit/test_podrunner.py: test modules here need unique basenames.)
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_localcluster.processes import process_alive
from cheapspot_localcluster.waiting import wait_for

CAPACITY = "cheapspot.dev/capacity-type"

# Reports what it sees, then does what EXIT_MODE says.
SCRIPT = r"""
import json, os, pathlib, signal, sys, time
report = pathlib.Path(os.environ["REPORT"])
seen = {k: os.environ.get(k) for k in
        ("GREETING", "POD_IP", "MY_NAME", "MY_NODE", "FROM_SECRET", "HOME", "HF_HOME")}
seen["pid"] = os.getpid()
seen["cwd"] = os.getcwd()
def on_term(signum, frame):
    with report.open("a") as f:
        f.write(json.dumps({"sigterm": time.time()}) + "\n")
    if os.environ["EXIT_MODE"] != "ignore-term":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with report.open("a") as f:
    f.write(json.dumps(seen) + "\n")
mode = os.environ["EXIT_MODE"]
if mode.startswith("orphan:"):  # leave a child behind, as a server's worker process can
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with report.open("a") as f:
        f.write(json.dumps({"child": child.pid}) + "\n")
    sys.exit(int(mode.split(":")[1]))
if mode.startswith("exit:"):
    message = os.environ.get("MESSAGE")
    if message:
        pathlib.Path(os.environ["CHEAPSPOT_TERMINATION_MESSAGE_PATH"]).write_text(message)
    print("the last words of the log", flush=True)
    sys.exit(int(mode.split(":")[1]))
while True:
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def cluster(pods_running_cluster: LocalCluster) -> LocalCluster:
    return pods_running_cluster


@pytest.fixture
def ns(cluster: LocalCluster) -> Iterator[str]:
    core = cluster.core()
    name = f"podrunner-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_secret(
        name, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}}
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)


def make_pod(
    name: str,
    report: Path,
    exit_mode: str,
    *,
    grace: int = 30,
    capacity: str | None = None,
    message: str = "",
    restart: str = "Never",
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "REPORT", "value": str(report)},
        {"name": "EXIT_MODE", "value": exit_mode},
        {"name": "MESSAGE", "value": message},
        {"name": "GREETING", "value": "hello from the spec"},
        {"name": "HOME", "value": "/scratch"},
        {"name": "HF_HOME", "value": "/scratch/hf"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MY_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
    ]
    spec: dict[str, Any] = {
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": grace,
        "containers": [
            {
                "name": "main",
                "image": "cheapspot/worker:test",
                "command": ["python", "-c", SCRIPT],
                "env": env,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "tolerations": [{"key": CAPACITY, "operator": "Exists"}],
    }
    if capacity:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": CAPACITY, "operator": "In", "values": [capacity]}
                            ]
                        }
                    ]
                }
            }
        }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def reports(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pod_dict(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        obj = cluster.core().read_namespaced_pod(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data: dict[str, Any] = cluster.api_client().sanitize_for_serialization(obj)
    return data


def running(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any] | None:
    pod = pod_dict(cluster, ns, name)
    if pod and pod.get("status", {}).get("phase") == "Running":
        return pod
    return None


def finished(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any] | None:
    pod = pod_dict(cluster, ns, name)
    if pod and pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return pod
    return None


@dataclass(frozen=True)
class Ending:
    exit_mode: str
    message: str
    phase: str
    reason: str
    expected_message: str


@pytest.mark.parametrize(
    "case",
    [
        Ending("exit:0", "", "Succeeded", "Completed", ""),
        Ending("exit:65", "line 3 is not JSON", "Failed", "Error", "line 3 is not JSON"),
        # No message file: FallbackToLogsOnError turns the log's tail into the message.
        Ending("exit:75", "", "Failed", "Error", "the last words of the log"),
    ],
    ids=["succeeded", "message-file", "log-tail"],
)
def test_a_pod_runs_as_a_process_with_its_env_and_its_exit_becomes_the_phase(
    cluster: LocalCluster, ns: str, tmp_path: Path, case: Ending
) -> None:
    exit_mode, message, phase = case.exit_mode, case.message, case.phase
    reason, expected_message = case.reason, case.expected_message
    report = tmp_path / "report.jsonl"
    core = cluster.core()
    core.create_namespaced_pod(ns, make_pod("job", report, exit_mode, message=message))

    pod = wait_for(f"pod to end {phase}", lambda: finished(cluster, ns, "job"))
    status = pod["status"]
    assert status["phase"] == phase
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == int(exit_mode.split(":")[1])
    assert terminated["reason"] == reason
    assert terminated.get("message", "") == expected_message

    (seen,) = reports(report)
    assert seen["GREETING"] == "hello from the spec"
    assert seen["MY_NAME"] == "job"
    assert seen["MY_NODE"] == pod["spec"]["nodeName"]
    assert seen["FROM_SECRET"] == "s3cr3t"
    assert seen["POD_IP"] == status["podIP"] and seen["POD_IP"].startswith("127.0.0.")
    # The emptyDir at /scratch is a directory of the pod's own; env values under it follow.
    assert seen["HOME"] != "/scratch" and Path(seen["HOME"]).is_dir()
    assert seen["HF_HOME"] == seen["HOME"] + "/hf"


def test_a_containers_other_processes_end_with_its_main_process(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    """As a container runtime does: the main process gone, nothing of the pod runs on (a
    child left behind would keep the pod's ports, and its IP goes to the next pod)."""
    report = tmp_path / "report.jsonl"
    cluster.core().create_namespaced_pod(ns, make_pod("parent", report, "orphan:3"))
    pod = wait_for("pod to end Failed", lambda: finished(cluster, ns, "parent"))
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    child = next(r["child"] for r in reports(report) if "child" in r)
    wait_for("the child to be killed", lambda: not process_alive(child), 10)


def test_a_restart_always_container_is_restarted_in_place_with_its_ip(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    """A Deployment's pod (restartPolicy Always) whose process dies: as kubelet, the runner
    starts the container again in the same pod with the same IP, at once the first time and
    after a back-off (10 s) the second; the pod never fails."""
    report = tmp_path / "report.jsonl"
    core = cluster.core()
    core.create_namespaced_pod(ns, make_pod("server", report, "run", restart="Always"))

    def runs() -> list[dict[str, Any]]:
        return [r for r in reports(report) if "pid" in r]

    def status() -> dict[str, Any]:
        st: dict[str, Any] = (pod_dict(cluster, ns, "server") or {}).get("status") or {}
        return {**st, "cs": st.get("containerStatuses") or [{}]}

    first = wait_for("the first run", runs)[0]
    os.killpg(first["pid"], signal.SIGKILL)  # the whole container, no goodbye
    second = wait_for("the second run, at once", lambda: runs()[1:], 10)[0]
    assert second["POD_IP"] == first["POD_IP"], "restarted in place keeps the pod's IP"
    st = wait_for(
        "restartCount 1, running",
        lambda: (
            (s := status())["cs"][0].get("restartCount") == 1
            and "running" in s["cs"][0]["state"]
            and s
        ),
        10,
    )
    assert (st["phase"], st["podIP"]) == ("Running", first["POD_IP"])
    assert st["cs"][0]["lastState"]["terminated"]["exitCode"] == 137

    killed = time.monotonic()
    os.killpg(second["pid"], signal.SIGKILL)  # again: now kubelet backs off
    st = wait_for(
        "the back-off reported",
        lambda: "waiting" in (s := status())["cs"][0]["state"] and s,
        10,
    )
    assert st["phase"] == "Running"
    assert st["cs"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    third = wait_for("the third run", lambda: runs()[2:], 30)[0]
    assert time.monotonic() - killed >= 9, "restarted before its back-off was over"
    assert third["POD_IP"] == first["POD_IP"]
    core.delete_namespaced_pod("server", ns)
    wait_for("the pod gone", lambda: pod_dict(cluster, ns, "server") is None, 40)
    assert not process_alive(third["pid"])


def test_deletion_delivers_sigterm_then_sigkill_after_the_grace_period(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    core = cluster.core()
    polite, stubborn = tmp_path / "polite.jsonl", tmp_path / "stubborn.jsonl"
    core.create_namespaced_pod(ns, make_pod("polite", polite, "run", grace=30))
    core.create_namespaced_pod(ns, make_pod("stubborn", stubborn, "ignore-term", grace=3))
    for report in (polite, stubborn):
        wait_for(f"{report.stem} to start", lambda r=report: reports(r))
    for name in ("polite", "stubborn"):
        pod = wait_for(f"{name} Running", lambda n=name: running(cluster, ns, n))
        assert pod["status"]["containerStatuses"][0]["state"].get("running")

    deleted = time.monotonic()
    core.delete_namespaced_pod("polite", ns)
    core.delete_namespaced_pod("stubborn", ns)

    # The polite one hears SIGTERM at once and leaves well within its 30 s.
    wait_for("polite's SIGTERM", lambda: any("sigterm" in r for r in reports(polite)), 10)
    wait_for("polite to be gone", lambda: pod_dict(cluster, ns, "polite") is None, 15)
    assert time.monotonic() - deleted < 15

    # The stubborn one hears SIGTERM too, ignores it, and is SIGKILLed once its 3 s are up.
    wait_for("stubborn's SIGTERM", lambda: any("sigterm" in r for r in reports(stubborn)), 10)
    pid = reports(stubborn)[0]["pid"]
    wait_for("stubborn's process to be killed", lambda: not process_alive(pid), 20)
    assert time.monotonic() - deleted >= 3, "killed before its grace period was up"
    wait_for("stubborn to be gone", lambda: pod_dict(cluster, ns, "stubborn") is None, 15)
    assert not process_alive(reports(polite)[0]["pid"])


def test_a_reclaimed_node_kills_its_pods_processes(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    report = tmp_path / "victim.jsonl"
    cluster.core().create_namespaced_pod(
        ns, make_pod("victim", report, "run", grace=30, capacity="spot")
    )
    wait_for("victim to start", lambda: reports(report))
    pod = pod_dict(cluster, ns, "victim")
    assert pod is not None
    node = pod["spec"]["nodeName"]
    assert node in cluster.spot_nodes()
    pid = reports(report)[0]["pid"]
    assert process_alive(pid)

    try:
        # No notice: the machine is simply gone. Its processes die with it, unwarned.
        cluster.preempt(node, notice_s=0)
        assert not process_alive(pid)
        assert not any("sigterm" in r for r in reports(report)), "a vanished machine sent SIGTERM"
        assert pod_dict(cluster, ns, "victim") is None
    finally:
        cluster.create_nodes()  # give the node back for the next test
    assert os.path.exists(report)


# Answers GET /ready with 200 while the flag file exists, 503 otherwise, on the pod's own IP.
PROBED = r"""
import http.server, os, pathlib
flag = pathlib.Path(os.environ["FLAG"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if flag.exists() else 503)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer((os.environ["POD_IP"], 8001), H).serve_forever()
"""


def _ready(cluster: LocalCluster, ns: str, name: str) -> bool | None:
    pod = running(cluster, ns, name)
    if pod is None:
        return None
    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
    return conds.get("Ready") == "True"


def test_a_readiness_probe_gates_ready_on_the_pods_own_ip(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    flag = tmp_path / "ready"
    pod = make_pod("probed", tmp_path / "unused.jsonl", "run")
    c = pod["spec"]["containers"][0]
    c["command"] = ["python", "-c", PROBED]
    c["env"] = [
        {"name": "FLAG", "value": str(flag)},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    c["ports"] = [{"name": "admin", "containerPort": 8001}]
    c["readinessProbe"] = {
        "httpGet": {"path": "/ready", "port": "admin"},
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    cluster.core().create_namespaced_pod(ns, pod)
    wait_for("probed Running", lambda: running(cluster, ns, "probed"))
    time.sleep(3)  # several failed probes
    assert _ready(cluster, ns, "probed") is False
    flag.write_text("yes")
    wait_for("probed Ready", lambda: _ready(cluster, ns, "probed"), 15)
    flag.unlink()
    wait_for("probed no longer Ready", lambda: _ready(cluster, ns, "probed") is False, 15)


LISTER = r"""
import json, os, pathlib
from kubernetes import client, config
config.load_kube_config()
api = client.CoreV1Api()
out = {}
for ns in (os.environ["POD_NAMESPACE"], "default"):
    try:
        api.list_namespaced_pod(ns)
        out[ns] = 200
    except client.exceptions.ApiException as exc:
        out[ns] = exc.status
pathlib.Path(os.environ["REPORT"]).write_text(json.dumps(out))
"""


def test_a_pod_talks_to_the_api_server_with_its_service_accounts_rbac_only(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    core = cluster.core()
    rbac = cluster.api_client()
    from kubernetes import client

    core.create_namespaced_service_account(ns, {"metadata": {"name": "reader"}})
    client.RbacAuthorizationV1Api(rbac).create_namespaced_role(
        ns,
        {
            "metadata": {"name": "reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    client.RbacAuthorizationV1Api(rbac).create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )
    report = tmp_path / "lister.json"
    pod = make_pod("lister", report, "run")
    pod["spec"]["serviceAccountName"] = "reader"
    pod["spec"]["containers"][0]["command"] = ["python", "-c", LISTER]
    pod["spec"]["containers"][0]["env"] = [{"name": "REPORT", "value": str(report)}]
    core.create_namespaced_pod(ns, pod)
    ended = wait_for("lister to finish", lambda: finished(cluster, ns, "lister"), 60)
    assert ended["status"]["phase"] == "Succeeded", ended["status"]
    assert json.loads(report.read_text()) == {ns: 200, "default": 403}


def test_pods_are_ready_again_once_a_starved_node_renews_its_lease(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    """On a busy machine kwok can miss its nodes' lease renewals: the node lifecycle
    controller then calls them NotReady and marks every pod on them not ready. Once the
    leases are renewed, a kubelet reports its pods' readiness again; so must the runner, or a
    pod without a probe (a router) stays not ready for good."""
    core = cluster.core()
    core.create_namespaced_pod(ns, make_pod("steady", tmp_path / "steady.jsonl", "run"))
    wait_for("steady Ready", lambda: _ready(cluster, ns, "steady"), 30)
    node = running(cluster, ns, "steady")["spec"]["nodeName"]  # type: ignore[index]

    def node_ready() -> bool:
        from cheapspot_localcluster.reclaim import is_ready

        raw = cluster.api_client().sanitize_for_serialization(core.read_node(node))
        return is_ready(raw)

    with cluster.starved("kwok"):
        wait_for("the node NotReady", lambda: not node_ready(), 60)
        wait_for("steady marked not ready", lambda: _ready(cluster, ns, "steady") is False, 30)
    wait_for("the node Ready again", node_ready, 60)
    wait_for("steady Ready again", lambda: _ready(cluster, ns, "steady"), 15)
    assert reports(tmp_path / "steady.jsonl"), "the pod's process never ran"
