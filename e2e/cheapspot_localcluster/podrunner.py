"""Plays kubelet for the simulated nodes: runs each pod as a local process.

kwok keeps the simulated nodes alive; in the cluster's ``external`` pod-lifecycle mode it
leaves pods alone and this runner owns them, as a kubelet would:

* a pod bound to a live node is started as a local process: the first container's
  ``command`` + ``args`` with its environment (``value``, ``fieldRef``, ``secretKeyRef``,
  ``configMapKeyRef`` and ``envFrom``), in a working directory of its own, with its own
  loopback pod IP (``127.0.0.N``) reported in ``status.podIP``;
* **images map to the local installation**: the image name is not pulled or run; the command
  is looked up on the runner's ``PATH``, whose first entry is the project's virtual
  environment. ``Dockerfile.worker`` installs the same ``cheapspot`` distribution into the
  image, so ``cheapspot worker`` means the same program in both places;
* the pod's status stays true: Running with a started container, then Succeeded or Failed
  with the exit code, and a termination message read from the file named by
  ``CHEAPSPOT_TERMINATION_MESSAGE_PATH`` (the local stand-in for ``terminationMessagePath``)
  or, with ``FallbackToLogsOnError``, the tail of the log; the main process gone, the rest of
  its process group is killed, as a container runtime ends a container's other processes (a
  server's child left behind would keep the pod's ports, and its IP goes to the next pod);
* a pod marked for deletion (deleted, evicted) gets SIGTERM, SIGKILL after its grace period,
  and is then removed, as kubelet does;
* a pod whose machine went away (the reclaim switched the node off: kwok no longer acts for
  it, or the Node object is gone) is killed at once with SIGKILL and nothing more is reported
  for it, as nothing would be on a real cloud: the control plane's own controllers deal with
  the pod object. A node that is merely NotReady (a missed lease renewal on a busy machine)
  keeps its processes, as a real kubelet cut off from the API server does;
* ``secret`` volumes become directories of the pod's own holding the Secret's keys as files
  (written at start; later edits of the Secret do not reach them);
* ``emptyDir`` volumes become directories of the pod's own, and environment values under a
  volume's ``mountPath`` (``HOME=/tmp`` with an emptyDir at ``/tmp``) point into them: a
  local process cannot have a private ``/tmp``, so this keeps pods from sharing caches;
* the pod's processes die with the runner (``PR_SET_PDEATHSIG``): stopping the runner is
  every simulated machine going away at once;
* **readiness probes** (``httpGet``) are run against the pod's IP as kubelet runs them
  (``initialDelaySeconds``, ``periodSeconds``, ``timeoutSeconds``, ``successThreshold``,
  ``failureThreshold``): the pod is reported Running but not Ready until its probe succeeds,
  and Ready flips back when it fails. A pod without a probe is Ready once started;
* **images with an environment of their own**: an image whose repository name is in
  :data:`IMAGE_ENVIRONMENTS` (the serving image: vLLM pins its own torch and transformers)
  runs with that virtual environment first on ``PATH``;
* **service account tokens**: a pod that does not turn ``automountServiceAccountToken`` off
  gets a token for its service account (the TokenRequest API, bound to the pod) in a
  kubeconfig of its own (``KUBECONFIG``), so it talks to the API server with exactly its
  RBAC, as in-cluster credentials would give it.

Decisions are a pure function (:func:`decide`); :class:`PodRunner` applies them.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cheapspot_localcluster.nodepool import KWOK_MANAGED_LABEL
from cheapspot_localcluster.processes import die_with_parent_hook
from cheapspot_localcluster.reclaim import is_ready as node_is_ready

log = logging.getLogger("cheapspot.podrunner")

TERMINATION_MESSAGE_ENV = "CHEAPSPOT_TERMINATION_MESSAGE_PATH"
LOG_TAIL_BYTES = 2048
SERVE_VENV_ENV = "CHEAPSPOT_SERVE_VENV"
IMAGE_ENVIRONMENTS = {"cheapspot-serve": ".venv-serve"}
"""Image repository name -> virtual environment (relative to the project's root, or the
path in ``CHEAPSPOT_SERVE_VENV``) whose ``bin`` goes first on ``PATH``."""
"""Like kubelet: at most 2 KiB of log tail become the termination message on error."""


class Op(enum.Enum):
    START = "start"
    """Start the pod's process and report it Running."""
    TERMINATE = "terminate"
    """Deletion asked for: SIGTERM now, SIGKILL when the grace period runs out."""
    KILL = "kill"
    """SIGKILL now: the grace period is over, or the pod object is gone."""
    NODE_LOST = "node-lost"
    """The node went away: SIGKILL now and report nothing more, as a dead kubelet would."""
    REPORT_EXIT = "report-exit"
    """The process ended: report Succeeded/Failed with its exit code."""
    BACK_OFF = "back-off"
    """A ``restartPolicy: Always`` container ended: report the exit (in ``lastState``; waiting
    in ``CrashLoopBackOff`` when there is a back-off) and restart it after kubelet's back-off:
    at once the first time, then 10 s doubling to 5 minutes."""
    RESTART = "restart"
    """The back-off is over: start the container again in the same pod, with the same IP."""
    REMOVE = "remove"
    """The pod is terminating and its process has ended: delete the object (grace 0)."""
    FORGET = "forget"
    """Nothing more to do for this pod: drop local bookkeeping."""
    REPORT_READY = "report-ready"
    """The API's Ready condition is not what the runner reported (the node lifecycle controller
    marks every pod of a node whose lease lapsed not ready): report it again, as kubelet's
    status manager does once its node is back."""


