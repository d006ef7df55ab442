"""``LocalCluster``: a real control plane on loopback with simulated spot and on-demand nodes.

The Python API behind ``cheapspot up/down/preempt/spot`` and the ``local_cluster`` fixture::

    cluster = LocalCluster("test", state_dir=tmp, ports=Ports.free())
    cluster.start()                     # builds the binaries first if they are missing
    core = cluster.core()               # kubernetes.client.CoreV1Api, admin credentials
    cluster.preempt("spot-gpu-zone-a-0", notice_s=5)
    cluster.spot_off(); cluster.spot_on()
    cluster.stop()                      # no process left behind

A second object for the same state directory (``LocalCluster.attach``) controls a cluster
another process started: that is how ``cheapspot down`` finds what ``cheapspot up`` left running.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cheapspot_localcluster import build, components, processes
from cheapspot_localcluster.certs import generate_pki, write_pki
from cheapspot_localcluster.components import Command, Layout, PodLifecycle, Ports
from cheapspot_localcluster.nodepool import (
    PoolFile,
    SimNode,
    build_node,
    expand,
    load_pool_file,
)
from cheapspot_localcluster.processes import ClusterError
from cheapspot_localcluster.profiles import CapacityType
from cheapspot_localcluster.reclaim import NodeOps, is_ready, reclaim
from cheapspot_localcluster.s3 import DEFAULT_BUCKET, S3Endpoint, s3_server_command, wait_for_s3

S3_COMPONENT = "s3"
PODRUNNER_COMPONENT = "podrunner"
_SPOT_OFF_MARKER = "spot-off"


def default_state_dir(name: str) -> Path:
    return build.cache_root() / "clusters" / name


@dataclass(frozen=True)
class ClusterSpec:
    """What ``up`` decided; saved as cluster.json so other commands act on the same cluster."""

    name: str
    ports: Ports
    pools_file: str | None
    pod_lifecycle: PodLifecycle
    with_s3: bool
    s3_bucket: str
    node_lease_seconds: int = components.NODE_LEASE_SECONDS
    node_grace_seconds: int = components.NODE_MONITOR_GRACE_SECONDS

    @property
    def node_timing(self) -> components.NodeTiming:
        return components.NodeTiming(self.node_lease_seconds, self.node_grace_seconds)

    def to_json(self) -> str:
        data = asdict(self)
        data["pod_lifecycle"] = self.pod_lifecycle.value
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterSpec:
        data = json.loads(text)
        data["ports"] = Ports(**data["ports"])
        data["pod_lifecycle"] = PodLifecycle(data["pod_lifecycle"])
        return cls(**data)


def _usable(node: dict[str, Any]) -> bool:
    taints = node.get("spec", {}).get("taints") or []
    return is_ready(node) and not any(
        t.get("key") == "node.kubernetes.io/not-ready" for t in taints
    )


class LocalCluster:
    """One local cluster, identified by its state directory."""

    def __init__(
        self,
        name: str = components.CLUSTER_NAME_DEFAULT,
        *,
        state_dir: Path | None = None,
        ports: Ports | None = None,
        pools_file: Path | None = None,
        pod_lifecycle: PodLifecycle = PodLifecycle.KWOK,
        with_s3: bool = True,
        s3_bucket: str = DEFAULT_BUCKET,
        die_with_parent: bool = False,
        node_timing: components.NodeTiming = components.TEST_TIMING,
    ) -> None:
        self.spec = ClusterSpec(
            name=name,
            ports=ports or Ports(),
            pools_file=str(pools_file) if pools_file else None,
            pod_lifecycle=pod_lifecycle,
            with_s3=with_s3,
            s3_bucket=s3_bucket,
            node_lease_seconds=node_timing.lease_seconds,
            node_grace_seconds=node_timing.grace_seconds,
        )
        self.layout = Layout(Path(state_dir) if state_dir else default_state_dir(name))
        self._die_with_parent = die_with_parent
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._pools: PoolFile | None = None
        self._api_client: Any = None

    @classmethod
    def attach(cls, state_dir: Path) -> LocalCluster:
        """The cluster ``up`` started with this state directory (it may have stopped since)."""
        layout = Layout(state_dir)
        try:
            spec = ClusterSpec.from_json(layout.cluster_file.read_text())
        except FileNotFoundError:
            raise ClusterError(
                f"no cluster in {state_dir}: start one with `cheapspot up`"
            ) from None
        return cls(
            name=spec.name,
            state_dir=state_dir,
            ports=spec.ports,
            pools_file=Path(spec.pools_file) if spec.pools_file else None,
            pod_lifecycle=spec.pod_lifecycle,
            with_s3=spec.with_s3,
            s3_bucket=spec.s3_bucket,
            node_timing=spec.node_timing,
        )

    # -- what it is ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ports(self) -> Ports:
        return self.spec.ports

    @property
    def kubeconfig_path(self) -> Path:
        return self.layout.kubeconfig

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def pools(self) -> PoolFile:
        if self._pools is None:
            path = Path(self.spec.pools_file) if self.spec.pools_file else None
            self._pools = load_pool_file(path)
        return self._pools

    @property
    def s3(self) -> S3Endpoint:
        if not self.spec.with_s3:
            raise ClusterError(f"cluster {self.name} was started without an S3 endpoint")
        return S3Endpoint(url=f"http://127.0.0.1:{self.ports.s3}", bucket=self.spec.s3_bucket)

    def running(self) -> dict[str, int]:
        """Component name -> pid, for each of this cluster's processes still alive."""
        return processes.running_pids(self.layout)

    def _stop_order(self) -> list[str]:
        """Reverse start order: the API server shuts down slowly once etcd is gone."""
        names = [c.name for c in components.control_plane(Path("."), self.layout, self.ports)]
        return [PODRUNNER_COMPONENT, S3_COMPONENT, *reversed(names)]

    # -- start / stop -------------------------------------------------------------------------

    def start(
        self, progress: Callable[[str], None] = lambda _m: None, timeout_s: float = 120
    ) -> None:
        """Start everything and return once the nodes are Ready and pods can be created."""
        if self.running():
            raise ClusterError(
                f"cluster {self.name} is already running (state in {self.layout.root}); "
                "`cheapspot down` stops it"
            )
        ports = self.ports.named()
        if not self.spec.with_s3:
            ports.pop("s3")
        if self.spec.pod_lifecycle is not PodLifecycle.EXTERNAL:
            ports.pop(PODRUNNER_COMPONENT)
        processes.check_ports_free(ports)
        pools = self.pools  # a bad pool file fails now, before anything starts
        bin_dir = build.ensure_binaries(progress)

        self._prepare_state(bin_dir)
        try:
            self._start_processes(bin_dir, progress, timeout_s)
            progress(f"creating {len(expand(pools))} nodes ({pools.profile} profile)")
            self.create_nodes()
            self._wait_usable(timeout_s)
            if self.spec.pod_lifecycle is PodLifecycle.EXTERNAL:
                progress("starting the pod runner (pods run as local processes)")
                self._start_podrunner(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _prepare_state(self, bin_dir: Path) -> None:
        layout = self.layout
        layout.root.mkdir(parents=True, exist_ok=True)
        # Every `up` is a fresh cluster: old etcd data, logs and pids go; the CA is new too.
        for stale in (layout.etcd_data, layout.logs, layout.pids, layout.kwok_home):
            shutil.rmtree(stale, ignore_errors=True)
        (layout.root / _SPOT_OFF_MARKER).unlink(missing_ok=True)
        layout.kwok_home.mkdir(parents=True)
        pki = generate_pki()
        write_pki(pki, layout.root / "pki")
        config = components.kubeconfig(
            self.name,
            self.ports,
            {"ca": pki.ca.cert_pem, "cert": pki.admin.cert_pem, "key": pki.admin.key_pem},
        )
        layout.kubeconfig.write_text(components.dump_yaml(config))
        layout.kubeconfig.chmod(0o600)
        layout.kwok_config.write_text(components.kwok_config(self.spec.pod_lifecycle))
        layout.cluster_file.write_text(self.spec.to_json())

    def _start_podrunner(self, timeout_s: float) -> None:
        command = components.podrunner_command(self.layout, self.ports)
        proc = self._launch(command)
        processes.wait_ready(command, proc, self.layout, None, timeout_s)

    def set_pod_lifecycle(self, mode: PodLifecycle, timeout_s: float = 60) -> None:
        """Switch who runs pods on a started cluster: restart kwok with or without its pod
        stages, and start or stop the pod runner. Lets one cluster serve both the tests where
        kwok fakes pods and those where pods run for real. Pods of the old mode are left as
        they are (clean up first)."""
        if mode is self.spec.pod_lifecycle:
            return
        if mode is PodLifecycle.EXTERNAL:
            processes.check_ports_free({PODRUNNER_COMPONENT: self.ports.podrunner})
        else:
            processes.stop(self.layout, [PODRUNNER_COMPONENT], self._children, only=True)
            self._children.pop(PODRUNNER_COMPONENT, None)
        self.spec = replace(self.spec, pod_lifecycle=mode)
        self.layout.kwok_config.write_text(components.kwok_config(mode))
        self.layout.cluster_file.write_text(self.spec.to_json())
        processes.stop(self.layout, ["kwok"], self._children, only=True)
        kwok = components.kwok_command(
            build.bin_dir(), self.layout, self.ports, self.spec.node_timing
        )
        processes.wait_ready(kwok, self._launch(kwok), self.layout, None, timeout_s)
        if mode is PodLifecycle.EXTERNAL:
            self._start_podrunner(timeout_s)

    def _ssl(self) -> ssl.SSLContext:
        pki = self.layout.pki
        return processes.ssl_context(pki.ca_cert, pki.admin_cert, pki.admin_key)

    def _launch(self, command: Command) -> subprocess.Popen[bytes]:
        proc = processes.start(command, self.layout, die_with_parent=self._die_with_parent)
        self._children[command.name] = proc
        return proc

    def _start_processes(
        self, bin_dir: Path, progress: Callable[[str], None], timeout_s: float
    ) -> None:
        ctx = self._ssl()
        etcd, apiserver, *rest = components.control_plane(
            bin_dir, self.layout, self.ports, self.spec.node_timing
        )
        # etcd, then the API server; the rest only need the API server, so start them together.
        for command in (etcd, apiserver):
            progress(f"starting {command.name}")
            proc = self._launch(command)
            processes.wait_ready(command, proc, self.layout, ctx, timeout_s)
        started = [(command, self._launch(command)) for command in rest]
        if self.spec.with_s3:
            s3 = Command(
                name=S3_COMPONENT,
                argv=s3_server_command(self.ports.s3),
                env={},
                ready_url=f"http://127.0.0.1:{self.ports.s3}/",
            )
            started.append((s3, self._launch(s3)))
        progress("starting " + ", ".join(c.name for c, _ in started))
        for command, proc in started:
            if command.name == S3_COMPONENT:
                try:
                    wait_for_s3(f"http://127.0.0.1:{self.ports.s3}", timeout_s)
                except TimeoutError as exc:
                    raise processes.ComponentFailedError(
                        S3_COMPONENT, str(exc), self.layout.log(S3_COMPONENT)
                    ) from None
                self.s3.ensure_bucket()
            else:
                processes.wait_ready(command, proc, self.layout, ctx, timeout_s)

    def _wait_usable(self, timeout_s: float) -> None:
        """Nodes Ready and schedulable (kwok acts for them, and the node lifecycle controller
        has lifted its not-ready taint) and the default ServiceAccount present (the
        ServiceAccount admission plugin rejects pods until its controller has made it)."""
        core = self.core()
        wanted = {n.name for n in expand(self.pools)}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._children.items():
                if proc.poll() is not None:
                    raise processes.ComponentFailedError(
                        name, f"exited with code {proc.returncode}", self.layout.log(name)
                    )
            nodes = core.list_node().items
            ready = {n.metadata.name for n in nodes if _usable(self._to_dict(n))}
            accounts = core.list_namespaced_service_account("default").items
            if wanted <= ready and any(a.metadata.name == "default" for a in accounts):
                return
            time.sleep(0.3)
        raise processes.ComponentFailedError(
            "kwok", f"nodes not Ready after {timeout_s:.0f}s", self.layout.log("kwok")
        )

    @contextlib.contextmanager
    def starved(self, component: str = "kwok") -> Iterator[None]:
        """``component`` gets no CPU at all inside the block (SIGSTOP, then SIGCONT), as on a
        machine so busy that kwok misses its nodes' lease renewals and the node lifecycle
        controller calls them NotReady."""
        proc = self._children[component]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop every process this cluster's state directory records, and forget the client."""
        processes.stop(self.layout, self._stop_order(), self._children)
        self._children.clear()
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = None

    # -- talking to it ------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` with the admin kubeconfig (cached)."""
        if self._api_client is None:
            from kubernetes import config

            # The client is untyped; one Any here keeps strict mypy quiet everywhere else.
            new_client: Any = config.new_client_from_config
            self._api_client = new_client(config_file=str(self.kubeconfig_path))
        return self._api_client

    def core(self) -> Any:
        """``kubernetes.client.CoreV1Api`` for this cluster."""
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def _to_dict(self, obj: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.api_client().sanitize_for_serialization(obj)
        return data

    def node_objects(self) -> list[dict[str, Any]]:
        return [self._to_dict(n) for n in self.core().list_node().items]

    def version(self) -> str:
        """The API server's ``/version`` gitVersion."""
        from kubernetes import client

        info = client.VersionApi(self.api_client()).get_code()
        return str(info.git_version)

    # -- nodes, reclaims ----------------------------------------------------------------------

    def create_nodes(self, which: Callable[[SimNode], bool] = lambda _n: True) -> list[str]:
        """Create the pool file's nodes selected by ``which`` that do not exist yet."""
        from kubernetes.client.exceptions import ApiException

        core = self.core()
        created = []
        for node in expand(self.pools):
            if not which(node):
                continue
            try:
                core.create_node(build_node(node))
                created.append(node.name)
            except ApiException as exc:
                if exc.status != 409:  # already there
                    raise
        return created

    def preempt(
        self,
        node: str,
        notice_s: float | None = None,
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        """Reclaim ``node`` like a cloud (see :mod:`cheapspot_localcluster.reclaim`); blocks
        until its pods are gone and the Node is deleted. ``notice_s`` defaults to the profile's."""
        profile = self.pools.placement
        notice = profile.notice_seconds if notice_s is None else notice_s
        reclaim(NodeOps(self.core()), node, profile, notice, log=log)

    def preempt_in_background(
        self, node: str, notice_s: float | None = None, log: Callable[[str], None] = lambda _m: None
    ) -> concurrent.futures.Future[None]:
        """:meth:`preempt` in a thread, so a test can watch the notice, then the eviction."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="preempt")
        future = pool.submit(self.preempt, node, notice_s, log)
        pool.shutdown(wait=False)
        return future

    def spot_nodes(self) -> list[str]:
        """Names of the spot nodes that exist now."""
        profile = self.pools.placement
        from cheapspot_localcluster.profiles import capacity_type_of

        return sorted(
            n["metadata"]["name"]
            for n in self.node_objects()
            if capacity_type_of(n["metadata"].get("labels") or {}, profile) is CapacityType.SPOT
        )

    @property
    def spot_is_off(self) -> bool:
        return (self.layout.root / _SPOT_OFF_MARKER).exists()

    def spot_off(
        self, notice_s: float = 0, log: Callable[[str], None] = lambda _m: None
    ) -> list[str]:
        """Reclaim every spot node at once and keep spot away until :meth:`spot_on`."""
        (self.layout.root / _SPOT_OFF_MARKER).touch()
        names = self.spot_nodes()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            for future in [pool.submit(self.preempt, n, notice_s, log) for n in names]:
                future.result()
        return names

    def spot_on(self) -> list[str]:
        """Give spot capacity back: recreate the pool file's spot nodes; returns their names."""
        (self.layout.root / _SPOT_OFF_MARKER).unlink(missing_ok=True)
        created = self.create_nodes(lambda n: n.capacity_type is CapacityType.SPOT)
        core = self.core()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = {n.metadata.name for n in core.list_node().items if _usable(self._to_dict(n))}
            if set(created) <= ready:
                break
            time.sleep(0.3)
        return created
