"""Shared pieces of the operator integration tests: the CRD installed, the operator running as
``cheapspot operator`` in a subprocess (so a test can SIGKILL it), a namespace per test, and
helpers that play the worker: progress records written to S3, pod outcomes set on the pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cheapspot.contract import Layout, Phase, Progress, Role
from cheapspot.store import Store
from cheapspot_localcluster.nodepool import expand
from cheapspot_localcluster.reclaim import is_ready
from cheapspot_localcluster.stack import OperatorProcess
from cheapspot_localcluster.waiting import wait_for
from cheapspot_operator.api.common import GROUP, VERSION
from cheapspot_operator.api.crd import build_crd, build_pool_crd
from cheapspot_operator.api.inferencepool import PLURAL as POOL_PLURAL
from cheapspot_operator.api.trainjob import PLURAL
from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi

T = TypeVar("T")
NOTICE_SECONDS = 10
FALLBACK_SECONDS = 5


def jobs_path(ns: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    return f"{base}/{name}" if name else base


def install_crd(api: KubeApi) -> None:
    for crd in (build_crd(), build_pool_crd()):
        _install(api, crd)


def _install(api: KubeApi, crd: dict[str, Any]) -> None:
    name = crd["metadata"]["name"]
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    existing = api.get(f"{path}/{name}")
    if existing is None:
        api.create(path, crd)
    else:
        crd["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        api.request("PUT", f"{path}/{name}", body=crd)

    def established() -> bool:
        got = api.get(f"{path}/{name}") or {}
        conds = (got.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    wait_for("the CRD to be established", established, timeout_s=30)


def job_body(name: str, output_uri: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "s3://cheapspot/models/tiny/"},
        "dataset": {"uri": "s3://cheapspot/data/qa.jsonl"},
        "output": {"uri": output_uri},
        "training": {"steps": 300},
        "rounds": {"localSteps": 100},
        # The tests write progress records whenever they like, as a worker that checkpoints
        # every 2 s would: the operator reads them once per checkpoint interval.
        "checkpoint": {"everySeconds": 2},
        "shards": 3,
        "resources": {"gpu": 1, "cpu": "1", "memory": "1Gi", "instanceTypes": ["g5.xlarge"]},
        "anchor": {"cpu": "500m", "memory": "512Mi"},
        "spot": {
            "fallbackAfterSeconds": FALLBACK_SECONDS,
            "maxPreemptionsPerHour": 100,
            "returnAfterSeconds": 2,
        },
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CheapTrainJob",
        "metadata": {"name": name},
        "spec": body,
    }


@dataclass
class Harness:
    api: KubeApi
    cluster: Any
    s3: Any
    operator: OperatorProcess
    namespace: str
    created_nodes: list[str] = field(default_factory=list)

    # -- jobs --------------------------------------------------------------------------------

    def output_uri(self, name: str) -> str:
        return f"s3://{self.s3.bucket}/{self.namespace}/{name}/"

    def apply(self, name: str, **spec: Any) -> dict[str, Any]:
        body = job_body(name, self.output_uri(name), **spec)
        self.api.create(jobs_path(self.namespace), body)
        return body

    def job(self, name: str) -> dict[str, Any]:
        got = self.api.get(jobs_path(self.namespace, name))
        assert got is not None, f"job {name} is gone"
        return got

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.job(name).get("status") or {}
        return status

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == type_:
                cond: dict[str, Any] = c
                return cond
        return None

    def table(self, name: str) -> dict[str, str]:
        """The row ``kubectl get ctj NAME`` prints, column name -> cell."""
        raw = self._table(name)
        columns = [c["name"] for c in raw["columnDefinitions"]]
        (row,) = raw["rows"]
        return {c: str(v) for c, v in zip(columns, row["cells"], strict=True)}

    def _table(self, name: str) -> dict[str, Any]:
        client = self.api._client
        _, url, headers, _body, _ = client.param_serialize(
            "GET",
            jobs_path(self.namespace, name),
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
            auth_settings=["BearerToken"],
        )
        response = client.call_api("GET", url, header_params=headers)
        data: dict[str, Any] = json.loads(response.read())
        return data

    # -- pods and nodes ----------------------------------------------------------------------

    def pods(self, job: str) -> list[dict[str, Any]]:
        return self.api.list(
            f"/api/v1/namespaces/{self.namespace}/pods", f"cheapspot.dev/job={job}"
        )

    def live_pods(self, job: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods(job)
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]

    def shard_pods(self, job: str, shard: int) -> list[dict[str, Any]]:
        return [
            p
            for p in self.live_pods(job)
            if p["metadata"]["labels"].get("cheapspot.dev/shard") == str(shard)
        ]

    def node(self, name: str) -> dict[str, Any] | None:
        return self.api.get(f"/api/v1/nodes/{name}")

    def node_capacity(self, name: str) -> str:
        node = self.node(name) or {}
        labels = (node.get("metadata") or {}).get("labels") or {}
        return str(labels.get("cheapspot.dev/capacity-type", ""))

    def running_on_nodes(self, job: str, expect: int) -> list[dict[str, Any]] | None:
        pods = [
            p
            for p in self.live_pods(job)
            if (p.get("status") or {}).get("phase") == "Running" and p["spec"].get("nodeName")
        ]
        return pods if len(pods) == expect else None

    def set_outcome(self, pod: str, exit_code: int, message: str = "") -> None:
        """Play the worker's end: the container terminated with ``exit_code``."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": now,
            "finishedAt": now,
        }
        if message:
            terminated["message"] = message
        status = {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": "worker",
                        "image": "cheapspot-worker:test",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        }
        self.api.merge_patch(f"/api/v1/namespaces/{self.namespace}/pods/{pod}/status", status)

    # -- the worker's progress ----------------------------------------------------------------

    def write_progress(self, job: str, index: int, **fields: Any) -> None:
        role = Role.ANCHOR if index < 0 else Role.TRAIN
        record = Progress(
            role=role,
            shard_index=max(index, 0),
            phase=fields.pop("phase", Phase.TRAINING),
            **fields,
        )
        layout = Layout(self.output_uri(job))
        Store(self.output_uri(job)).put_bytes(
            layout.progress(role, max(index, 0)), record.to_json()
        )

    def events(self, job: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.api.list(f"/api/v1/namespaces/{self.namespace}/events")
            if e.get("involvedObject", {}).get("name") == job
            and e.get("involvedObject", {}).get("kind") == "CheapTrainJob"
        ]

    def wait_event(self, job: str, reason: str, timeout_s: float = 10) -> dict[str, Any]:
        """The job's first event with ``reason``: events follow the status write that a test
        usually waits for by a few milliseconds, so they are waited for too."""
        found: dict[str, Any] = wait_for(
            f"a {reason} event about {job}",
            lambda: next((e for e in self.events(job) if e["reason"] == reason), None),
            timeout_s=timeout_s,
        )
        return found


