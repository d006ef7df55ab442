"""CheapTrainJobs seen from outside, as a user sees them: the example YAML, apply, watch, fetch.

Shared by the e2e suite, ``cheapspot demo`` and the reclaim benchmark, so all three drive jobs
the way a user does: the quickstart example from ``crds/examples`` (only its locations
rewritten and its steps shrunk), status read from the API, the adapter fetched from object
storage and loaded with stock PEFT.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cheapspot.contract import Layout, Progress, Role
from cheapspot.store import Store
from cheapspot_localcluster.waiting import wait_for

GROUP, VERSION, PLURAL = "cheapspot.dev", "v1alpha1", "cheaptrainjobs"
QUICKSTART = Path("crds/examples/quickstart.yaml")
DISTILLATION = Path("crds/examples/distillation.yaml")
CRD_FILE = Path("crds/cheaptrainjobs.yaml")
T = TypeVar("T")


def repo_root() -> Path:
    """The source tree this package runs from (``make demo`` and the tests run from a clone)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / QUICKSTART).is_file():
            return parent
    raise FileNotFoundError(
        f"{QUICKSTART} not found above {here}: run the demo and e2e tests from a clone"
    )


def load_example(path: Path | None = None) -> dict[str, Any]:
    """The quickstart CheapTrainJob, as a user would ``kubectl apply`` it."""
    doc: dict[str, Any] = yaml.safe_load((path or repo_root() / QUICKSTART).read_text())
    return doc


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# What a tiny job on 2 CPU cores needs instead of the example's production sizes: the same
# shape (shards, rounds, checkpoints, spot policy), a few dozen small steps.
SMALL: dict[str, Any] = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {
        "steps": 24,
        "batchSize": 4,
        "learningRate": 5.0e-3,
        "maxSeqLength": 48,
        "seed": 7,
    },
    "shards": 2,
    "rounds": {"localSteps": 8, "pollSeconds": 0.5},
    "checkpoint": {"everySteps": 2, "everySeconds": 0},
    # Half a core: on kind a node has the machine's 2 cores, and after spot is gone both
    # shards and the anchor must fit on one on-demand node.
    "resources": {"gpu": 1, "cpu": "500m", "memory": "2Gi"},
    "anchor": {"cpu": "500m", "memory": "1Gi"},
    "spot": {"fallbackAfterSeconds": 10, "maxPreemptionsPerHour": 60},
}


