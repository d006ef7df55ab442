"""The pod runner's decisions: table-driven, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cheapspot_localcluster.podrunner import (
    IpPool,
    Op,
    PodView,
    Proc,
    back_off_seconds,
    back_off_status,
    decide,
    field_value,
    machine_is_on,
    secret_volume_dirs,
    terminated_status,
    termination_message,
    view,
    volume_dirs,
    with_volumes,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_pod(**overrides: Any) -> PodView:
    base: dict[str, Any] = {
        "uid": "u1",
        "node": "spot-a-0",
        "phase": "Pending",
        "deleting": False,
        "grace_seconds": 30.0,
    }
    base.update(overrides)
    return PodView(**base)


def make_proc(**overrides: Any) -> Proc:
    proc = Proc("u1", "ns", "p", "spot-a-0", None, "127.0.0.2", Path("/nonexistent"), T0)
    for k, v in overrides.items():
        setattr(proc, k, v)
    return proc


@pytest.mark.parametrize(
    ("pod", "proc", "node_alive", "now", "expected"),
    [
        (make_pod(), None, True, 0.0, Op.START),
        (make_pod(), None, False, 0.0, None),  # never start on a dead node
        (make_pod(node=""), None, True, 0.0, None),  # not scheduled yet
        (make_pod(phase="Running"), None, True, 0.0, None),  # not ours to start
        (make_pod(deleting=True), None, True, 0.0, Op.REMOVE),
        (make_pod(deleting=True), None, False, 0.0, None),  # machine gone: nobody acts
        (make_pod(phase="Running"), make_proc(), True, 0.0, None),
        (make_pod(phase="Running", deleting=True), make_proc(), True, 0.0, Op.TERMINATE),
        (make_pod(phase="Running", deleting=True), make_proc(term_sent_at=0.0), True, 10.0, None),
        (
            make_pod(phase="Running", deleting=True),
            make_proc(term_sent_at=0.0),
            True,
            30.0,
            Op.KILL,
        ),
        (make_pod(phase="Running"), make_proc(), False, 0.0, Op.NODE_LOST),
        (make_pod(phase="Running"), make_proc(node_lost=True, exit_code=137), False, 0.0, None),
        (None, make_proc(node_lost=True, exit_code=137), False, 0.0, Op.FORGET),
        (make_pod(phase="Running"), make_proc(exit_code=0), True, 0.0, Op.REPORT_EXIT),
        (make_pod(phase="Succeeded"), make_proc(exit_code=0, exit_reported=True), True, 0.0, None),
        (
            make_pod(phase="Running", deleting=True),
            make_proc(exit_code=143, exit_reported=True),
            True,
            0.0,
            Op.REMOVE,
        ),
        (None, make_proc(), True, 0.0, Op.KILL),
        (None, make_proc(exit_code=0), True, 0.0, Op.FORGET),
        (None, None, True, 0.0, None),
    ],
)
def test_decide(
    pod: PodView | None, proc: Proc | None, node_alive: bool, now: float, expected: Op | None
) -> None:
    assert decide(pod, proc, node_alive, now) is expected


def test_a_restart_always_container_is_started_again_in_place_after_a_back_off() -> None:
    always = make_pod(phase="Running", restart_always=True)
    # Ended: reported waiting, its restart planned; not before the back-off is over.
    assert decide(always, make_proc(exit_code=137), True, 0.0) is Op.BACK_OFF
    assert decide(always, make_proc(exit_code=137, restart_at=10.0), True, 5.0) is None
    assert decide(always, make_proc(exit_code=137, restart_at=10.0), True, 10.0) is Op.RESTART
    # Deleted meanwhile, or its machine gone: no restart.
    leaving = make_pod(phase="Running", restart_always=True, deleting=True)
    assert decide(leaving, make_proc(exit_code=137, restart_at=10.0), True, 20.0) is Op.REPORT_EXIT
    assert decide(always, make_proc(exit_code=137), False, 0.0) is Op.NODE_LOST
    # restartPolicy Never: the exit is the pod's end.
    assert decide(make_pod(phase="Running"), make_proc(exit_code=1), True, 0.0) is Op.REPORT_EXIT
    # kubelet's back-off after n ends in a row: at once, then 10 s doubling up to 5 minutes.
    assert [back_off_seconds(n) for n in range(8)] == [0, 10, 20, 40, 80, 160, 300, 300]


def test_a_container_waiting_to_restart_is_reported_running_not_ready_with_its_last_exit() -> None:
    pod = {
        "metadata": {"uid": "u1", "name": "router-x"},
        "spec": {"containers": [{"name": "router", "image": "img"}]},
    }
    ended = {"exitCode": 137, "reason": "Error"}
    at_once = back_off_status(pod, "127.0.0.9", ended, restarts=0, delay=0)
    assert at_once["containerStatuses"][0]["state"] == {"terminated": ended}
    status = back_off_status(pod, "127.0.0.9", ended, restarts=2, delay=40)
    assert status["phase"] == "Running" and status["podIP"] == "127.0.0.9"
    assert "startTime" not in status  # the pod's start stays what it was
    (cs,) = status["containerStatuses"]
    assert (cs["ready"], cs["restartCount"]) == (False, 2)
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["lastState"] == {"terminated": ended}
    ready = {c["type"]: c["status"] for c in status["conditions"]}["Ready"]
    assert ready == "False"


def test_a_ready_mark_cleared_by_the_node_controller_is_reported_again() -> None:
    # The node lifecycle controller marks every pod of a node whose lease lapsed not ready;
    # nothing flips the runner's own verdict, so only a comparison brings Ready back.
    marked = make_pod(phase="Running", ready=False)
    assert decide(marked, make_proc(ready=True), True, 0.0, node_ready=True) is Op.REPORT_READY
    # While the node is still NotReady, the controller's mark stands (a cut-off kubelet).
    assert decide(marked, make_proc(ready=True), True, 0.0, node_ready=False) is None
    # In step with the API: nothing to do, ready or not.
    assert decide(make_pod(phase="Running", ready=True), make_proc(ready=True), True, 0.0) is None
    assert decide(marked, make_proc(ready=False), True, 0.0) is None
    # The other way round too (a probe that fails while the API still says Ready).
    stale = make_pod(phase="Running", ready=True)
    assert decide(stale, make_proc(ready=False), True, 0.0) is Op.REPORT_READY
    # Not while terminating, not for a process that has ended.
    leaving = make_pod(phase="Running", ready=False, deleting=True)
    assert decide(leaving, make_proc(ready=True, term_sent_at=0.0), True, 1.0) is None
    assert decide(marked, make_proc(ready=True, exit_code=0), True, 0.0) is Op.REPORT_EXIT


def test_view_takes_the_deletion_grace_period_over_the_spec() -> None:
    pod = {
        "metadata": {
            "uid": "x",
            "deletionTimestamp": "2026-01-01T00:00:00Z",
            "deletionGracePeriodSeconds": 5,
        },
        "spec": {"nodeName": "n", "terminationGracePeriodSeconds": 120, "restartPolicy": "Never"},
        "status": {"phase": "Running"},
    }
    assert view(pod) == PodView(
        uid="x", node="n", phase="Running", deleting=True, grace_seconds=5.0
    )
    # The API's default policy is Always (a Deployment's pods).
    del pod["spec"]["restartPolicy"]
    assert view(pod).restart_always


def test_terminated_status_reports_exit_code_and_phase() -> None:
    pod = {"metadata": {"uid": "x"}, "spec": {"containers": [{"name": "worker", "image": "w"}]}}
    failed = terminated_status(pod, 65, "bad dataset: line 3", T0, T0)
    term = failed["containerStatuses"][0]["state"]["terminated"]
    assert failed["phase"] == "Failed"
    assert (term["exitCode"], term["reason"], term["message"]) == (
        65,
        "Error",
        "bad dataset: line 3",
    )
    assert terminated_status(pod, 0, "", T0, T0)["phase"] == "Succeeded"


def test_termination_message_prefers_the_file_then_falls_back_to_logs(tmp_path: Path) -> None:
    msg, logf = tmp_path / "msg", tmp_path / "log"
    logf.write_text("x" * 5000 + "the last words")
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    assert termination_message(fallback, 1, msg, logf).endswith("the last words")
    assert len(termination_message(fallback, 1, msg, logf)) <= 2048
    assert termination_message(fallback, 0, msg, logf) == ""  # logs only on error
    assert termination_message({}, 1, msg, logf) == ""  # only with the fallback policy
    msg.write_text("dataset line 7 is not JSON")
    assert termination_message({}, 1, msg, logf) == "dataset line 7 is not JSON"


def test_field_refs() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"}},
        "spec": {"nodeName": "n"},
    }
    assert field_value(pod, "metadata.name", "1.2.3.4") == "p"
    assert field_value(pod, "status.podIP", "1.2.3.4") == "1.2.3.4"
    assert field_value(pod, "metadata.labels['a']", "") == "b"
    with pytest.raises(ValueError, match="unsupported fieldRef"):
        field_value(pod, "spec.bogus", "")


def test_ip_pool_reuses_addresses_and_never_gives_out_one_held() -> None:
    pool = IpPool()
    a, b = pool.take("pod-a"), pool.take("pod-b")
    assert a != b
    pool.give_back(a, "pod-a")  # pod-a exited
    assert pool.take("pod-c") == a
    # pod-a's object is removed later: it gives its IP back again, but pod-c holds it now.
    pool.give_back(a, "pod-a")
    assert pool.take("pod-d") not in (a, b)


def test_a_machine_is_on_while_kwok_acts_for_it_not_while_it_is_ready() -> None:
    on = {"metadata": {"labels": {"cheapspot.dev/kwok-managed": "true"}}}
    assert machine_is_on({**on, "status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    assert not machine_is_on({"metadata": {"labels": {}}})  # switched off by a reclaim
    deleting = {"metadata": {**on["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert not machine_is_on(deleting)


def test_empty_dirs_become_pod_directories_and_env_follows(tmp_path: Path) -> None:
    spec = {"volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {}}]}
    container = {
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cfg", "mountPath": "/etc/cfg"},
        ]
    }
    volumes = volume_dirs(spec, container, tmp_path)
    assert volumes == {"/tmp": tmp_path / "tmp"} and (tmp_path / "tmp").is_dir()
    env = with_volumes(
        {"HOME": "/tmp", "HF_HOME": "/tmp/hf", "X": "/tmpfoo", "Y": "/etc/cfg"}, volumes
    )
    assert env == {
        "HOME": str(tmp_path / "tmp"),
        "HF_HOME": str(tmp_path / "tmp") + "/hf",
        "X": "/tmpfoo",
        "Y": "/etc/cfg",
    }


def test_a_readiness_probe_follows_kubelets_thresholds() -> None:
    from cheapspot_localcluster.podrunner import Probe

    container = {
        "ports": [{"name": "admin", "containerPort": 8001}],
        "readinessProbe": {
            "httpGet": {"path": "/cheapspot/status", "port": "admin"},
            "initialDelaySeconds": 2,
            "periodSeconds": 1,
            "failureThreshold": 2,
            "successThreshold": 2,
        },
    }
    probe = Probe.of(container, started=100.0)
    assert probe is not None and (probe.port, probe.path) == (8001, "/cheapspot/status")
    assert not probe.due(101.0) and probe.due(102.0)
    assert probe.record(True, 102.0) is False  # one success of two needed
    assert probe.record(True, 103.0) is True
    assert probe.record(False, 104.0) is True  # one failure of two
    assert probe.record(False, 105.0) is False
    assert not probe.due(105.5) and probe.due(106.0)
    assert Probe.of({"name": "no-probe"}, 0.0) is None


def test_the_serving_image_runs_from_its_own_environment(tmp_path: Path) -> None:
    from cheapspot_localcluster.podrunner import base_environment, image_environment

    assert image_environment("ghcr.io/cheapspot/cheapspot-worker:0.1.0") is None
    venv = image_environment("ghcr.io/cheapspot/cheapspot-serve:0.1.0")
    assert venv is not None and venv.name == ".venv-serve"
    env = base_environment({"PATH": "/usr/bin"}, tmp_path)
    assert env["PATH"].split(":")[0] == str(tmp_path / "bin")
    assert env["VIRTUAL_ENV"] == str(tmp_path)


def test_command_references_expand_like_kubelets() -> None:
    from cheapspot_localcluster.podrunner import expand_references

    env = {"POD_IP": "127.0.0.7"}
    assert expand_references("--host=$(POD_IP)", env) == "--host=127.0.0.7"
    assert expand_references("$(MISSING)", env) == "$(MISSING)"
    assert expand_references("$$(POD_IP)", env) == "$(POD_IP)"


def test_a_pods_tmp_has_a_short_path_for_unix_sockets(tmp_path: Path) -> None:
    from cheapspot_localcluster.podrunner import short_tmp

    deep = tmp_path / ("x" * 60) / "volumes" / "tmp"
    deep.mkdir(parents=True)
    link = short_tmp("0123456789abcdef-uid", deep)
    try:
        assert len(str(link / "561e580e-8f67-488b-88e5-8544ee850d7f")) < 100
        assert link.resolve() == deep.resolve()
    finally:
        link.unlink()


def test_a_secret_volume_becomes_the_secrets_keys_as_files_and_its_env_points_there(
    tmp_path: Path,
) -> None:
    spec = {
        "volumes": [
            {
                "name": "keys",
                "secret": {
                    "secretName": "qa-keys",
                    "items": [{"key": "clients.yaml", "path": "keys.yaml"}],
                },
            }
        ]
    }
    container = {"volumeMounts": [{"name": "keys", "mountPath": "/etc/cheapspot/api-keys"}]}
    read = {"qa-keys": {"clients.yaml": "keys: []\n", "other": "x"}}.__getitem__
    volumes = secret_volume_dirs(spec, container, tmp_path, read)
    assert volumes == {"/etc/cheapspot/api-keys": tmp_path / "keys"}
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["keys.yaml"]
    assert (tmp_path / "keys" / "keys.yaml").read_text() == "keys: []\n"
    env = with_volumes({"CHEAPSPOT_API_KEYS_FILE": "/etc/cheapspot/api-keys/keys.yaml"}, volumes)
    assert env["CHEAPSPOT_API_KEYS_FILE"] == str(tmp_path / "keys" / "keys.yaml")
