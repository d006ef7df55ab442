"""The whole of cheapspot on a cluster, installed as a user installs it, for e2e runs and the demo.

* the CRD from ``crds/`` and a namespace that enforces Pod Security "restricted", holding a
  Secret with the object store's keys (workers get them through ``envFromSecret``, as where
  IRSA / RRSA are not available);
* the operator: on the local cluster ``cheapspot operator`` as a child process (so a test can
  SIGKILL it), configured like the Helm chart's ConfigMap would be, giving worker pods the
  ``cheapspot worker`` command and the object store's endpoint.

:class:`LocalBackend` puts these together on a :class:`LocalCluster` whose pods run as local
processes (the pod runner); :mod:`cheapspot_localcluster.kind` does the same on kind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_localcluster.processes import die_with_parent_hook
from cheapspot_localcluster.s3 import S3Endpoint
from cheapspot_localcluster.trainjobs import CRD_FILE, repo_root
from cheapspot_localcluster.waiting import wait_for

S3_SECRET = "cheapspot-object-store"
POOL_CRD_FILE = Path("crds/cheapinferencepools.yaml")
NOTICE_SECONDS = 5
"""Reclaim notice on the e2e clusters: short, so scenarios take seconds, long enough for a
shard to publish its SIGTERM checkpoint."""


class Backend(Protocol):
    """What the e2e scenarios need from a cluster, whatever runs it."""

    name: str
    s3: S3Endpoint
    """The object store as this process reaches it."""

    def api_client(self) -> Any: ...
    def spot_nodes(self) -> list[str]: ...
    def reclaim(self, node: str, notice_s: float) -> None:
        """Reclaim a spot node: the interruption notice, then after ``notice_s`` the machine
        is gone. Blocks until its pods are gone."""

    def spot_off(self) -> None: ...
    def spot_on(self) -> None: ...
    def kill_operator(self) -> None:
        """SIGKILL the operator: no goodbye."""

    def start_operator(self) -> None: ...
    def restore(self) -> None:
        """Every node back, spot on, the operator running: the state a scenario starts from."""


def install_crd(api_client: Any, path: Path | None = None) -> None:
    """Create or replace the CRD from ``crds/`` and wait until it is served."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext: Any = client.ApiextensionsV1Api(api_client)
    body = yaml.safe_load((path or repo_root() / CRD_FILE).read_text())
    name = body["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(name)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, body)

    def established() -> bool:
        crd = ext.read_custom_resource_definition(name)
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_for(f"CRD {name} to be established", established, 30)


def prepare_namespace(api_client: Any, namespace: str, s3: S3Endpoint) -> None:
    """A namespace enforcing Pod Security "restricted", with the object store's keys."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core: Any = client.CoreV1Api(api_client)
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    try:
        core.create_namespace({"metadata": {"name": namespace, "labels": labels}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    secret = {
        "metadata": {"name": S3_SECRET},
        "stringData": {
            "AWS_ACCESS_KEY_ID": s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
        },
    }
    try:
        core.create_namespaced_secret(namespace, secret)
    except ApiException as exc:
        if exc.status != 409:
            raise


def operator_config(
    namespace: str,
    pods_s3_url: str,
    region: str,
    *,
    notice_s: int = NOTICE_SECONDS,
    image: str = "cheapspot-worker:dev",
) -> dict[str, Any]:
    """The operator's configuration (the Helm chart's ConfigMap) for an e2e or demo run."""
    return {
        "profile": "local",
        "noticeSeconds": notice_s,
        "reconcileIntervalSeconds": 1,
        "statusRefreshSeconds": 15,
        "metricsPort": 0,
        "namespaces": [namespace],
        "worker": {
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["cheapspot", "worker"],
            "env": {
                "AWS_ENDPOINT_URL": pods_s3_url,
                "AWS_ENDPOINT_URL_S3": pods_s3_url,
                "AWS_REGION": region,
                "AWS_DEFAULT_REGION": region,
                # One thread per worker: what makes CPU training bit-reproducible, and what
                # keeps several workers on 2 cores from fighting.
                "CHEAPSPOT_CPU_THREADS": "1",
                "OMP_NUM_THREADS": "1",
            },
            "envFromSecret": S3_SECRET,
        },
        # Serving replicas run from the serving environment (the pod runner maps the image
        # name to .venv-serve), routers from the operator's.
        "serving": {"image": "cheapspot-serve:dev", "routerImage": "cheapspot-operator:dev"},
    }


@dataclass
class OperatorProcess:
    """``cheapspot operator`` as a child process: SIGKILL and restart at will. It dies with
    the process that started it (a test or benchmark killed leaves no operator behind), so
    start it from the main thread."""

    kubeconfig: Path
    config: dict[str, Any]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "operator.log"

    def start(self) -> None:
        if self.alive():
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "operator.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        cheapspot = Path(sys.executable).with_name("cheapspot")
        argv = [str(cheapspot)] if cheapspot.exists() else [sys.executable, "-m", "cheapspot.cli"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "operator", "--kubeconfig", str(self.kubeconfig)],
                env={**os.environ, **self.env, "CHEAPSPOT_OPERATOR_CONFIG": str(config_path)},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Safe despite threads: the hook makes one pre-resolved libc call, no locks.
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def private_cluster(state_dir: Path, name: str = "cheapspot-bench") -> LocalCluster:
    """A cluster of its own (its name, state and free ports: no clash with a user's) whose
    pods run as local processes, with an S3 endpoint; it dies with this process. What the
    end-to-end benchmarks start."""
    from cheapspot_localcluster.components import PodLifecycle, Ports

    return LocalCluster(
        name,
        state_dir=state_dir,
        ports=Ports.free(),
        pod_lifecycle=PodLifecycle.EXTERNAL,
        with_s3=True,
        die_with_parent=True,
    )


class LocalBackend:
    """The local cluster (pods run as local processes), an S3 endpoint and the operator."""

    name = "local"

    def __init__(
        self,
        cluster: LocalCluster,
        s3: S3Endpoint,
        namespace: str,
        workdir: Path,
        notice_s: int = NOTICE_SECONDS,
    ) -> None:
        self.cluster = cluster
        self.s3 = s3
        self.namespace = namespace
        self.operator = OperatorProcess(
            kubeconfig=cluster.kubeconfig_path,
            config=operator_config(namespace, s3.url, s3.region, notice_s=notice_s),
            workdir=workdir,
            env=s3.env(),  # the operator reads progress records from the store
        )

    def install(self) -> None:
        install_crd(self.cluster.api_client())
        install_crd(self.cluster.api_client(), repo_root() / POOL_CRD_FILE)
        prepare_namespace(self.cluster.api_client(), self.namespace, self.s3)
        self.operator.start()

    def close(self) -> None:
        self.operator.stop()
        from kubernetes import client

        with contextlib.suppress(Exception):
            client.CoreV1Api(self.api_client()).delete_namespace(self.namespace)

    def api_client(self) -> Any:
        return self.cluster.api_client()

    def spot_nodes(self) -> list[str]:
        return self.cluster.spot_nodes()

    def reclaim(self, node: str, notice_s: float) -> None:
        self.cluster.preempt(node, notice_s)

    def spot_off(self) -> None:
        self.cluster.spot_off()

    def spot_on(self) -> None:
        self.cluster.spot_on()

    def kill_operator(self) -> None:
        self.operator.kill()

    def start_operator(self) -> None:
        self.operator.start()

    def restore(self) -> None:
        if self.cluster.spot_is_off:
            self.cluster.spot_on()
        self.cluster.create_nodes()
        self.operator.start()

    def pod_log(self, pod: str) -> str:
        """The log of this namespace's pod ``pod`` (its latest incarnation)."""
        root = self.cluster.layout.root / "podrunner" / "pods"
        logs = sorted(root.glob(f"{self.namespace}_{pod}_*/log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace") if logs else ""
