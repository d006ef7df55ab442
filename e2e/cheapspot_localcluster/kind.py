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
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cheapspot_localcluster import dockerengine, kindnode
from cheapspot_localcluster.build import BuildError
from cheapspot_localcluster.dockerengine import HostQuirks
from cheapspot_localcluster.profiles import PROFILES, CapacityType, Profile
from cheapspot_localcluster.s3 import S3Endpoint, s3_server_command, wait_for_s3
from cheapspot_localcluster.stack import (
    NOTICE_SECONDS,
    S3_SECRET,
    operator_config,
    prepare_namespace,
)
from cheapspot_localcluster.trainjobs import repo_root
from cheapspot_localcluster.waiting import wait_for

CLUSTER = "cheapspot-e2e"
RELEASE, RELEASE_NS = "cheapspot", "cheapspot-system"
OPERATOR_IMAGE, WORKER_IMAGE = "cheapspot-operator:e2e", "cheapspot-worker:e2e"
PROFILE = PROFILES["local"]
CAPACITY = PROFILE.capacity_label
INTERRUPTION = PROFILE.interruption_taints[0].key
GPU = "nvidia.com/gpu"
INSTANCE_TYPE = "g5.xlarge"
# (capacity type, zone, GPUs) of each worker node; the control plane runs nothing of
# cheapspot's. Few nodes: every node holds its own copy of the worker image (torch with its
# CUDA libraries, about 6 GB). Two spot nodes, so a scenario can reclaim two shards' nodes in
# turn; one on-demand node with room for the anchor and both shards when spot is gone.
WORKERS = [
    (CapacityType.SPOT, "zone-a", 1),
    (CapacityType.SPOT, "zone-b", 1),
    (CapacityType.ON_DEMAND, "zone-a", 2),
]
GPUS_LABEL = "cheapspot.dev/e2e-gpus"

Progress = Callable[[str], None]


class KindError(RuntimeError):
    """The kind cluster cannot be had; the message says what is wrong."""


def unavailable() -> str:
    """Why the kind tier cannot run here ('' when it can, building what it lacks)."""
    if platform.system() != "Linux":
        return f"kind nodes need a Linux Docker host, this is {platform.system()}"
    if dockerengine.docker_answers():
        return ""
    if os.geteuid() != 0:
        return "no Docker daemon answers and installing/starting one needs root"
    if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        return "no Docker engine and no apt-get to install Debian's docker.io"
    return ""


def not_requested() -> str:
    """The kind tier builds for over an hour cold: it runs when asked for
    (``make e2e-kind`` sets CHEAPSPOT_KIND=1), not in every ``pytest``."""
    if os.environ.get("CHEAPSPOT_KIND") == "1":
        return ""
    return "the kind tier runs with `make e2e-kind` (CHEAPSPOT_KIND=1); it builds for over an hour cold"


def keep() -> bool:
    """CHEAPSPOT_KIND_KEEP=1: keep the cluster after a run and reuse it in the next."""
    return os.environ.get("CHEAPSPOT_KIND_KEEP") == "1"


def reuse_images() -> bool:
    """CHEAPSPOT_KIND_IMAGES=reuse: use the operator and worker images as last built, when
    they exist (iterating on tests; they may predate the sources)."""
    return os.environ.get("CHEAPSPOT_KIND_IMAGES") == "reuse" and all(
        kindnode.image_exists(i) for i in (OPERATOR_IMAGE, WORKER_IMAGE)
    )


