"""The act layer against an in-memory API: order of writes, idempotency, conflicts."""

from __future__ import annotations

import asyncio
import builtins
import copy
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import REGISTRY

from cheapspot.contract import Layout, Phase, Progress, Role
from cheapspot.store import Store
from cheapspot_operator.api.inferencepool import parse_spec as parse_pool_spec
from cheapspot_operator.inferencepool.controller import PoolReconciler
from cheapspot_operator.inferencepool.manifests import PoolInfo
from cheapspot_operator.inferencepool.tokens import AdminTokens, PoolGuard
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.runtime.kubeapi import ApiError
from cheapspot_operator.runtime.loops import Loops
from cheapspot_operator.testing.pool import pool_dict
from cheapspot_operator.testing.train import spec_dict
from cheapspot_operator.testing.world import EPOCH, FakeClock
from cheapspot_operator.trainjob.controller import Reconciler
from cheapspot_operator.trainjob.observed import ANCHOR_INDEX, GENERATOR_BASE
from cheapspot_operator.trainjob.progress import (
    ProgressCache,
    StoreProgressReader,
    store_output_claims,
)

JOB = "/apis/cheapspot.dev/v1alpha1/namespaces/ns/cheaptrainjobs/qa-lora"
PODS = "/api/v1/namespaces/ns/pods"


