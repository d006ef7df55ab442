"""What the local cluster runs: the state-directory layout, ports, and each component's command.

Pure: given a layout, ports and options, return command lines and file contents. The process
layer (:mod:`cheapspot_localcluster.processes`) starts them; keeping the flags here lets unit
tests check the choices that matter (how fast a lost node is noticed, which controllers run)
without starting anything.
"""

from __future__ import annotations

import base64
import socket
import sys
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cheapspot_localcluster.certs import ADMIN_USER, PkiFiles
from cheapspot_localcluster.nodepool import KWOK_MANAGED_LABEL

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
CLUSTER_NAME_DEFAULT = "cheapspot"

# How quickly a reclaimed node is noticed. kwok renews each node's lease every quarter of its
# duration (like the kubelet); the node lifecycle controller checks every second and calls a
# node lost once its lease has not been renewed for the grace period. Seconds, not the
# production 40 s, so a preemption test sees eviction promptly, yet a few missed renewals on a
# busy machine do not flap a healthy node.
NODE_LEASE_SECONDS = 6
NODE_MONITOR_PERIOD = "1s"
NODE_MONITOR_GRACE_SECONDS = 8


@dataclass(frozen=True)
class NodeTiming:
    """How long a node's lease lasts (kwok renews it every quarter of that) and how long the
    node lifecycle controller waits for a renewal before it calls the node lost."""

    lease_seconds: int = NODE_LEASE_SECONDS
    grace_seconds: int = NODE_MONITOR_GRACE_SECONDS


TEST_TIMING = NodeTiming()
"""Seconds: a preemption test sees a lost node at once."""
KUBELET_TIMING = NodeTiming(lease_seconds=40, grace_seconds=50)
"""A real kubelet's 40 s lease and the controller-manager's default grace: a scale benchmark's
thousand nodes renew 100 leases a second, not 667."""