def kind_config(
    quirks: HostQuirks,
    profile: Profile = PROFILE,
    workers: list[tuple[CapacityType, str, int]] = WORKERS,
) -> dict[str, Any]:
    """kind's cluster configuration: nodes labelled per the placement profile, the pod
    network of the node image (no kindnetd), component images as built, host quirks."""
    nodes: list[dict[str, Any]] = [{"role": "control-plane"}]
    for capacity, zone, gpus in workers:
        nodes.append(
            {
                "role": "worker",
                "labels": {
                    **profile.capacity_labels(capacity),
                    "node.kubernetes.io/instance-type": INSTANCE_TYPE,
                    "topology.kubernetes.io/zone": zone,
                    GPUS_LABEL: str(gpus),
                },
            }
        )
    patches: list[str] = []
    if quirks.cgroup_v1:
        # kubelet >= 1.35 refuses cgroup v1 unless told otherwise.
        patches.append(
            yaml.safe_dump(
                {
                    "kind": "KubeletConfiguration",
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "failCgroupV1": False,
                }
            )
        )
    config: dict[str, Any] = {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "networking": {"disableDefaultCNI": True},
        "kubeadmConfigPatches": patches,
        "nodes": nodes,
    }
    if quirks.restricted_oom_score_adj:
        config["containerdConfigPatches"] = [
            '[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
        ]
    return config


