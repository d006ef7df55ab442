"""The kind backend of the e2e suite: the same scenarios on Docker "nodes" with real kubelets.

Where Docker and kind exist (CI: .github/workflows/e2e-kind.yml):

* a kind cluster with two spot and two on-demand workers, labelled as the ``local`` placement
  profile expects (capacity type, instance type, zone) and advertising one ``nvidia.com/gpu``
  each (an extended resource patched onto the node status: no GPU is used);
* the two images built from ``Dockerfile.operator`` / ``Dockerfile.worker`` and loaded into
  the nodes; the operator installed with the Helm chart, configured as the local backend is;
* moto's S3 server on the host, reached by pods at the kind network's gateway address;
* a reclaim: the interruption taint, then after the notice ``docker stop`` of the node's
  container (the machine is gone), the ``out-of-service`` taint so Kubernetes' own
  controllers evict and collect its pods, and the Node deleted. ``restore`` starts the
  container again; its kubelet registers the node anew.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from cheapspot_localcluster.s3 import S3Endpoint, s3_server_command, wait_for_s3
from cheapspot_localcluster.stack import (
    NOTICE_SECONDS,
    POOL_CRD_FILE,
    S3_SECRET,
    install_crd,
    operator_config,
    prepare_namespace,
)
from cheapspot_localcluster.trainjobs import repo_root
from cheapspot_localcluster.waiting import wait_for

CLUSTER = "cheapspot-e2e"
RELEASE, RELEASE_NS = "cheapspot", "cheapspot-system"
OPERATOR_IMAGE, WORKER_IMAGE = "cheapspot-operator:e2e", "cheapspot-worker:e2e"
CAPACITY = "cheapspot.dev/capacity-type"
INTERRUPTION = "cheapspot.dev/interruption"
WORKERS = [
    ("spot", "zone-a"),
    ("spot", "zone-b"),
    ("on-demand", "zone-a"),
    ("on-demand", "zone-b"),
]


def missing_tools() -> str:
    """Why the kind backend cannot run here ('' when it can)."""
    missing = [t for t in ("docker", "kind", "helm", "kubectl") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH"
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "docker is installed but its daemon does not answer (`docker info` failed)"
    return ""


def kind_config() -> dict[str, Any]:
    nodes: list[dict[str, Any]] = [{"role": "control-plane"}]
    for capacity, zone in WORKERS:
        nodes.append(
            {
                "role": "worker",
                "labels": {
                    CAPACITY: capacity,
                    "node.kubernetes.io/instance-type": "g5.xlarge",
                    "topology.kubernetes.io/zone": zone,
                },
            }
        )
    return {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4", "nodes": nodes}


def _run(*argv: str, input_: str | None = None) -> str:
    done = subprocess.run(argv, input=input_, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


class KindBackend:
    name = "kind"

    def __init__(self, namespace: str, workdir: Path, s3: S3Endpoint, pods_s3_url: str) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.s3 = s3
        self.pods_s3_url = pods_s3_url
        self.kubeconfig = workdir / "kubeconfig"
        self._s3_proc: subprocess.Popen[bytes] | None = None
        self._api: Any = None
        self._stopped: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def create(cls, namespace: str, workdir: Path) -> KindBackend:
        config = workdir / "kind.yaml"
        config.write_text(yaml.safe_dump(kind_config()))
        subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER], check=False)
        _run(
            "kind",
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            str(config),
            "--wait",
            "120s",
        )
        gateway = _run(
            "docker", "network", "inspect", "kind", "-f", "{{(index .IPAM.Config 0).Gateway}}"
        ).strip()
        port = _free_port()
        backend = cls(
            namespace,
            workdir,
            S3Endpoint(url=f"http://127.0.0.1:{port}"),
            pods_s3_url=f"http://{gateway}:{port}",
        )
        backend.kubeconfig.write_text(_run("kind", "get", "kubeconfig", "--name", CLUSTER))
        with (workdir / "s3.log").open("ab") as log:
            backend._s3_proc = subprocess.Popen(
                s3_server_command(port, host="0.0.0.0"), stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_s3(backend.s3.url)
        backend.s3.ensure_bucket()
        return backend

    def install(self) -> None:
        root = repo_root()
        for dockerfile, image in (
            ("Dockerfile.operator", OPERATOR_IMAGE),
            ("Dockerfile.worker", WORKER_IMAGE),
        ):
            _run("docker", "build", "-f", str(root / dockerfile), "-t", image, str(root))
            _run("kind", "load", "docker-image", image, "--name", CLUSTER)
        for node in self.worker_nodes():
            self._advertise_gpu(node)
        install_crd(self.api_client())
        install_crd(self.api_client(), repo_root() / POOL_CRD_FILE)
        prepare_namespace(self.api_client(), self.namespace, self.s3)
        config = operator_config(
            self.namespace, self.pods_s3_url, self.s3.region, image=WORKER_IMAGE
        )
        values = {
            "image": {"repository": OPERATOR_IMAGE.split(":", maxsplit=1)[0], "tag": "e2e"},
            "profile": "local",
            "noticeSeconds": NOTICE_SECONDS,
            "reconcileIntervalSeconds": 1,
            "statusRefreshSeconds": 15,
            "namespaces": [self.namespace],
            "worker": {
                "image": WORKER_IMAGE,
                "imagePullPolicy": "Never",
                "env": config["worker"]["env"],
                "envFromSecret": S3_SECRET,
                "serviceAccount": {"create": False, "name": ""},
            },
        }
        values_file = self.workdir / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        _run(
            "helm", "upgrade", "--install", RELEASE, str(root / "helm" / "cheapspot"),
            "--namespace", RELEASE_NS, "--create-namespace", "--values", str(values_file),
            "--kubeconfig", str(self.kubeconfig), "--wait",
        )  # fmt: skip
        # The operator reads progress records from the store: its endpoint and keys.
        env = [
            f"{k}={v}"
            for k, v in {
                **self.s3.env(),
                "AWS_ENDPOINT_URL": self.pods_s3_url,
                "AWS_ENDPOINT_URL_S3": self.pods_s3_url,
            }.items()
        ]
        _run(
            "kubectl", "--kubeconfig", str(self.kubeconfig), "-n", RELEASE_NS,
            "set", "env", f"deployment/{RELEASE}", *env,
        )  # fmt: skip
        self._kubectl(
            "-n", RELEASE_NS, "rollout", "status", f"deployment/{RELEASE}", "--timeout=180s"
        )

    def close(self) -> None:
        if self._s3_proc is not None:
            self._s3_proc.terminate()
            self._s3_proc.wait(timeout=10)
        subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER], check=False)

    # -- the Backend protocol ---------------------------------------------------------------

    def api_client(self) -> Any:
        if self._api is None:
            from kubernetes import config

            new_client: Any = config.new_client_from_config
            self._api = new_client(config_file=str(self.kubeconfig))
        return self._api

    def _kubectl(self, *args: str) -> str:
        return _run("kubectl", "--kubeconfig", str(self.kubeconfig), *args)

    def _nodes(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(self._kubectl("get", "nodes", "-o", "json"))[
            "items"
        ]
        return items

    def worker_nodes(self) -> list[str]:
        return [n["metadata"]["name"] for n in self._nodes() if CAPACITY in n["metadata"]["labels"]]

    def spot_nodes(self) -> list[str]:
        return sorted(
            n["metadata"]["name"]
            for n in self._nodes()
            if n["metadata"]["labels"].get(CAPACITY) == "spot"
        )

    def _advertise_gpu(self, node: str) -> None:
        patch = [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "1"}]
        self._kubectl(
            "patch", "node", node, "--subresource=status", "--type=json", "-p", json.dumps(patch)
        )

    def reclaim(self, node: str, notice_s: float) -> None:
        self._kubectl("taint", "node", node, f"{INTERRUPTION}=true:NoSchedule", "--overwrite")
        time.sleep(max(0.0, notice_s))
        _run("docker", "stop", "--time", "0", node)
        self._stopped.add(node)

        def not_ready() -> bool:
            node_obj = json.loads(self._kubectl("get", "node", node, "-o", "json"))
            conds = {c["type"]: c["status"] for c in node_obj["status"]["conditions"]}
            return conds.get("Ready") != "True"

        wait_for(f"{node} NotReady", not_ready, 120)
        self._kubectl(
            "taint", "node", node, "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
            "--overwrite",
        )  # fmt: skip

        def pods_gone() -> bool:
            out = self._kubectl(
                "get", "pods", "-A", "--field-selector", f"spec.nodeName={node}", "-o", "json"
            )
            return not [
                p for p in json.loads(out)["items"]
                if p["status"].get("phase") not in ("Succeeded", "Failed")
                and p["metadata"]["namespace"] == self.namespace
            ]  # fmt: skip

        wait_for(f"pods on {node} to go", pods_gone, 120)
        self._kubectl("delete", "node", node, "--wait=false")

    def spot_off(self) -> None:
        nodes = self.spot_nodes()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            for f in [pool.submit(self.reclaim, n, 0) for n in nodes]:
                f.result()

    def spot_on(self) -> None:
        self.restore()

    def kill_operator(self) -> None:
        self._kubectl(
            "-n", RELEASE_NS, "delete", "pod", "-l", f"app.kubernetes.io/instance={RELEASE}",
            "--grace-period=0", "--force", "--wait=false",
        )  # fmt: skip

    def start_operator(self) -> None:
        """The Deployment starts a new operator pod on its own."""

    def _ready(self, node: str) -> bool:
        jsonpath = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        try:
            return self._kubectl("get", "node", node, "-o", jsonpath).strip() == "True"
        except RuntimeError:  # not registered again yet
            return False

    def restore(self) -> None:
        for node in sorted(self._stopped):
            _run("docker", "start", node)
        for node in sorted(self._stopped):
            wait_for(f"{node} registered and Ready", functools.partial(self._ready, node), 180)
            self._advertise_gpu(node)
        self._stopped.clear()