class FakeApi:
    """Just enough of the API server: objects by path, resourceVersion preconditions."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.version = 1
        self.conflict_next_patch = False
        self.lists: list[str] = []
        self.refuse: dict[str, ApiError] = {}
        """Pod name -> the error its creation gets."""
        self.gets: list[str] = []
        self.events: list[dict[str, Any]] = []

    def get(self, path: str) -> dict[str, Any] | None:
        self.gets.append(path)
        obj = self.objects.get(path)
        return copy.deepcopy(obj) if obj else None

    def list(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> list[dict[str, Any]]:
        self.lists.append(path)
        out = []
        for key, obj in self.objects.items():
            if key.rsplit("/", 1)[0] != path:
                continue
            if label_selector:
                k, v = label_selector.split("=")
                if obj["metadata"].get("labels", {}).get(k) != v:
                    continue
            out.append(copy.deepcopy(obj))
        return out

    def list_versioned(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], int]:
        if label_selector and "=" not in label_selector:  # "key": the label is present
            label_selector = None
        return self.list(path, label_selector, field_selector), self.version

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        self.calls.append(("create", body["metadata"].get("name", "event")))
        if path.endswith("/events"):
            self.events.append(copy.deepcopy(dict(body)))
            return copy.deepcopy(dict(body))
        key = f"{path}/{body['metadata']['name']}"
        if body["metadata"]["name"] in self.refuse:
            raise self.refuse[body["metadata"]["name"]]
        if key in self.objects:
            return None
        self.version += 1
        obj = copy.deepcopy(dict(body))
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"].setdefault("namespace", path.split("/")[4])
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", path))
        target = self.objects[path.removesuffix("/status")]
        if (
            self.conflict_next_patch
            or body["metadata"]["resourceVersion"] != target["metadata"]["resourceVersion"]
        ):
            self.conflict_next_patch = False
            raise ApiError(409, "conflict")
        target["status"] = copy.deepcopy(body["status"])
        self.version += 1
        target["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(target)

    def delete(self, path: str, grace_seconds: int | None = None) -> bool:
        self.calls.append(("delete", path))
        return self.objects.pop(path, None) is not None


def _world(**spec: Any) -> tuple[FakeApi, Reconciler]:
    api = FakeApi()
    api.objects[JOB] = {
        "metadata": {
            "name": "qa-lora",
            "namespace": "ns",
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": spec_dict(**spec),
    }
    api.objects["/api/v1/nodes/spot-1"] = {
        "metadata": {"name": "spot-1", "labels": {"cheapspot.dev/capacity-type": "spot"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }

    def no_progress(uri: str, shards: int, anchor: int) -> Mapping[int, Progress]:
        return {}

    reconciler = Reconciler(
        api,  # type: ignore[arg-type]
        OperatorConfig(),
        progress_reader=no_progress,
        clock=FakeClock(EPOCH),
        output_claims=lambda uri, ns, name, uid, resume: "",
    )
    return api, reconciler


def test_status_is_written_before_any_pod_is_created() -> None:
    api, r = _world(shards=2)
    r.reconcile("ns", "qa-lora")
    kinds = [c[0] for c in api.calls]
    assert kinds[0] == "patch"
    assert kinds.count("create") >= 3
    pods = api.list(PODS)
    assert sorted(p["metadata"]["name"] for p in pods) == [
        "qa-lora-anchor-0",
        "qa-lora-shard-0-0",
        "qa-lora-shard-1-0",
    ]
    assert api.objects[JOB]["status"]["phase"] == "Pending"


def test_reconciling_again_creates_nothing_new() -> None:
    api, r = _world(shards=2)
    r.reconcile("ns", "qa-lora")
    before = len(api.list(PODS))
    r.reconcile("ns", "qa-lora")
    r.reconcile("ns", "qa-lora")
    assert len(api.list(PODS)) == before


def test_a_lost_status_write_stops_the_round_and_nothing_else_happens() -> None:
    api, r = _world(shards=2)
    api.conflict_next_patch = True
    r.reconcile("ns", "qa-lora")
    assert api.list(PODS) == []
    r.reconcile("ns", "qa-lora")
    assert len(api.list(PODS)) == 3


def test_a_restarted_operator_finds_everything_in_the_cluster() -> None:
    api, r = _world(shards=2)
    r.reconcile("ns", "qa-lora")
    _, fresh = _world(shards=2)
    fresh.api = api  # type: ignore[assignment]
    fresh.reconcile("ns", "qa-lora")
    assert len(api.list(PODS)) == 3


def test_an_invalid_spec_fails_the_job_once_with_the_field_named() -> None:
    api, r = _world(shards=0)
    r.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    assert "spec.shards" in status["message"]
    calls = len(api.calls)
    r.reconcile("ns", "qa-lora")
    assert len(api.calls) == calls


def test_a_sequences_job_creates_generation_pods_in_the_serving_image_first() -> None:
    teacher = {"teacher": {"uri": "s3://models/teacher/"}, "mode": "sequences"}
    api, r = _world(shards=2, distillation=teacher)
    r.reconcile("ns", "qa-lora")
    pods = {p["metadata"]["name"]: p for p in api.list(PODS)}
    assert sorted(pods) == ["qa-lora-gen-0-0", "qa-lora-gen-1-0"]
    image = OperatorConfig().serving.image
    assert {p["spec"]["containers"][0]["image"] for p in pods.values()} == {image}
    status = api.objects[JOB]["status"]
    assert [g["pod"] for g in status["generators"]] == ["qa-lora-gen-0-0", "qa-lora-gen-1-0"]


def test_a_sequences_job_with_logits_fields_fails_naming_them() -> None:
    teacher = {"teacher": {"uri": "s3://models/teacher/"}, "mode": "sequences", "alpha": 0.9}
    api, r = _world(distillation=teacher)
    r.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "InvalidSpec"
    assert "distillation.alpha applies to logits mode only" in status["message"]
    assert api.list(PODS) == []


def test_a_preemption_is_counted_in_the_metrics_by_signal() -> None:

    def count() -> float:
        value = REGISTRY.get_sample_value(
            "cheapspot_preemptions_total", {"signal": "InterruptionNotice"}
        )
        return value or 0.0

    api, r = _world(shards=1)
    r.reconcile("ns", "qa-lora")
    pod = api.objects[f"{PODS}/qa-lora-shard-0-0"]
    pod["spec"]["nodeName"] = "spot-1"
    pod["status"] = {"phase": "Running"}
    api.objects["/api/v1/nodes/spot-1"]["spec"] = {
        "taints": [{"key": "cheapspot.dev/interruption", "effect": "NoSchedule"}]
    }
    before = count()
    r.reconcile("ns", "qa-lora")
    assert count() == before + 1
    assert f"{PODS}/qa-lora-shard-0-1" in api.objects


def test_a_refused_pod_creation_reaches_the_status_with_the_api_servers_words() -> None:
    api, reconciler = _world(shards=1)
    api.refuse["qa-lora-shard-0-0"] = ApiError(
        403,
        '{"kind":"Status","message":"pods \\"qa-lora-shard-0-0\\" is forbidden: '
        'exceeded quota: gpu-quota"}',
    )
    reconciler.reconcile("ns", "qa-lora")
    assert f"{PODS}/qa-lora-anchor-0" in api.objects  # the rest went ahead
    reconciler.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    (progressing,) = [c for c in status["conditions"] if c["type"] == "Progressing"]
    assert progressing["reason"] == "CreateRefused"
    assert "exceeded quota: gpu-quota" in progressing["message"]
    del api.refuse["qa-lora-shard-0-0"]
    reconciler.reconcile("ns", "qa-lora")
    assert f"{PODS}/qa-lora-shard-0-0" in api.objects


def test_a_file_output_in_a_cluster_without_a_shared_filesystem_fails_at_once() -> None:
    api, reconciler = _world(output={"uri": "file:///data/out/"})
    reconciler.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "UnsupportedURI"
    assert "spec.output.uri file:///data/out/" in status["message"]
    assert "use s3://bucket/prefix/" in status["message"]
    assert not any(k.startswith(PODS) for k in api.objects)


def test_a_file_teacher_in_a_cluster_without_a_shared_filesystem_fails_at_once() -> None:
    api, reconciler = _world(
        distillation={"mode": "logits", "teacher": {"uri": "file:///models/teacher/"}}
    )
    reconciler.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "UnsupportedURI"
    assert "spec.distillation.teacher.uri file:///models/teacher/" in status["message"]


def test_a_finished_job_is_left_alone() -> None:
    api, reconciler = _world(shards=1)
    reads: list[str] = []
    reconciler.progress.reader = lambda uri, shards, anchor: reads.append(uri) or {}
    reconciler.reconcile("ns", "qa-lora")
    api.objects[JOB]["status"]["phase"] = "Succeeded"
    reconciler.reconcile("ns", "qa-lora")  # the pods an earlier pass created are strays now
    assert not any(k.startswith(PODS + "/") for k in api.objects)
    assert reconciler.finished("ns", "qa-lora") is False  # it just acted
    api.calls.clear()
    api.lists.clear()
    reads.clear()
    assert isinstance(reconciler.clock, FakeClock)
    for _ in range(10):
        reconciler.clock.advance(60)
        assert reconciler.reconcile("ns", "qa-lora") == []
    assert reconciler.finished("ns", "qa-lora")
    assert api.calls == []  # no status write, not even for cost
    assert "/api/v1/nodes" not in api.lists and reads == []


def test_the_loop_of_a_finished_job_ends() -> None:

    class Finishes:
        calls = 0

        def reconcile(self, namespace: str, name: str) -> list[Any]:
            self.calls += 1
            return []

        def finished(self, namespace: str, name: str) -> bool:
            return self.calls >= 2

    async def run() -> int:
        fake = Finishes()
        one = ThreadPoolExecutor(max_workers=1)
        loops = Loops(fake, 0.01, one, one)  # type: ignore[arg-type]
        loops.ensure(("ns", "job"))
        await asyncio.sleep(0.5)
        assert loops.tasks == {}
        return fake.calls

    assert asyncio.run(run()) == 2


def _node(name: str, taints: tuple[str, ...] = (), ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"taints": [{"key": k, "effect": "NoSchedule"} for k in taints]},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def _bound(name: str, node: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name}, "spec": {"nodeName": node}}


def test_a_node_change_wakes_only_the_jobs_with_pods_on_it() -> None:

    notice = "cheapspot.dev/interruption"

    async def run() -> None:
        one = ThreadPoolExecutor(max_workers=1)
        loops = Loops(None, 60, one, one)  # type: ignore[arg-type]
        a, b, c = ("ns", "a"), ("ns", "b"), ("ns", "c")
        for key in (a, b, c):
            loops.pokes[key] = asyncio.Event()

        def woken() -> set[str]:
            out = {k[1] for k, e in loops.pokes.items() if e.is_set()}
            for e in loops.pokes.values():
                e.clear()
            return out

        for name in ("n1", "n2"):
            loops.node_changed("ADDED", name, _node(name))
        assert woken() == set()  # nobody's pods are there
        loops.place("ADDED", _bound("a-0", ""), a)  # not scheduled yet
        loops.place("MODIFIED", _bound("a-0", "n1"), a)
        loops.place("MODIFIED", _bound("b-0", "n2"), b)
        loops.node_changed("MODIFIED", "n1", _node("n1"))  # a heartbeat
        assert woken() == set()
        loops.node_changed("MODIFIED", "n1", _node("n1", (notice,)))
        assert woken() == {"a"}
        loops.node_changed("MODIFIED", "n2", _node("n2", ready=False))
        assert woken() == {"b"}
        loops.place("DELETED", _bound("b-0", "n2"), b)
        loops.node_changed("DELETED", "n2", _node("n2"))
        assert woken() == set()
        loops.node_changed("MODIFIED", "n1", _node("n1"))  # the notice taken back
        assert woken() == {"a"}

    asyncio.run(run())


def test_a_woken_loop_never_waits_behind_the_timer_ticks() -> None:

    class Records:
        def __init__(self) -> None:
            self.threads: list[tuple[str, str]] = []

        def reconcile(self, namespace: str, name: str) -> list[Any]:
            self.threads.append((name, threading.current_thread().name))
            return []

        def finished(self, namespace: str, name: str) -> bool:
            return False

    async def run() -> list[tuple[str, str]]:
        fake = Records()
        ticks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tick")
        woken = ThreadPoolExecutor(max_workers=1, thread_name_prefix="woken")
        loops = Loops(fake, 0.05, ticks, woken)  # type: ignore[arg-type]
        loops.ensure(("ns", "job"))
        for _ in range(200):  # the first pass (woken), then timer ticks
            await asyncio.sleep(0.01)
            if len(fake.threads) >= 3:
                break
        seen = len(fake.threads)
        loops.poke(("ns", "job"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if any(t.startswith("woken") for _, t in fake.threads[seen:]):
                break
        await loops.stop_all()
        return [t.split("_")[0] for _, t in fake.threads[:seen]] + [
            "after: " + ",".join(sorted({t.split("_")[0] for _, t in fake.threads[seen:]}))
        ]

    threads = asyncio.run(run())
    assert threads[0] == "woken" and set(threads[1:-1]) == {"tick"}
    assert "woken" in threads[-1]


def test_a_slow_store_does_not_hold_up_a_reconciliation() -> None:

    def slow(uri: str, shards: int, anchor: int) -> Mapping[int, Progress]:
        time.sleep(2.0)
        return {}

    cache = ProgressCache(slow, min_gap=1.0, first_wait=0.2)
    started = time.monotonic()
    assert cache.get("uid", "s3://b/p/", 1) is None
    assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + 5
    while cache.get("uid", "s3://b/p/", 1) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cache.get("uid", "s3://b/p/", 1) == {}


def test_one_store_client_per_output_prefix(tmp_path: Any) -> None:

    reader = StoreProgressReader()
    uri = f"file://{tmp_path}/job/"
    assert reader(uri, 2, 0) == {}
    first = reader.store(uri)
    reader(uri, 2, 0)
    assert reader.store(uri) is first and len(reader.stores) == 1


def test_generation_shards_progress_is_read_at_their_slots_when_asked_for(tmp_path: Any) -> None:

    uri = f"file://{tmp_path}/job/"
    store, layout = Store(uri), Layout(uri)
    for role, i in ((Role.GENERATE, 0), (Role.GENERATE, 1), (Role.TRAIN, 0), (Role.ANCHOR, 0)):
        record = Progress(role=role, shard_index=i, phase=Phase.GENERATING, step=3 + i)
        store.put_bytes(layout.progress(role, i), record.to_json())
    reader = StoreProgressReader()
    got = reader(uri, 2, 2)
    assert set(got) == {ANCHOR_INDEX, 0, GENERATOR_BASE, GENERATOR_BASE + 1}
    assert got[GENERATOR_BASE + 1].role is Role.GENERATE and got[GENERATOR_BASE + 1].step == 4
    assert got[0].role is Role.TRAIN
    assert set(reader(uri, 2, 0)) == {ANCHOR_INDEX, 0}  # training: generators not read


def test_an_output_prefix_is_claimed_by_one_job_and_refused_to_another(tmp_path: Any) -> None:

    claim = store_output_claims(StoreProgressReader())
    uri = f"file://{tmp_path}/out/"
    assert claim(uri, "ns", "first", "uid-1", False) == ""
    assert claim(uri, "ns", "first", "uid-1", False) == ""  # its own: fine, again
    refused = claim(uri, "ns", "first", "uid-2", False)  # deleted and re-applied: a new UID
    assert "belongs to job ns/first (uid uid-1)" in refused and uri in refused
    assert "ifExists: Resume" in refused
    assert claim(uri, "ns", "first", "uid-2", True) == ""  # asked for explicitly
    assert "uid uid-2" in claim(uri, "ns", "other", "uid-3", False)


def test_a_prefix_holding_a_finished_adapter_is_refused_unless_resumed(tmp_path: Any) -> None:

    uri = f"file://{tmp_path}/old/"
    Store(uri).publish("final/", {"adapter_model.safetensors": b"old"})
    claim = store_output_claims(StoreProgressReader())
    assert "already holds a finished adapter" in claim(uri, "ns", "new", "uid-9", False)
    assert claim(uri, "ns", "new", "uid-9", True) == ""
    assert (tmp_path / "old" / "final" / "adapter_model.safetensors").read_bytes() == b"old"


def test_a_job_refused_its_output_prefix_fails_naming_the_owner() -> None:
    api, reconciler = _world(shards=1)
    reconciler.claims = lambda uri, ns, name, uid, resume: f"output prefix {uri} belongs to job x/y"
    reconciler.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "OutputInUse"
    assert "belongs to job x/y" in status["message"]
    assert not any(k.startswith(PODS + "/") for k in api.objects)


# --- fed by the watches (the operator under kopf) ------------------------------------------


def _watched(**spec: Any) -> tuple[FakeApi, Reconciler]:
    """A reconciler whose job, pods and nodes come from watch events, as under kopf."""
    api, r = _world(**spec)
    r.watch()
    r.observe_object(None, copy.deepcopy(api.objects[JOB]))
    r.nodes.observe(None, copy.deepcopy(api.objects["/api/v1/nodes/spot-1"]))
    return api, r


def test_a_watched_job_at_rest_costs_the_api_server_nothing() -> None:
    api, r = _watched(shards=2)
    r.reconcile("ns", "qa-lora")  # primes the namespace's pods (one LIST), creates the pods
    assert len(api.list(PODS)) == 3
    for path, obj in api.objects.items():  # the pod watch reports what was created
        if path.startswith(PODS):
            r.observe_pod("ADDED", obj)
    r.reconcile("ns", "qa-lora")  # the status notes the pods (one more write), then rest
    api.gets.clear()
    api.lists.clear()
    api.calls.clear()
    for _ in range(5):
        r.reconcile("ns", "qa-lora")
    assert (api.gets, api.lists, api.calls) == ([], [], [])


def test_a_watched_job_sees_its_own_writes_before_the_watch_reports_them() -> None:
    # The status patch and the created pods go into the caches at once: with no watch event
    # arriving at all, the writes are exactly those of a reconciler that reads afresh.
    def writes(make: Any) -> list[list[tuple[str, str]]]:
        api, r = make(shards=2)
        out = []
        for _ in range(4):
            api.calls.clear()
            r.reconcile("ns", "qa-lora")
            out.append(list(api.calls))
        return out

    assert writes(_watched) == writes(_world)
    assert writes(_watched)[2:] == [[], []]


def test_a_pod_deleted_by_the_cluster_is_replaced_from_the_watch_event() -> None:
    api, r = _watched(shards=1)
    r.reconcile("ns", "qa-lora")
    for name in ("qa-lora-shard-0-0", "qa-lora-anchor-0"):
        pod = api.objects[f"{PODS}/{name}"]
        pod["spec"]["nodeName"] = "spot-1"
        pod["status"] = {"phase": "Running"}
        api.version += 1
        pod["metadata"]["resourceVersion"] = str(api.version)
        r.observe_pod("MODIFIED", pod)
    r.reconcile("ns", "qa-lora")
    gone = api.objects.pop(f"{PODS}/qa-lora-shard-0-0")
    api.version += 1
    gone["metadata"]["resourceVersion"] = str(api.version)
    r.observe_pod("DELETED", gone)
    r.reconcile("ns", "qa-lora")
    assert f"{PODS}/qa-lora-shard-0-1" in api.objects


def test_a_stale_cached_job_loses_its_status_write_and_does_nothing_else() -> None:
    # Someone else wrote the job since the watch reported it: the precondition refuses the
    # write, and no pod is created from the old picture.
    api, r = _watched(shards=2)
    api.objects[JOB]["metadata"]["resourceVersion"] = "99"
    r.reconcile("ns", "qa-lora")
    assert [c[0] for c in api.calls] == ["patch"]
    assert api.list(PODS) == []


# --- inference pools ------------------------------------------------------------------------

POOL = "/apis/cheapspot.dev/v1alpha1/namespaces/ns/cheapinferencepools/qa"


def _pool_world(**spec: Any) -> tuple[FakeApi, PoolReconciler]:
    api = FakeApi()
    api.objects[POOL] = {
        "metadata": {
            "name": "qa",
            "namespace": "ns",
            "uid": "pool-uid",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": pool_dict(**spec),
    }
    for name, capacity in (("spot-1", "spot"), ("od-1", "on-demand")):
        api.objects[f"/api/v1/nodes/{name}"] = {
            "metadata": {"name": name, "labels": {"cheapspot.dev/capacity-type": capacity}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
    reconciler = PoolReconciler(api, OperatorConfig(), clock=FakeClock(EPOCH))  # type: ignore[arg-type]
    return api, reconciler


def _watched_pool(**spec: Any) -> tuple[FakeApi, PoolReconciler]:
    """A pool reconciler fed by watch events, as under kopf."""
    api, r = _pool_world(**spec)
    r.watch()
    r.observe_object(None, copy.deepcopy(api.objects[POOL]))
    for name in ("spot-1", "od-1"):
        r.nodes.observe(None, copy.deepcopy(api.objects[f"/api/v1/nodes/{name}"]))
    return api, r


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_refused_replica_creation_reaches_the_pool_status_and_is_no_error() -> None:
    api, r = _pool_world(replicas=2)
    api.refuse["qa-replica-1-0"] = ApiError(
        403,
        '{"kind":"Status","message":"pods \\"qa-replica-1-0\\" is forbidden: '
        'exceeded quota: gpu-quota"}',
    )
    errors = _sample("cheapspot_reconcile_errors_total")
    r.reconcile("ns", "qa")
    assert f"{PODS}/qa-replica-0-0" in api.objects  # the rest went ahead
    r.reconcile("ns", "qa")
    r.reconcile("ns", "qa")
    assert _sample("cheapspot_reconcile_errors_total") == errors
    (degraded,) = [c for c in api.objects[POOL]["status"]["conditions"] if c["type"] == "Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "CreateRefused")
    assert "replica 1" in degraded["message"] and "exceeded quota: gpu-quota" in degraded["message"]
    (event,) = [e for e in api.events if e["reason"] == "PodNotStarting"]  # once, not per pass
    assert event["type"] == "Warning" and "exceeded quota: gpu-quota" in event["message"]
    assert event["involvedObject"]["kind"] == "CheapInferencePool"
    del api.refuse["qa-replica-1-0"]
    r.reconcile("ns", "qa")
    assert f"{PODS}/qa-replica-1-0" in api.objects
    r.reconcile("ns", "qa")
    (degraded,) = [c for c in api.objects[POOL]["status"]["conditions"] if c["type"] == "Degraded"]
    assert degraded["reason"] != "CreateRefused"


def test_a_replica_create_failing_on_the_server_is_still_an_error() -> None:
    api, r = _pool_world(replicas=2)
    api.refuse["qa-replica-1-0"] = ApiError(503, "unavailable")
    errors = _sample("cheapspot_reconcile_errors_total")
    try:
        r.reconcile("ns", "qa")
    except ApiError as exc:
        assert exc.status == 503
    else:
        raise AssertionError("a 503 on create was swallowed")
    assert _sample("cheapspot_reconcile_errors_total") == errors + 1


def test_a_watched_pool_reads_its_pods_from_the_pod_watch() -> None:
    api, r = _watched_pool(replicas=2)
    r.reconcile("ns", "qa")  # primes the namespace's pods (one LIST), creates the replicas
    for path, obj in list(api.objects.items()):  # the pod watch reports what was created
        if path.startswith(PODS + "/"):
            r.observe_pod("ADDED", obj)
    r.reconcile("ns", "qa")
    api.gets.clear()
    api.lists.clear()
    for _ in range(3):
        r.reconcile("ns", "qa")
    assert PODS not in api.lists
    assert POOL not in api.gets


def test_a_replica_deleted_by_the_cluster_is_replaced_from_the_watch_event() -> None:
    api, r = _watched_pool(replicas=2)
    r.reconcile("ns", "qa")
    for name in ("qa-replica-0-0", "qa-replica-1-0"):
        pod = api.objects[f"{PODS}/{name}"]
        pod["spec"]["nodeName"] = "od-1" if name.startswith("qa-replica-0") else "spot-1"
        pod["status"] = {"phase": "Running"}
        api.version += 1
        pod["metadata"]["resourceVersion"] = str(api.version)
        r.observe_pod("MODIFIED", pod)
    r.reconcile("ns", "qa")
    gone = api.objects.pop(f"{PODS}/qa-replica-1-0")
    api.version += 1
    gone["metadata"]["resourceVersion"] = str(api.version)
    r.observe_pod("DELETED", gone)
    api.lists.clear()
    r.reconcile("ns", "qa")
    assert f"{PODS}/qa-replica-1-1" in api.objects
    assert PODS not in api.lists


def test_planning_is_timed_on_every_pass_and_writing_only_when_a_pass_writes() -> None:
    _api, r = _world(shards=2)
    stage = "cheapspot_reconcile_stage_seconds_count"
    for _ in range(4):
        planning, writing = _sample(stage, stage="planning"), _sample(stage, stage="writing")
        actions = r.reconcile("ns", "qa-lora")
        assert _sample(stage, stage="planning") == planning + 1
        assert _sample(stage, stage="writing") == writing + (1 if actions else 0)
    assert not actions  # the last passes had nothing to write


# -- who may use a pool ----------------------------------------------------------------------

SECRETS = "/api/v1/namespaces/ns/secrets"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"


def test_a_pool_gets_its_admin_token_and_network_policy_before_its_replicas() -> None:
    api, r = _pool_world(replicas=2)
    serving = OperatorConfig.model_validate({"serving": {"operatorNamespace": "cheapspot"}})
    r.guard = PoolGuard(api, serving.serving)  # type: ignore[arg-type]
    r.reconcile("ns", "qa")
    key = api.objects["/api/v1/namespaces/cheapspot/secrets/cheapspot-admin-key"]
    assert len(key["stringData"]["key"]) >= 32
    secret = api.objects[f"{SECRETS}/qa-admin"]
    token = secret["stringData"]["token"]
    assert len(token) == 64 and secret["metadata"]["ownerReferences"][0]["uid"] == "pool-uid"
    policy = api.objects[f"{POLICIES}/qa-replicas"]
    assert policy["spec"]["ingress"][0]["from"][1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "cheapspot"
    }
    names = [name for verb, name in api.calls if verb == "create"]
    assert names.index("qa-admin") < names.index("qa-replica-0-0")
    assert names.index("qa-replicas") < names.index("qa-replica-0-0")
    # the pool's pods never read a Secret back: a restarted operator derives the same token
    pool = api.objects[POOL]
    info = PoolInfo("ns", "qa", "pool-uid", parse_pool_spec(pool["spec"]))
    assert AdminTokens(api, "cheapspot").ensure(info) == token  # type: ignore[arg-type]
    assert not [p for p in api.gets if p.startswith(SECRETS)]


def test_a_pool_naming_another_namespaces_adapter_is_refused_naming_the_field() -> None:
    other = [{"name": "qa", "uri": "s3://ckpt/other-team/qa/final/"}]
    api, r = _pool_world(replicas=2, adapters=other)
    r.config = OperatorConfig.model_validate(
        {"allowedUriPrefixes": {"*": ["s3://models/", "s3://ckpt/{namespace}/"]}}
    )
    r.reconcile("ns", "qa")
    conditions = {c["type"]: c for c in api.objects[POOL]["status"]["conditions"]}
    degraded = conditions["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "URINotAllowed")
    assert degraded["message"].startswith("spec.adapters[qa].uri s3://ckpt/other-team/qa/final/")
    assert "s3://models/, s3://ckpt/ns/" in degraded["message"]
    assert conditions["Ready"]["status"] == "False"
    assert not [p for p in api.objects if p.startswith(PODS + "/")]
    assert not [p for p in api.objects if p.startswith(SECRETS + "/")]
    (event,) = [e for e in api.events if e["reason"] == "URINotAllowed"]
    assert "allowedUriPrefixes" in event["message"]


def test_a_job_naming_a_uri_outside_its_namespaces_prefixes_fails_naming_the_field() -> None:
    api, r = _world(shards=2)
    r.config = OperatorConfig.model_validate({"allowedUriPrefixes": {"other": ["s3://"]}})
    r.reconcile("ns", "qa-lora")
    status = api.objects[JOB]["status"]
    assert status["phase"] == "Failed" and status["reason"] == "URINotAllowed"
    assert "spec.model.uri" in status["message"] and "spec.dataset.uri" in status["message"]
    assert "namespace ns may use no storage URI" in status["message"]
    assert api.list(PODS) == []