def restore_nodes(api: KubeApi, cluster: Any) -> None:
    """Give back what a test took away: every pool node exists, is Ready, and spot is on."""
    for node in api.list("/api/v1/nodes"):
        if not is_ready(node) or node["spec"].get("taints"):
            api.delete(f"/api/v1/nodes/{node['metadata']['name']}", 0)
    wait_for(
        "switched-off nodes to go",
        lambda: all(is_ready(n) for n in api.list("/api/v1/nodes")),
        timeout_s=60,
    )
    cluster.spot_on()
    cluster.create_nodes()
    expected = len(list(expand(cluster.pools)))
    wait_for(
        "every pool node Ready",
        lambda: sum(1 for n in api.list("/api/v1/nodes") if is_ready(n)) >= expected,
        timeout_s=60,
    )


def make_harness(
    local_cluster: Any, s3_endpoint: Any, tmp_path: Path, **config: Any
) -> Iterator[Harness]:
    api = KubeApi(local_cluster.api_client())
    install_crd(api)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    api.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
    for key, value in s3_endpoint.env().items():
        os.environ[key] = value
    cfg: dict[str, Any] = {
        "profile": "local",
        "noticeSeconds": NOTICE_SECONDS,
        "reconcileIntervalSeconds": 1,
        "statusRefreshSeconds": 15,
        "metricsPort": 0,
        "namespaces": [namespace],
        "worker": {"image": "cheapspot-worker:test", "env": {"AWS_REGION": s3_endpoint.region}},
    }
    cfg.update(config)
    operator = OperatorProcess(
        kubeconfig=Path(local_cluster.kubeconfig_path),
        config=cfg,
        workdir=tmp_path,
        env=s3_endpoint.env(),
    )
    operator.start()
    harness = Harness(api, local_cluster, s3_endpoint, operator, namespace)
    try:
        yield harness
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log_tail(6000)}")
        with contextlib.suppress(ApiError):
            api.delete(f"/api/v1/namespaces/{namespace}")
        restore_nodes(api, local_cluster)


# -- inference pools (replica pods faked by kwok or run as processes; no vLLM here) ---------


def pools_path(ns: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{POOL_PLURAL}"
    return f"{base}/{name}" if name else base


def apply_pool(h: Harness, name: str, **spec: Any) -> None:
    body: dict[str, Any] = {
        "model": {"uri": "s3://cheapspot/models/tiny/"},
        "adapters": [{"name": "qa", "uri": "s3://cheapspot/adapters/qa/"}],
        "replicas": 3,
        "anchor": {"replicas": 1},
        "engine": {"shutdownTimeoutSeconds": 5},
        "resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"},
        "spot": {"fallbackAfterSeconds": 5},
    }
    body.update(spec)
    h.api.create(
        pools_path(h.namespace),
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CheapInferencePool",
            "metadata": {"name": name},
            "spec": body,
        },
    )


def replicas(h: Harness, pool: str) -> list[dict[str, Any]]:
    return [
        p
        for p in h.api.list(
            f"/api/v1/namespaces/{h.namespace}/pods",
            f"cheapspot.dev/pool={pool},cheapspot.dev/pool-role=replica",
        )
        if not p["metadata"].get("deletionTimestamp")
    ]