@dataclass
class Proc:
    """What the runner knows about one pod's process."""

    uid: str
    namespace: str
    name: str
    node: str
    popen: subprocess.Popen[bytes] | None
    ip: str
    workdir: Path
    started_at: datetime
    exit_code: int | None = None
    exit_reported: bool = False
    term_sent_at: float | None = None
    node_lost: bool = False
    probe: Probe | None = None
    restarts: int = 0
    """Times the container was started again in place (``restartCount``)."""
    crashes: int = 0
    """Ends in a row that each got a back-off (reset after a 10-minute run)."""
    restart_at: float | None = None
    """When the back-off of an ended ``restartPolicy: Always`` container is over."""
    last_state: dict[str, Any] | None = None
    """The previous run's ``terminated`` state, reported as ``lastState``."""
    ready: bool = False
    """What was last reported in the Ready condition."""


@dataclass
class Probe:
    """One container's readiness probe (``httpGet``) and its running tally, as kubelet keeps it."""

    path: str
    port: int
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    started: float = 0.0
    successes: int = 0
    failures: int = 0
    ready: bool = False
    next_at: float = 0.0
    in_flight: bool = False

    @classmethod
    def of(cls, container: Mapping[str, Any], started: float) -> Probe | None:
        spec = container.get("readinessProbe") or {}
        http = spec.get("httpGet")
        if not http:
            return None
        port = http.get("port")
        if isinstance(port, str) and not port.isdigit():
            named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
            port = named.get(port)
        if port is None:
            return None
        delay = float(spec.get("initialDelaySeconds", 0))
        return cls(
            path=str(http.get("path") or "/"),
            port=int(port),
            initial_delay=delay,
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            success_threshold=int(spec.get("successThreshold", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
            started=started,
            next_at=started + delay,
        )

    def due(self, now: float) -> bool:
        return not self.in_flight and now >= self.next_at

    def record(self, ok: bool, now: float) -> bool:
        """Count one probe result; the readiness it leads to (kubelet's thresholds)."""
        self.in_flight = False
        self.next_at = now + self.period
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.ready = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold:
                self.ready = False
        return self.ready


def http_probe(ip: str, probe: Probe) -> bool:
    """kubelet's httpGet check: a 2xx or 3xx answer within the timeout."""
    import http.client

    conn = http.client.HTTPConnection(ip, probe.port, timeout=probe.timeout)
    try:
        conn.request("GET", probe.path, headers={"User-Agent": "kube-probe/cheapspot"})
        return 200 <= conn.getresponse().status < 400
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass(frozen=True)
class PodView:
    """The fields of a pod that matter to the runner."""

    uid: str
    node: str
    phase: str
    deleting: bool
    grace_seconds: float
    ready: bool = False
    """The Ready condition as the API has it."""
    restart_always: bool = False
    """``restartPolicy: Always`` (a Deployment's pods): an ended container is started again."""


def view(pod: Mapping[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    grace = meta.get("deletionGracePeriodSeconds")
    if grace is None:
        grace = spec.get("terminationGracePeriodSeconds", 30)
    return PodView(
        uid=meta.get("uid", ""),
        node=spec.get("nodeName") or "",
        phase=status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        grace_seconds=float(grace or 0),
        ready=any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        ),
        restart_always=(spec.get("restartPolicy") or "Always") == "Always",
    )


def decide(
    pod: PodView | None,
    proc: Proc | None,
    node_alive: bool,
    now: float,
    node_ready: bool = True,
) -> Op | None:
    """What to do next for one pod, given what the API says and what runs locally.

    ``node_alive``: the machine exists; ``node_ready``: its Node is Ready (its lease renewed).
    """
    if proc is not None and proc.node_lost:
        return Op.FORGET if pod is None else None
    if pod is None:
        if proc is None:
            return None
        return Op.KILL if proc.exit_code is None else Op.FORGET
    if proc is None:
        if not node_alive:
            # A pod on a machine that is gone: nobody is left to act for it; the control
            # plane's controllers (taint eviction, pod GC) deal with the object.
            return None
        if pod.deleting:
            # Never started here (or started by a runner before us): nothing to stop.
            return Op.REMOVE
        if pod.phase == "Pending" and pod.node:
            return Op.START
        return None
    if not node_alive:
        return Op.NODE_LOST
    if proc.exit_code is not None:
        if pod.restart_always and not pod.deleting:
            if proc.restart_at is None:
                return Op.BACK_OFF
            return Op.RESTART if now >= proc.restart_at else None
        if not proc.exit_reported:
            return Op.REPORT_EXIT
        return Op.REMOVE if pod.deleting else None
    if pod.deleting:
        if proc.term_sent_at is None:
            return Op.TERMINATE
        if now - proc.term_sent_at >= pod.grace_seconds:
            return Op.KILL
        return None
    if node_ready and pod.phase == "Running" and pod.ready != proc.ready:
        return Op.REPORT_READY
    return None


def machine_is_on(node: Mapping[str, Any]) -> bool:
    """Whether the simulated machine behind ``node`` still exists.

    Not the Ready condition: a real node can go NotReady (kubelet cut off from the API server)
    while its containers run on. A reclaim switches the machine off by taking kwok's label
    away (:func:`cheapspot_localcluster.reclaim.switch_off_patch`), then deletes the Node.
    """
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    return not meta.get("deletionTimestamp") and labels.get(KWOK_MANAGED_LABEL) == "true"


BACK_OFF_SECONDS = 10.0
BACK_OFF_MAX_SECONDS = 300.0
BACK_OFF_RESET_SECONDS = 600.0


def back_off_seconds(crashes: int) -> float:
    """kubelet's restart back-off after ``crashes`` ends in a row: at once the first time,
    then 10 s doubling up to 5 minutes (the count starts again after a 10-minute run)."""
    if crashes <= 0:
        return 0.0
    return min(BACK_OFF_MAX_SECONDS, BACK_OFF_SECONDS * float(2 ** min(crashes - 1, 5)))


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def running_status(
    pod: Mapping[str, Any],
    ip: str,
    started: datetime,
    ready: bool = True,
    changed: datetime | None = None,
    *,
    restarts: int = 0,
    last_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The status a kubelet reports once the container has started; ``ready`` is the
    readiness probe's verdict (true without a probe), ``changed`` when it last flipped;
    ``restarts`` and ``last_state`` (a ``terminated`` state) once it was started again."""
    containers = pod["spec"]["containers"]
    now = iso(started)
    flipped = iso(changed or started)
    conditions = [
        {"type": t, "status": "True", "lastTransitionTime": now}
        for t in ("PodReadyToStartContainers", "Initialized")
    ] + [
        {"type": t, "status": "True" if ready else "False", "lastTransitionTime": flipped}
        for t in ("ContainersReady", "Ready")
    ]
    return {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": conditions,
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "containerID": f"local://{pod['metadata']['uid']}/{c['name']}",
                "ready": ready,
                "started": True,
                "restartCount": restarts,
                "state": {"running": {"startedAt": now}},
                **({"lastState": {"terminated": last_state}} if last_state else {}),
            }
            for c in containers
        ],
    }


def back_off_status(
    pod: Mapping[str, Any], ip: str, last_state: dict[str, Any], restarts: int, delay: float
) -> dict[str, Any]:
    """The status of a ``restartPolicy: Always`` pod whose container ended and waits to be
    started again: still Running (its IP kept), not Ready, the exit in ``lastState``."""
    status = running_status(pod, ip, datetime.now(UTC), ready=False, restarts=restarts)
    for cs in status["containerStatuses"]:
        cs["started"] = False
        waiting = {
            "reason": "CrashLoopBackOff",
            "message": f"back-off {delay:g}s restarting failed container={cs['name']}",
        }
        # Restarted at once (the first end in a row): the end shows until then.
        cs["state"] = {"waiting": waiting} if delay > 0 else {"terminated": last_state}
        cs["lastState"] = {"terminated": last_state}
    del status["startTime"]
    return status


def terminated_status(
    pod: Mapping[str, Any], exit_code: int, message: str, started: datetime, finished: datetime
) -> dict[str, Any]:
    """The status a kubelet reports once the (restartPolicy: Never) container has ended."""
    reason = "Completed" if exit_code == 0 else "Error"
    state: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": iso(started),
        "finishedAt": iso(finished),
        "containerID": f"local://{pod['metadata']['uid']}",
    }
    if message:
        state["message"] = message
    return {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "conditions": [
            {
                "type": t,
                "status": "False",
                "reason": "PodCompleted",
                "lastTransitionTime": iso(finished),
            }
            for t in ("ContainersReady", "Ready")
        ],
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"terminated": state},
            }
            for c in pod["spec"]["containers"]
        ],
    }


def termination_message(
    container: Mapping[str, Any], exit_code: int, message_file: Path, log_file: Path
) -> str:
    """kubelet's rule: the message file first; with FallbackToLogsOnError, the log tail on error."""
    try:
        text = message_file.read_text(errors="replace").strip()
    except OSError:
        text = ""
    if text:
        return text[-4096:]
    if exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        try:
            data = log_file.read_bytes()[-LOG_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()
    return ""


class EnvResolver:
    """Resolves a container's environment the way kubelet does (the subset pods here use)."""

    def __init__(self, core: Any) -> None:
        self.core = core

    def secret(self, ns: str, name: str) -> dict[str, str]:
        import base64

        obj = self.core.read_namespaced_secret(name, ns)
        return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}

    def _config_map(self, ns: str, name: str) -> dict[str, str]:
        return dict(self.core.read_namespaced_config_map(name, ns).data or {})

    def resolve(
        self, pod: Mapping[str, Any], container: Mapping[str, Any], ip: str
    ) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self.secret(ns, source["secretRef"]["name"])
            else:
                data = self._config_map(ns, source["configMapRef"]["name"])
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = str(item["value"])
                continue
            ref = item.get("valueFrom") or {}
            if "fieldRef" in ref:
                env[name] = field_value(pod, ref["fieldRef"]["fieldPath"], ip)
            elif "secretKeyRef" in ref:
                env[name] = self.secret(ns, ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                env[name] = self._config_map(ns, r["name"])[r["key"]]
        return env


def field_value(pod: Mapping[str, Any], path: str, ip: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": ip,
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    for kind in ("labels", "annotations"):
        prefix = f"metadata.{kind}['"
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(kind) or {}).get(path[len(prefix) : -2], ""))
    raise ValueError(f"unsupported fieldRef {path!r}")


@dataclass
class IpPool:
    """Loopback pod IPs, 127.0.0.2 .. 127.0.0.254, each held by one pod (its uid) and reused
    once that pod is gone. Giving one back twice is harmless: a pod's exit and, later, its
    removal both give its IP back, and by the second another pod may hold it."""

    owners: dict[str, str] = field(default_factory=dict)
    """IP -> the uid of the pod holding it."""

    def take(self, owner: str) -> str:
        for n in range(2, 255):
            ip = f"127.0.0.{n}"
            if ip not in self.owners:
                self.owners[ip] = owner
                return ip
        raise RuntimeError("no loopback pod IP left")

    def give_back(self, ip: str, owner: str) -> None:
        if self.owners.get(ip) == owner:
            del self.owners[ip]


class PodRunner:
    """Applies :func:`decide` to every pod on a simulated node, every ``period`` seconds."""

    def __init__(self, core: Any, state_dir: Path, *, period: float = 0.25) -> None:
        self.core = core
        self.state_dir = state_dir
        self.period = period
        self.procs: dict[str, Proc] = {}
        self.ips = IpPool()
        self.env = EnvResolver(core)
        self.probes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self.probe_results: list[tuple[str, bool, float]] = []
        self.probe_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        """Set once a pass over the cluster's pods has succeeded (the health check's answer)."""

    # -- observe -------------------------------------------------------------------------

    def _observe(self) -> tuple[dict[str, dict[str, Any]], set[str], set[str]]:
        """Bound pods by uid, the nodes whose machine is on, and those of them Ready."""
        client = self.core.api_client
        pods = client.sanitize_for_serialization(
            self.core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=")
        )["items"]
        nodes = client.sanitize_for_serialization(self.core.list_node())["items"]
        alive = {n["metadata"]["name"] for n in nodes if machine_is_on(n)}
        ready = {n["metadata"]["name"] for n in nodes if machine_is_on(n) and node_is_ready(n)}
        return {p["metadata"]["uid"]: p for p in pods}, alive, ready

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.step()
                self.ready.set()
            except Exception:
                log.exception("pod runner step failed; retrying")
            self.stop_event.wait(self.period)
        self.shutdown()

    def step(self) -> None:
        pods, alive, ready = self._observe()
        now = time.monotonic()
        flipped = self._probe(pods, now)
        for running in self.procs.values():
            if running.popen is not None and running.exit_code is None:
                running.exit_code = running.popen.poll()
                if running.exit_code is not None:
                    # As a container runtime does: nothing of the container outlives its main
                    # process (a child left behind would hold the pod's ports, and the pod's
                    # IP goes to the next pod). The group outlives its reaped leader while
                    # any member runs, so its id is still this pod's.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(running.popen.pid, signal.SIGKILL)
        for uid in set(pods) | set(self.procs):
            pod = pods.get(uid)
            proc = self.procs.get(uid)
            pv = view(pod) if pod is not None else None
            node = pv.node if pv is not None else (proc.node if proc else "")
            op = decide(pv, proc, node in alive, now, node in ready)
            if op is Op.REPORT_READY and uid in flipped:
                continue  # just reported by the probe; this pass's list predates it
            if op is not None:
                self.apply(op, pod, proc)

    def apply(self, op: Op, pod: dict[str, Any] | None, proc: Proc | None) -> None:
        if op is Op.START and pod is not None:
            self._start(pod)
        elif op is Op.TERMINATE and proc is not None:
            self._signal(proc, signal.SIGTERM)
            proc.term_sent_at = time.monotonic()
        elif op in (Op.KILL, Op.NODE_LOST) and proc is not None:
            self._signal(proc, signal.SIGKILL)
            if proc.popen is not None:
                proc.exit_code = proc.popen.wait()
            if op is Op.NODE_LOST:
                proc.node_lost = True
                log.info("node %s lost: killed pod %s/%s", proc.node, proc.namespace, proc.name)
        elif op is Op.REPORT_EXIT and proc is not None and pod is not None:
            self._report_exit(pod, proc)
        elif op is Op.BACK_OFF and proc is not None and pod is not None:
            self._back_off(pod, proc)
        elif op is Op.RESTART and proc is not None and pod is not None:
            proc.restarts += 1
            proc.exit_code, proc.restart_at, proc.term_sent_at = None, None, None
            self._spawn(pod, proc)
        elif op is Op.REMOVE and pod is not None:
            self._remove(pod)
            if proc is not None:
                self._forget(proc)
        elif op is Op.FORGET and proc is not None:
            self._forget(proc)
        elif op is Op.REPORT_READY and proc is not None and pod is not None:
            self._patch_status(pod, self._running_status(pod, proc, datetime.now(UTC)))
            log.info("pod %s/%s ready again: %s", proc.namespace, proc.name, proc.ready)

    def _probe(self, pods: Mapping[str, dict[str, Any]], now: float) -> set[str]:
        """Apply finished probe results (patching Ready when it flips), start those due;
        the uids of the pods whose Ready was patched."""
        flipped: set[str] = set()
        with self.probe_lock:
            results, self.probe_results = self.probe_results, []
        for uid, ok, at in results:
            proc = self.procs.get(uid)
            pod = pods.get(uid)
            if proc is None or proc.probe is None:
                continue
            ready = proc.probe.record(ok, at)
            if pod is not None and proc.exit_code is None and ready != proc.ready:
                proc.ready = ready
                self._patch_status(pod, self._running_status(pod, proc, datetime.now(UTC)))
                flipped.add(uid)
                log.info("pod %s/%s ready: %s", proc.namespace, proc.name, ready)
        for proc in self.procs.values():
            probe = proc.probe
            if probe is None or proc.exit_code is not None or not probe.due(now):
                continue
            if proc.uid not in pods or proc.node_lost:
                continue
            probe.in_flight = True
            self.probes.submit(self._run_probe, proc.uid, proc.ip, probe)
        return flipped

    def _run_probe(self, uid: str, ip: str, probe: Probe) -> None:
        ok = http_probe(ip, probe)
        with self.probe_lock:
            self.probe_results.append((uid, ok, time.monotonic()))

    def _service_account_env(self, pod: Mapping[str, Any], workdir: Path) -> dict[str, str]:
        """A kubeconfig with a token for the pod's service account, unless it opts out."""
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return {}
        from kubernetes.client import (
            AuthenticationV1TokenRequest,
            V1BoundObjectReference,
            V1TokenRequestSpec,
        )

        meta = pod["metadata"]
        account = spec.get("serviceAccountName") or "default"
        request = AuthenticationV1TokenRequest(
            spec=V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=3600 * 6,
                bound_object_ref=V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=meta["name"], uid=meta["uid"]
                ),
            )
        )
        token = self.core.create_namespaced_service_account_token(
            account, meta["namespace"], request
        ).status.token
        cfg = self.core.api_client.configuration
        path = workdir / "kubeconfig"
        path.write_text(
            service_account_kubeconfig(cfg.host, cfg.ssl_ca_cert, token, meta["namespace"])
        )
        path.chmod(0o600)
        return {"KUBECONFIG": str(path), "POD_NAMESPACE": meta["namespace"]}

    # -- act -----------------------------------------------------------------------------

    def _start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ip = self.ips.take(meta["uid"])
        workdir = self.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        workdir.mkdir(parents=True, exist_ok=True)
        proc = Proc(
            meta["uid"],
            meta["namespace"],
            meta["name"],
            spec["nodeName"],
            None,
            ip,
            workdir,
            datetime.now(UTC),
        )
        self.procs[proc.uid] = proc
        self._spawn(pod, proc)

    def _running_status(
        self, pod: dict[str, Any], proc: Proc, changed: datetime | None = None
    ) -> dict[str, Any]:
        status = running_status(
            pod,
            proc.ip,
            proc.started_at,
            proc.ready,
            changed,
            restarts=proc.restarts,
            last_state=proc.last_state,
        )
        if proc.restarts:
            del status["startTime"]  # the pod's start, not its container's latest
        return status

    def _spawn(self, pod: dict[str, Any], proc: Proc) -> None:
        """Start the pod's container process (the first time, or again in place)."""
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        ip, workdir = proc.ip, proc.workdir
        log_path = workdir / "log"
        message_path = workdir / "termination-message"
        proc.started_at = datetime.now(UTC)
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        try:
            volumes = volume_dirs(spec, container, workdir / "volumes")
            volumes.update(
                secret_volume_dirs(
                    spec,
                    container,
                    workdir / "volumes",
                    lambda name: self.env.secret(meta["namespace"], name),
                )
            )
            env = base_environment(os.environ, image_environment(container.get("image", "")))
            env.update(self._service_account_env(pod, workdir))
            env.update(with_volumes(self.env.resolve(pod, container, ip), volumes))
            env.update(
                {
                    "HOSTNAME": meta["name"],
                    "POD_IP": ip,
                    TERMINATION_MESSAGE_ENV: str(message_path),
                    "TMPDIR": str(short_tmp(meta["uid"], volumes.get("/tmp", workdir))),
                }
            )
            argv = [expand_references(a, env) for a in argv]
            if not argv or shutil.which(argv[0], path=env.get("PATH")) is None:
                raise FileNotFoundError(f"executable {argv[:1]} not found on PATH")
            cwd = Path(with_volumes({"": container.get("workingDir") or ""}, volumes)[""])
            with log_path.open("ab") as out:
                proc.popen = subprocess.Popen(
                    argv,
                    env=env,
                    # A container's workingDir is a path in its image: used only where it
                    # exists here (or lies in one of its volumes).
                    cwd=cwd if str(cwd) and cwd.is_dir() else workdir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    # The pod dies with the runner, as it would with its machine.
                    preexec_fn=die_with_parent_hook(),  # noqa: PLW1509 (one libc call, no locks)
                )
        except Exception as exc:  # kubelet's CreateContainerError and friends: say why
            message_path.write_text(f"container could not start: {exc}")
            proc.exit_code = 128
            log.warning("pod %s/%s could not start: %s", proc.namespace, proc.name, exc)
            return
        (workdir / "pid").write_text(str(proc.popen.pid))
        proc.probe = Probe.of(container, time.monotonic())
        proc.ready = proc.probe is None
        self._patch_status(pod, self._running_status(pod, proc))
        log.info(
            "started pod %s/%s on %s as pid %d (%s)%s",
            proc.namespace,
            proc.name,
            proc.node,
            proc.popen.pid,
            ip,
            f", restart {proc.restarts}" if proc.restarts else "",
        )

    def _report_exit(self, pod: dict[str, Any], proc: Proc) -> None:
        assert proc.exit_code is not None
        code = proc.exit_code if proc.exit_code >= 0 else 128 - proc.exit_code  # -9 -> 137
        message = termination_message(
            pod["spec"]["containers"][0],
            code,
            proc.workdir / "termination-message",
            proc.workdir / "log",
        )
        status = terminated_status(pod, code, message, proc.started_at, datetime.now(UTC))
        self._patch_status(pod, status)
        proc.exit_reported = True
        self.ips.give_back(proc.ip, proc.uid)
        log.info("pod %s/%s exited with %d", proc.namespace, proc.name, code)

    def _back_off(self, pod: dict[str, Any], proc: Proc) -> None:
        """A ``restartPolicy: Always`` container ended: as kubelet, report the exit as its last
        state and start it again after the back-off, in the same pod with the same IP."""
        assert proc.exit_code is not None
        code = proc.exit_code if proc.exit_code >= 0 else 128 - proc.exit_code
        now = datetime.now(UTC)
        ended = terminated_status(pod, code, "", proc.started_at, now)
        proc.last_state = ended["containerStatuses"][0]["state"]["terminated"]
        if (now - proc.started_at).total_seconds() >= BACK_OFF_RESET_SECONDS:
            proc.crashes = 0
        delay = back_off_seconds(proc.crashes)
        proc.crashes += 1
        proc.restart_at = time.monotonic() + delay
        proc.ready = False
        self._patch_status(
            pod, back_off_status(pod, proc.ip, proc.last_state, proc.restarts, delay)
        )
        log.info(
            "pod %s/%s: container exited with %d, restarting in %gs",
            proc.namespace,
            proc.name,
            code,
            delay,
        )

    def _remove(self, pod: dict[str, Any]) -> None:
        from kubernetes.client import V1DeleteOptions, V1Preconditions
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=V1DeleteOptions(
                    grace_period_seconds=0, preconditions=V1Preconditions(uid=meta["uid"])
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _forget(self, proc: Proc) -> None:
        with contextlib.suppress(OSError):
            (SHORT_TMP_ROOT / proc.uid[:12]).unlink()
        self.ips.give_back(proc.ip, proc.uid)
        self.procs.pop(proc.uid, None)

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    @staticmethod
    def _signal(proc: Proc, sig: signal.Signals) -> None:
        if proc.popen is None or proc.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, sig)

    def shutdown(self) -> None:
        """Kill every process this runner started (the simulated machines all go away)."""
        self.probes.shutdown(wait=False, cancel_futures=True)
        for proc in list(self.procs.values()):
            self._signal(proc, signal.SIGKILL)
            if proc.popen is not None:
                proc.popen.wait()


def volume_dirs(
    spec: Mapping[str, Any], container: Mapping[str, Any], root: Path
) -> dict[str, Path]:
    """mountPath -> a directory of this pod's own, for each emptyDir the container mounts.

    Other volume types are not simulated; their mount paths are left as they are."""
    empty = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
    out: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount.get("name") in empty:
            path = root / mount["name"]
            path.mkdir(parents=True, exist_ok=True)
            out[mount["mountPath"].rstrip("/") or "/"] = path
    return out


def secret_volume_dirs(
    spec: Mapping[str, Any],
    container: Mapping[str, Any],
    root: Path,
    read: Callable[[str], Mapping[str, str]],
) -> dict[str, Path]:
    """mountPath -> a directory of this pod's own holding a ``secret`` volume's keys as files
    (``items`` picks and names them), as kubelet mounts them; written at start, not kept in
    step with later edits of the Secret."""
    sources = {v["name"]: v["secret"] for v in spec.get("volumes") or [] if "secret" in v}
    out: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        source = sources.get(mount.get("name"))
        if source is None:
            continue
        data = read(source["secretName"])
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        path = root / mount["name"]
        path.mkdir(parents=True, exist_ok=True)
        for item in items:
            (path / item["path"]).write_text(data[item["key"]])
        out[mount["mountPath"].rstrip("/") or "/"] = path
    return out


def with_volumes(env: Mapping[str, str], volumes: Mapping[str, Path]) -> dict[str, str]:
    """``env`` with values under a volume's mount path moved into the pod's directory for it
    (the longest mount path wins: ``/tmp/cache`` before ``/tmp``)."""
    out = dict(env)
    for name, value in env.items():
        for mount in sorted(volumes, key=len, reverse=True):
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                out[name] = str(volumes[mount]) + value[len(mount.rstrip("/")) :]
                break
    return out


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_references(value: str, env: Mapping[str, str]) -> str:
    """kubelet's expansion of ``$(VAR)`` in command and args: a defined variable is replaced,
    an undefined reference stays as written, ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _REFERENCE.sub(sub, value)


SHORT_TMP_ROOT = Path("/tmp/cheapspot-pods")


def short_tmp(uid: str, target: Path) -> Path:
    """A short path to the pod's temporary directory (a symlink): a container's ``/tmp`` is
    short, and programs put Unix sockets there (vLLM's ZMQ IPC), whose paths may not exceed
    107 bytes; the pod's own directory lies deep in the cluster's state."""
    SHORT_TMP_ROOT.mkdir(parents=True, exist_ok=True)
    link = SHORT_TMP_ROOT / uid[:12]
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def image_environment(image: str) -> Path | None:
    """The virtual environment an image maps to, when it has one of its own."""
    repo = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    rel = IMAGE_ENVIRONMENTS.get(repo)
    if rel is None:
        return None
    override = os.environ.get(SERVE_VENV_ENV)
    return Path(override) if override else Path(sys.executable).parent.parent.parent / rel


def service_account_kubeconfig(server: str, ca_file: str | None, token: str, ns: str) -> str:
    cluster: dict[str, Any] = {"server": server}
    if ca_file:
        cluster["certificate-authority"] = ca_file
    else:
        cluster["insecure-skip-tls-verify"] = True
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": "pod", "user": {"token": token}}],
            "contexts": [
                {"name": "pod", "context": {"cluster": "local", "user": "pod", "namespace": ns}}
            ],
            "current-context": "pod",
        }
    )


def base_environment(host: Mapping[str, str], venv: Path | None = None) -> dict[str, str]:
    """What a local 'container' inherits from the host: enough to find the installation
    (``venv``'s ``bin`` first when the image has an environment of its own)."""
    keep = (
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "CHEAPSPOT_CACHE",
        "HF_HOME",
    )
    env = {k: host[k] for k in keep if k in host}
    venv_bin = str(Path(sys.executable).parent)
    first = [str(venv / "bin")] if venv is not None else []
    env["PATH"] = os.pathsep.join([*first, venv_bin, env.get("PATH", "/usr/bin:/bin")])
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def serve_health(ready: threading.Event, port: int) -> ThreadingHTTPServer:
    """``GET /healthz``: 200 once the runner has looked at the cluster's pods, 503 before."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path.startswith("/healthz") and ready.is_set()
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"not ready")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot-podrunner", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--period", type=float, default=0.25)
    parser.add_argument(
        "--health-port", type=int, default=0, help="serve /healthz on 127.0.0.1 (0: off)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    runner = PodRunner(client.CoreV1Api(api_client), args.state_dir, period=args.period)

    def _stop(signum: int, frame: object) -> None:
        runner.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.health_port:
        serve_health(runner.ready, args.health_port)
    log.info("pod runner started: %s", json.dumps({"state_dir": str(args.state_dir)}))
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