class PodLifecycle(StrEnum):
    """Who moves pods through their phases on the simulated nodes.

    ``kwok``: kwok marks a scheduled pod Running at once and finishes deletions (operator
    integration tests). ``external``: kwok only keeps nodes alive; another process (the e2e pod
    runner, which runs pods as local processes) writes pod status and finishes deletions.
    """

    KWOK = "kwok"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Ports:
    """Loopback ports. The defaults are for the one cluster a user runs by hand; tests pick
    free ports (:meth:`free`) so they never collide with it."""

    apiserver: int = 16443
    etcd: int = 12379
    etcd_peer: int = 12380
    controller_manager: int = 20257
    scheduler: int = 20259
    kwok: int = 20247
    s3: int = 19000
    podrunner: int = 20248
    """The pod runner's /healthz (``external`` pod lifecycle only)."""

    @classmethod
    def free(cls) -> Ports:
        """Ports the kernel says are free right now (held open together, so all distinct)."""
        sockets = []
        try:
            for _ in fields(cls):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.1", 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()

    def named(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """Where a cluster keeps its files. Everything of one cluster lives under ``root``."""

    root: Path

    @property
    def pki(self) -> PkiFiles:
        return PkiFiles.under(self.root / "pki")

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def kwok_config(self) -> Path:
        return self.root / "kwok.yaml"

    @property
    def kwok_home(self) -> Path:
        # kwok also reads ~/.kwok/kwok.yaml when it exists; a private HOME keeps a user's
        # own kwok configuration out of this cluster.
        return self.root / "kwok-home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def cluster_file(self) -> Path:
        """What `up` decided (ports, pool file, mode): read by `down`, `preempt`, `nodes`."""
        return self.root / "cluster.json"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pid(self, component: str) -> Path:
        return self.pids / f"{component}.pid"


@dataclass(frozen=True)
class Command:
    """One component to start: its name (for messages, logs, pid files) and argv."""

    name: str
    argv: list[str]
    env: dict[str, str]
    # The URL whose answer means "ready", and whether it is HTTPS with our CA.
    ready_url: str


def _https(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


def etcd_command(bin_dir: Path, layout: Layout, ports: Ports) -> Command:
    client = f"http://127.0.0.1:{ports.etcd}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return Command(
        name="etcd",
        argv=[
            str(bin_dir / "etcd"),
            "--name=cheapspot",
            f"--data-dir={layout.etcd_data}",
            # Plain HTTP on loopback only: the API server is etcd's only client.
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=cheapspot={peer}",
            "--initial-cluster-state=new",
            # A throwaway test cluster: durability is not worth an fsync per write.
            "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ],
        env={},
        ready_url=f"{client}/health",
    )


def apiserver_command(bin_dir: Path, layout: Layout, ports: Ports) -> Command:
    pki = layout.pki
    return Command(
        name="kube-apiserver",
        argv=[
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports.etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            # The `kubernetes` Service cannot point at a loopback address (validation refuses
            # it every 10 s); nothing in this cluster reaches the API server through it.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            # No feature gates needed: CRD structural schemas, defaulting, CEL validation
            # rules (x-kubernetes-validations) and validation ratcheting are GA in 1.36, and
            # server-side strict field validation is what kubectl asks for by default. The
            # default admission plugins run (ServiceAccount, DefaultTolerationSeconds, Pod
            # Security per namespace label, ...), as on a real cluster.
            "--profiling=false",
            "--v=1",
        ],
        env={},
        ready_url=_https(ports.apiserver, "/readyz"),
    )


def controller_manager_command(
    bin_dir: Path, layout: Layout, ports: Ports, timing: NodeTiming = TEST_TIMING
) -> Command:
    pki = layout.pki
    kubeconfig = str(layout.kubeconfig)
    return Command(
        name="kube-controller-manager",
        argv=[
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.controller_manager}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            "--leader-elect=false",
            # Every default controller (node lifecycle, taint eviction, pod GC, garbage
            # collector, service accounts, ...) runs; the token signer needs the SA key.
            "--controllers=*",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=false",
            f"--node-monitor-period={NODE_MONITOR_PERIOD}",
            f"--node-monitor-grace-period={timing.grace_seconds}s",
            # Taint lost nodes at once, and never stop because "too many nodes in a zone are
            # down": taking all spot capacity away is exactly what fallback tests do.
            "--node-eviction-rate=100",
            "--secondary-node-eviction-rate=100",
            "--large-cluster-size-threshold=0",
            "--unhealthy-zone-threshold=1",
            "--profiling=false",
            "--v=1",
        ],
        env={},
        ready_url=_https(ports.controller_manager, "/healthz"),
    )


def scheduler_command(bin_dir: Path, layout: Layout, ports: Ports) -> Command:
    pki = layout.pki
    kubeconfig = str(layout.kubeconfig)
    return Command(
        name="kube-scheduler",
        argv=[
            str(bin_dir / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.scheduler}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ],
        env={},
        ready_url=_https(ports.scheduler, "/healthz"),
    )


def kwok_command(
    bin_dir: Path, layout: Layout, ports: Ports, timing: NodeTiming = TEST_TIMING
) -> Command:
    return Command(
        name="kwok",
        argv=[
            str(bin_dir / "kwok"),
            f"--kubeconfig={layout.kubeconfig}",
            f"--config={layout.kwok_config}",
            # Only labelled nodes: removing the label is how a reclaim switches a node off.
            f"--manage-nodes-with-label-selector={KWOK_MANAGED_LABEL}=true",
            f"--node-lease-duration-seconds={timing.lease_seconds}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{ports.kwok}",
            # INFO logs every lease renewal of every node: megabytes an hour for nothing.
            "--v=WARN",
        ],
        env={"HOME": str(layout.kwok_home)},
        ready_url=f"http://127.0.0.1:{ports.kwok}/healthz",
    )


def podrunner_command(layout: Layout, ports: Ports) -> Command:
    """The pod runner (:mod:`cheapspot_localcluster.podrunner`): plays kubelet for the simulated
    nodes in the ``external`` pod lifecycle, running each pod as a local process."""
    return Command(
        name="podrunner",
        argv=[
            sys.executable,
            "-m",
            "cheapspot_localcluster.podrunner",
            f"--kubeconfig={layout.kubeconfig}",
            f"--state-dir={layout.root / 'podrunner'}",
            f"--health-port={ports.podrunner}",
        ],
        env={},
        ready_url=f"http://127.0.0.1:{ports.podrunner}/healthz",
    )


def control_plane(
    bin_dir: Path, layout: Layout, ports: Ports, timing: NodeTiming = TEST_TIMING
) -> list[Command]:
    """Start order: each needs the ones before it (stop in reverse)."""
    return [
        etcd_command(bin_dir, layout, ports),
        apiserver_command(bin_dir, layout, ports),
        controller_manager_command(bin_dir, layout, ports, timing),
        scheduler_command(bin_dir, layout, ports),
        kwok_command(bin_dir, layout, ports, timing),
    ]


def kwok_config(mode: PodLifecycle) -> str:
    """kwok's --config: node stages always, pod stages only when kwok owns pod lifecycle."""
    stages = resources.files(__package__).joinpath("stages")
    docs = [stages.joinpath("nodes.yaml").read_text()]
    if mode is PodLifecycle.KWOK:
        docs.append(stages.joinpath("pods.yaml").read_text())
    return "\n---\n".join(docs)


def kubeconfig(cluster: str, ports: Ports, pki_pem: dict[str, bytes]) -> dict[str, Any]:
    """An admin kubeconfig with the certificates embedded, so it can be copied anywhere."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {
                    "server": f"https://127.0.0.1:{ports.apiserver}",
                    "certificate-authority-data": b64(pki_pem["ca"]),
                },
            }
        ],
        "users": [
            {
                "name": ADMIN_USER,
                "user": {
                    "client-certificate-data": b64(pki_pem["cert"]),
                    "client-key-data": b64(pki_pem["key"]),
                },
            }
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": ADMIN_USER}}],
        "current-context": cluster,
    }


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