def _run(*argv: str, input_: str | None = None) -> str:
    done = subprocess.run(argv, input=input_, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KindError(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _ref(image: str) -> str:
    """The name containerd keeps a Docker image under (``docker.io/library/`` for short names)."""
    return image if "/" in image.split(":", 1)[0] else f"docker.io/library/{image}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class KindCluster:
    """A kind cluster of the pinned Kubernetes, with everything it needs built here."""

    name: str
    tools: kindnode.KindTools
    kubeconfig: Path

    @classmethod
    def prepare(cls, name: str, kubeconfig: Path, progress: Progress = print) -> KindCluster:
        """Docker running, kind/helm/kubectl and the node image built (cached after once)."""
        reason = unavailable()
        if reason:
            raise KindError(f"the kind tier cannot run here: {reason}")
        try:
            dockerengine.ensure_engine(progress)
            tools = kindnode.ensure_tools(progress)
        except (dockerengine.DockerError, BuildError) as exc:
            raise KindError(str(exc)) from exc
        return cls(name, tools, kubeconfig)

    def kind(self, *args: str) -> str:
        return _run(str(self.tools.kind), *args)

    def kubectl(self, *args: str, input_: str | None = None) -> str:
        return _run(
            str(self.tools.kubectl), "--kubeconfig", str(self.kubeconfig), *args, input_=input_
        )

    def exists(self) -> bool:
        return self.name in self.kind("get", "clusters").split()

    def create(self, workdir: Path, progress: Progress = print) -> None:
        """A fresh cluster: control plane and workers, CoreDNS ready, GPUs advertised."""
        quirks = dockerengine.detect_quirks()
        if self.exists():
            self.delete()
        config = workdir / "kind.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(kind_config(quirks)))
        progress(f"creating kind cluster {self.name} from {self.tools.node_image}")
        self.kind(
            "create", "cluster", "--name", self.name, "--image", self.tools.node_image,
            "--config", str(config), "--kubeconfig", str(self.kubeconfig), "--wait", "0s",
        )  # fmt: skip
        # The nodes' pod network reads the nodes: until it may, no node is Ready (so kind's
        # own --wait would only time out).
        self.kubectl("apply", "-f", "-", input_=kindnode.PODNET_RBAC)
        progress("waiting for the nodes to be Ready")
        self.kubectl("wait", "--for=condition=Ready", "nodes", "--all", "--timeout=300s")
        progress("waiting for CoreDNS")
        self.kubectl(
            "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s"
        )  # fmt: skip
        for node in self.worker_nodes():
            self.advertise_gpu(node)

    def resume(self, progress: Progress = print) -> None:
        """A kept cluster as a run left it (Docker restarted, a node container stopped by a
        reclaim): every node container running, the API server answering with its RBAC
        loaded, every node Ready with its GPU advertised."""
        containers = _run(
            "docker", "ps", "-a", "--filter", f"label=io.x-k8s.kind.cluster={self.name}",
            "--format", "{{.Names}}",
        ).split()  # fmt: skip
        if containers:
            _run("docker", "start", *containers)

        def answers() -> bool:
            try:
                return bool(self.node_names())
            except KindError:  # not up yet, or up with its authorizer not yet synced
                return False

        progress("waiting for the kept cluster's API server and nodes")
        wait_for("the kind API server to answer", answers, 180, poll_s=1.0)
        wait_for(
            f"all {len(containers)} nodes registered",
            lambda: len(self.node_names()) >= len(containers),
            180,
            poll_s=1.0,
        )
        self.kubectl("wait", "--for=condition=Ready", "nodes", "--all", "--timeout=300s")
        for node in self.worker_nodes():
            self.advertise_gpu(node)

    def images(self, progress: Progress = print) -> None:
        """The operator and worker images built from the Dockerfiles (a layer cache hit when
        nothing changed) and in every worker node (skipped where that very image is)."""
        if reuse_images():
            progress(f"reusing {OPERATOR_IMAGE} and {WORKER_IMAGE} (CHEAPSPOT_KIND_IMAGES=reuse)")
        else:
            root = repo_root()
            base = kindnode.python_base_image(progress)
            kindnode.app_image(root / "Dockerfile.operator", OPERATOR_IMAGE, base, progress)
            kindnode.app_image(
                root / "Dockerfile.worker", WORKER_IMAGE, base, progress, target="train"
            )
        workers = self.worker_nodes()
        for image in (OPERATOR_IMAGE, WORKER_IMAGE):
            started = time.monotonic()
            loaded = self.load(image, workers)
            if loaded:
                took = time.monotonic() - started
                progress(f"loaded {image} into {', '.join(loaded)} in {took:.0f}s")

    def delete(self) -> None:
        subprocess.run(
            [str(self.tools.kind), "delete", "cluster", "--name", self.name],
            capture_output=True,
            check=False,
        )

    def load(self, image: str, nodes: list[str] | None = None) -> list[str]:
        """Import a local Docker image into each node's containerd, one node at a time.

        ``kind load`` imports into all nodes at once and keeps each layer twice (the imported
        blob and the unpacked snapshot): for a worker image of several GB (torch with its CUDA
        libraries) that is more disk than a small machine has. Here each node gets the image
        streamed from ``docker save``, then drops the layer blobs it unpacked, as containerd's
        own ``discard_unpacked_layers`` does for pulled images.
        """
        image_id = _run("docker", "image", "inspect", "-f", "{{.Id}}", image).strip()
        loaded: list[str] = []
        for node in nodes if nodes is not None else self.node_names():
            digest = self._config_digest(node, image)
            if digest == image_id:
                continue  # this very image is there already
            if digest is not None:
                # An older build of the tag: dropped first (its snapshots collected), so the
                # node never holds two builds of a 6 GB image at once.
                _run("docker", "exec", node, "ctr", "--namespace=k8s.io", "images", "rm",
                     "--sync", _ref(image))  # fmt: skip
            loaded.append(node)
            save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
            done = subprocess.run(
                ["docker", "exec", "-i", node, "ctr", "--namespace=k8s.io", "images", "import",
                 "--digests", "--snapshotter=overlayfs", "-"],
                stdin=save.stdout, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if save.stdout is not None:
                save.stdout.close()
            save.wait()
            if done.returncode != 0 or save.returncode != 0:
                raise KindError(f"loading {image} into {node} failed:\n{done.stderr[-2000:]}")
            self._discard_layers(node, image)
        return loaded

    @staticmethod
    def _manifest(node: str, image: str) -> dict[str, Any] | None:
        """The image's manifest in the node's containerd (None: not there)."""

        def ctr(*args: str) -> str:
            return _run("docker", "exec", node, "ctr", "--namespace=k8s.io", *args)

        listing = ctr("images", "ls", f"name=={_ref(image)}").splitlines()[1:]
        if not listing:
            return None
        manifest: dict[str, Any] = json.loads(ctr("content", "get", listing[0].split()[2]))
        if "manifests" in manifest:  # an index: its first (only) platform's manifest
            manifest = json.loads(ctr("content", "get", manifest["manifests"][0]["digest"]))
        return manifest

    def _config_digest(self, node: str, image: str) -> str | None:
        manifest = self._manifest(node, image)
        return None if manifest is None else str(manifest["config"]["digest"])

    def _discard_layers(self, node: str, image: str) -> None:
        manifest = self._manifest(node, image)
        if manifest is None:
            raise KindError(f"{image} not found in {node}'s containerd after the import")
        layers = [layer["digest"] for layer in manifest.get("layers", [])]
        if layers:
            _run("docker", "exec", node, "ctr", "--namespace=k8s.io", "content", "rm", *layers)

    def node_names(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.nodes()]

    def nodes(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(self.kubectl("get", "nodes", "-o", "json"))[
            "items"
        ]
        return items

    def worker_nodes(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.nodes() if CAPACITY in n["metadata"]["labels"]]

    def advertise_gpu(self, node: str) -> None:
        """The node's ``nvidia.com/gpu`` in its status, as many as its GPUS_LABEL says (no
        device plugin, no GPU used)."""
        labels = json.loads(self.kubectl("get", "node", node, "-o", "json"))["metadata"]["labels"]
        gpus = labels.get(GPUS_LABEL, "1")
        patch = [{"op": "add", "path": f"/status/capacity/{GPU.replace('/', '~1')}", "value": gpus}]
        self.kubectl(
            "patch", "node", node, "--subresource=status", "--type=json", "-p", json.dumps(patch)
        )


class KindBackend:
    """The e2e scenarios on a kind cluster: images built from the Dockerfiles, the chart
    installed with helm, S3 (moto) on the host reached by pods at the kind network's gateway."""

    name = "kind"

    def __init__(
        self,
        cluster: KindCluster,
        namespace: str,
        workdir: Path,
        s3: S3Endpoint,
        pods_s3_url: str,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = workdir
        self.s3 = s3
        self.pods_s3_url = pods_s3_url
        self.kubeconfig = cluster.kubeconfig
        self._s3_proc: subprocess.Popen[bytes] | None = None
        self._api: Any = None
        self._stopped: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def create(cls, namespace: str, workdir: Path, progress: Progress = print) -> KindBackend:
        cluster = KindCluster.prepare(CLUSTER, workdir / "kubeconfig", progress)
        if keep() and cluster.exists():
            progress(f"reusing kind cluster {CLUSTER} (CHEAPSPOT_KIND_KEEP=1)")
            cluster.kubeconfig.write_text(cluster.kind("get", "kubeconfig", "--name", CLUSTER))
            cluster.resume(progress)
        else:
            cluster.create(workdir, progress)
        gateway = _run(
            "docker", "network", "inspect", "kind", "-f", "{{(index .IPAM.Config 0).Gateway}}"
        ).strip()
        port = _free_port()
        backend = cls(
            cluster,
            namespace,
            workdir,
            S3Endpoint(url=f"http://127.0.0.1:{port}"),
            pods_s3_url=f"http://{gateway}:{port}",
        )
        with (workdir / "s3.log").open("ab") as log:
            backend._s3_proc = subprocess.Popen(
                s3_server_command(port, host="0.0.0.0"), stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_s3(backend.s3.url)
        backend.s3.ensure_bucket()
        return backend

    def helm_values(self) -> dict[str, Any]:
        """The chart's values for this cluster: the README's "any cluster with an S3-compatible
        store" install, with the images built here and e2e timings."""
        store_env = {
            "AWS_ENDPOINT_URL_S3": self.pods_s3_url,
            "AWS_REGION": self.s3.region,
        }
        config = operator_config(
            self.namespace, self.pods_s3_url, self.s3.region, image=WORKER_IMAGE
        )
        return {
            "image": {
                "repository": OPERATOR_IMAGE.split(":", maxsplit=1)[0],
                "tag": "e2e",
                "pullPolicy": "Never",
            },
            "profile": PROFILE.name,
            # The operator is not to be reclaimed with the spot nodes it watches.
            "nodeSelector": PROFILE.capacity_labels(CapacityType.ON_DEMAND),
            "noticeSeconds": NOTICE_SECONDS,
            "reconcileIntervalSeconds": config["reconcileIntervalSeconds"],
            "statusRefreshSeconds": config["statusRefreshSeconds"],
            "namespaces": [self.namespace],
            "env": store_env,
            "envFromSecret": S3_SECRET,
            "worker": {
                "image": WORKER_IMAGE,
                "imagePullPolicy": "Never",
                "env": {**config["worker"]["env"], **store_env},
                "envFromSecret": S3_SECRET,
            },
        }

    def install(self, progress: Progress = print) -> None:
        root = repo_root()
        self.cluster.images(progress)
        # What a user does before installing: a namespace for jobs, the store's keys in it and
        # in the release namespace (where IRSA / RRSA are not available).
        prepare_namespace(self.api_client(), self.namespace, self.s3)
        prepare_namespace(self.api_client(), RELEASE_NS, self.s3)
        values_file = self.workdir / "values.yaml"
        values_file.write_text(yaml.safe_dump(self.helm_values()))
        progress("helm install")
        _run(
            str(self.cluster.tools.helm), "install", RELEASE, str(root / "helm" / "cheapspot"),
            "--namespace", RELEASE_NS, "--create-namespace", "--values", str(values_file),
            "--kubeconfig", str(self.kubeconfig), "--wait", "--timeout", "5m",
        )  # fmt: skip

    def close(self) -> None:
        if self._s3_proc is not None:
            self._s3_proc.terminate()
            self._s3_proc.wait(timeout=10)
        if keep():
            subprocess.run(
                [str(self.cluster.tools.helm), "uninstall", RELEASE, "--namespace", RELEASE_NS,
                 "--kubeconfig", str(self.kubeconfig), "--wait"],
                capture_output=True, check=False,
            )  # fmt: skip
            # The run's pods go with their namespace: a kept cluster's nodes would otherwise
            # hold every finished pod's container (and the image builds they ran).
            subprocess.run(
                [str(self.cluster.tools.kubectl), "--kubeconfig", str(self.kubeconfig), "delete",
                 "namespace", self.namespace, "--wait=false", "--ignore-not-found"],
                capture_output=True, check=False,
            )  # fmt: skip
        else:
            self.cluster.delete()

    # -- the Backend protocol ---------------------------------------------------------------

    def api_client(self) -> Any:
        if self._api is None:
            from kubernetes import config

            new_client: Any = config.new_client_from_config
            self._api = new_client(config_file=str(self.kubeconfig))
        return self._api

    def _kubectl(self, *args: str) -> str:
        return self.cluster.kubectl(*args)

    def spot_nodes(self) -> list[str]:
        spot = PROFILE.capacity_labels(CapacityType.SPOT)
        return sorted(
            n["metadata"]["name"]
            for n in self.cluster.nodes()
            if spot.items() <= n["metadata"]["labels"].items()
        )

    def reclaim(self, node: str, notice_s: float) -> None:
        """The profile's interruption taint; after the notice the node's container is stopped
        (the machine is gone), Kubernetes' controllers evict its pods, the Node is deleted."""
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
        except KindError:  # not registered again yet
            return False

    def restore(self) -> None:
        for node in sorted(self._stopped):
            _run("docker", "start", node)
        for node in sorted(self._stopped):
            wait_for(f"{node} registered and Ready", functools.partial(self._ready, node), 180)
            self.cluster.advertise_gpu(node)
        self._stopped.clear()
