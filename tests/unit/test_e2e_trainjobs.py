"""The e2e suite's and the demo's own logic: the example rewritten, reclaims measured from logs."""

from __future__ import annotations

import json

from cheapspot_localcluster.stack import S3_SECRET, operator_config
from cheapspot_localcluster.trainjobs import (
    SMALL,
    job_from_example,
    load_example,
    resumes_from_logs,
)


def test_the_quickstart_example_is_applied_with_only_locations_and_sizes_changed() -> None:
    example = load_example()
    job = job_from_example(
        "e2e",
        model_uri="s3://b/models/tiny/",
        dataset_uri="s3://b/data/train.jsonl",
        output_uri="s3://b/out/e2e/",
        overrides=SMALL,
    )
    spec, original = job["spec"], example["spec"]
    assert (job["apiVersion"], job["kind"]) == (example["apiVersion"], example["kind"])
    assert job["metadata"] == {"name": "e2e"}
    assert spec["model"] == {**original["model"], "uri": "s3://b/models/tiny/"}
    assert spec["dataset"]["uri"] == "s3://b/data/train.jsonl"
    assert spec["output"]["uri"] == "s3://b/out/e2e/"
    assert spec["training"]["steps"] == SMALL["training"]["steps"]
    # Whatever the shrinking does not name stays as the user's example has it.
    assert spec["lora"]["targetModules"] == original["lora"]["targetModules"]
    assert spec["rounds"]["outerLearningRate"] == original["rounds"]["outerLearningRate"]
    assert spec["resources"]["instanceTypes"] == original["resources"]["instanceTypes"]
    assert example["spec"]["model"]["uri"] != spec["model"]["uri"], "the example was mutated"


def _log(*events: dict[str, object]) -> str:
    return "\n".join(["not json: a warning"] + [json.dumps(e) for e in events])


def _step(step: int, ts: str = "2026-01-01T00:00:10+00:00") -> dict[str, object]:
    return {"event": "step", "step": step, "ts": ts}


def test_steps_lost_and_resume_time_come_from_the_workers_logs() -> None:
    logs = {
        (0, 0): _log(_step(1), _step(2), _step(3), _step(4), _step(5)),
        # Resumed from the checkpoint at step 4: step 5 is trained again.
        (0, 1): _log(
            {"event": "resumed", "step": 4}, _step(5, "2026-01-01T00:00:30+00:00"), _step(6)
        ),
        (1, 0): _log(_step(1), _step(2)),
        # SIGTERM checkpoint at step 2: nothing redone.
        (1, 1): _log(_step(3, "2026-01-01T00:00:20+00:00")),
        # Started after its shard's work was done: never trained, not a resume to measure.
        (1, 2): _log({"event": "shard_done"}),
    }
    resumes = resumes_from_logs(logs)
    assert [(r.shard, r.attempt, r.steps_lost) for r in resumes] == [(0, 1, 1), (1, 1, 0)]
    assert resumes[0].first_step_at - resumes[1].first_step_at == 10.0


def test_workers_get_the_store_endpoint_and_keys_only_through_a_secret() -> None:
    config = operator_config("ns", "http://10.0.0.1:9000", "us-east-1")
    worker = config["worker"]
    assert worker["command"] == ["cheapspot", "worker"]
    assert worker["envFromSecret"] == S3_SECRET
    assert worker["env"]["AWS_ENDPOINT_URL"] == "http://10.0.0.1:9000"
    assert not any("SECRET" in key or "KEY" in key for key in worker["env"])
    assert config["namespaces"] == ["ns"]


def test_the_demo_says_which_replicas_it_waits_for_and_how_serving_goes_meanwhile() -> None:
    from types import SimpleNamespace

    from cheapspot_localcluster.demo import replacement_line

    ready = {"type": "Ready", "status": "True"}
    pods = [
        {
            "metadata": {"name": "qa-serve-od-0"},
            "status": {"phase": "Running", "conditions": [ready]},
        },
        {"metadata": {"name": "qa-serve-spot-3"}, "status": {"phase": "Running"}},
        {"metadata": {"name": "qa-serve-spot-4"}},
    ]
    ok = SimpleNamespace(ok=True, tokens=16)
    load = SimpleNamespace(outcomes=[ok, ok, ok], failed=[], truncated=[ok])
    line = replacement_line(pods, load, since=0.0)
    assert "qa-serve-spot-3 Running, qa-serve-spot-4 Pending" in line
    assert "qa-serve-od-0" not in line
    assert "3 requests served, 1 failed" in line