def job_from_example(
    name: str,
    *,
    model_uri: str,
    dataset_uri: str,
    output_uri: str,
    overrides: Mapping[str, Any] | None = None,
    example: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The example with its locations pointed at ours and ``overrides`` merged into its spec."""
    doc = copy.deepcopy(dict(example or load_example()))
    doc["metadata"] = {"name": name}
    doc["spec"]["model"]["uri"] = model_uri
    doc["spec"]["dataset"]["uri"] = dataset_uri
    doc["spec"]["output"]["uri"] = output_uri
    doc["spec"] = deep_merge(doc["spec"], overrides or {})
    return doc


@dataclass(frozen=True)
class Materials:
    """A tiny model and datasets built here and uploaded to the object store."""

    model_dir: Path
    model_uri: str
    dataset_uri: str
    malformed_dataset_uri: str


MALFORMED_LINE = 5


def publish_materials(bucket_uri: str, workdir: Path, arch: str = "qwen2") -> Materials:
    """Build a tiny random-weight ``arch`` model and a learnable dataset locally (nothing is
    downloaded) and upload them below ``bucket_uri``; also a dataset broken at one line."""
    from cheapspot_worker.tiny import build_model, learnable_records

    root = bucket_uri.rstrip("/") + "/"
    model_dir = build_model(workdir / f"tiny-{arch}", arch)  # type: ignore[arg-type]
    store = Store(root)
    store.publish(
        f"models/tiny-{arch}/", {p.name: p for p in sorted(model_dir.iterdir()) if p.is_file()}
    )
    lines = [json.dumps(r) for r in learnable_records(64)]
    store.put_bytes("data/train.jsonl", ("\n".join(lines) + "\n").encode())
    broken = list(lines)
    broken[MALFORMED_LINE - 1] = '{"text": "an unfinished record'
    store.put_bytes("data/malformed.jsonl", ("\n".join(broken) + "\n").encode())
    return Materials(
        model_dir=model_dir,
        model_uri=f"{root}models/tiny-{arch}/",
        dataset_uri=f"{root}data/train.jsonl",
        malformed_dataset_uri=f"{root}data/malformed.jsonl",
    )


def publish_teacher(bucket_uri: str, workdir: Path, arch: str = "qwen2") -> str:
    """Build a tiny trained teacher for :func:`publish_materials`' model (same family and
    tokenizer, larger) and upload it; returns its URI."""
    from cheapspot_worker.tiny import build_teacher

    root = bucket_uri.rstrip("/") + "/"
    teacher_dir = build_teacher(workdir / f"tiny-{arch}-teacher", arch)  # type: ignore[arg-type]
    Store(root).publish(
        f"models/tiny-{arch}-teacher/",
        {p.name: p for p in sorted(teacher_dir.iterdir()) if p.is_file()},
    )
    return f"{root}models/tiny-{arch}-teacher/"


class TrainJobs:
    """CheapTrainJobs of one namespace through the official client."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.core: Any = client.CoreV1Api(api_client)
        self._serialize = api_client.sanitize_for_serialization

    def apply(self, body: Mapping[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, dict(body)
        )
        return created

    def get(self, name: str) -> dict[str, Any]:
        got: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return got

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": dict(spec)}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def pods(self, name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{GROUP}/job={name}")
        return [self._serialize(p) for p in pods.items]

    def live_pods(self, name: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods(name)
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [
            e
            for e in (self._serialize(i) for i in items)
            if (e.get("involvedObject") or {}).get("name") == name
        ]

    def wait_finished(
        self, name: str, timeout_s: float = 300, on_poll: Callable[[dict[str, Any]], None] = print
    ) -> dict[str, Any]:
        """The job's status once it is Succeeded or Failed."""

        def done() -> dict[str, Any] | None:
            status = self.status(name)
            on_poll(status)
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        return wait_for(f"job {name} to finish", done, timeout_s, poll_s=1.0)


def shard_slots(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The status's per-shard entries (index 0..N-1)."""
    return list(status.get("shards") or [])


def read_progress(output_uri: str, shards: int) -> dict[int, Progress]:
    """Each shard's progress record as the worker published it (the anchor under -1)."""
    store, layout = Store(output_uri), Layout(output_uri)
    out: dict[int, Progress] = {}
    for index in [-1, *range(shards)]:
        role = Role.ANCHOR if index < 0 else Role.TRAIN
        doc = store.get_json(layout.progress(role, max(index, 0)))
        if doc is not None:
            out[index] = Progress.model_validate(doc)
    return out


def fetch_final(output_uri: str, dest: Path) -> Path:
    """Download the job's final adapter (verified against its manifest) into ``dest``."""
    Store(output_uri).fetch(Layout(output_uri).final, dest)
    return dest


def load_in_peft(model_dir: Path, adapter_dir: Path) -> int:
    """Load the adapter with stock PEFT onto the base model and run it once; the number of
    LoRA parameters loaded (a user's check that the adapter is real)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    if not torch.isfinite(out.logits).all():
        raise ValueError(f"adapter {adapter_dir} gives non-finite logits")
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@dataclass(frozen=True)
class Resume:
    """One replacement of a shard's pod, read from the workers' own logs."""

    shard: int
    attempt: int
    last_step_before: int
    """The highest step the shard had logged before this pod started."""
    first_step: int
    """The first step this pod logged (it redid every step from here)."""
    first_step_at: float
    """When it logged it (Unix time)."""

    @property
    def steps_lost(self) -> int:
        return max(0, self.last_step_before - (self.first_step - 1))


def worker_events(log: str) -> list[dict[str, Any]]:
    """The JSON lines of a worker's log."""
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def resumes_from_logs(logs: Mapping[tuple[int, int], str]) -> list[Resume]:
    """Every pod after a shard's first, from ``{(shard, attempt): log}``: where it started
    training again and what it redid. A pod that never trained (it started after its round
    was done) is skipped."""
    from datetime import datetime

    out: list[Resume] = []
    best: dict[int, int] = {}
    for shard, attempt in sorted(logs):
        steps = [e for e in worker_events(logs[shard, attempt]) if e.get("event") == "step"]
        if attempt > 0 and steps:
            first = steps[0]
            out.append(
                Resume(
                    shard=shard,
                    attempt=attempt,
                    last_step_before=best.get(shard, 0),
                    first_step=int(first["step"]),
                    first_step_at=datetime.fromisoformat(first["ts"]).timestamp(),
                )
            )
        if steps:
            best[shard] = max([best.get(shard, 0), *(int(e["step"]) for e in steps)])
    return out
