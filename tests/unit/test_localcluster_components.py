"""Component command lines, kwok modes, ports, and the process layer on a dummy program."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml

from cheapspot_localcluster import components, processes
from cheapspot_localcluster.components import Command, Layout, PodLifecycle, Ports


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_controller_manager_notices_a_lost_node_in_seconds_and_runs_all_controllers(
    tmp_path: Path,
) -> None:
    cmd = components.controller_manager_command(tmp_path, Layout(tmp_path), Ports())
    flags = _flags(cmd.argv)
    assert flags["controllers"] == "*"
    assert flags["node-monitor-period"] == "1s"
    grace = int(flags["node-monitor-grace-period"].rstrip("s"))
    assert components.NODE_LEASE_SECONDS <= grace <= 15


def test_kubelet_timing_gives_kwok_a_kubelets_lease_and_the_controller_its_grace(
    tmp_path: Path,
) -> None:
    timing = components.KUBELET_TIMING
    commands = {
        c.name: _flags(c.argv)
        for c in components.control_plane(tmp_path, Layout(tmp_path), Ports(), timing)
    }
    assert commands["kwok"]["node-lease-duration-seconds"] == "40"
    assert commands["kube-controller-manager"]["node-monitor-grace-period"] == "50s"
    tests = {
        c.name: _flags(c.argv)
        for c in components.control_plane(tmp_path, Layout(tmp_path), Ports())
    }
    assert tests["kwok"]["node-lease-duration-seconds"] == str(components.NODE_LEASE_SECONDS)


def test_a_clusters_node_timing_is_saved_with_it() -> None:
    from cheapspot_localcluster.cluster import ClusterSpec

    spec = ClusterSpec("c", Ports(), None, PodLifecycle.KWOK, False, "b", 40, 50)
    assert ClusterSpec.from_json(spec.to_json()).node_timing == components.KUBELET_TIMING
    older = json.loads(spec.to_json())  # a cluster.json written before the timing was saved
    del older["node_lease_seconds"], older["node_grace_seconds"]
    assert ClusterSpec.from_json(json.dumps(older)).node_timing == components.TEST_TIMING


def test_every_component_listens_on_loopback_only(tmp_path: Path) -> None:
    for cmd in components.control_plane(tmp_path, Layout(tmp_path), Ports()):
        assert cmd.ready_url.startswith(("http://127.0.0.1:", "https://127.0.0.1:")), cmd.name
        for arg in cmd.argv:
            assert "0.0.0.0" not in arg, (cmd.name, arg)


def test_kwok_pod_stages_switch_with_the_pod_lifecycle_mode() -> None:
    def stage_names(mode: PodLifecycle) -> set[str]:
        docs = yaml.safe_load_all(components.kwok_config(mode))
        return {d["metadata"]["name"] for d in docs if d}

    nodes = {"cheapspot-node-ready", "cheapspot-node-heartbeat"}
    assert stage_names(PodLifecycle.KWOK) == nodes | {
        "cheapspot-pod-running",
        "cheapspot-pod-remove",
    }
    assert stage_names(PodLifecycle.EXTERNAL) == nodes


def test_free_ports_are_distinct() -> None:
    ports = Ports.free().named()
    assert len(set(ports.values())) == len(ports)


def test_a_busy_port_is_an_immediate_error_naming_the_component() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(processes.PortInUseError, match=rf"{port} \(apiserver\)"):
            processes.check_ports_free({"apiserver": port})


def test_kubeconfig_embeds_credentials() -> None:
    config = components.kubeconfig(
        "c", Ports(apiserver=1234), {"ca": b"A", "cert": b"B", "key": b"C"}
    )
    assert config["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:1234"
    assert config["users"][0]["user"]["client-key-data"] == "Qw=="


def _sleeper(name: str, code: str = "import time; time.sleep(60)") -> Command:
    return Command(
        name=name, argv=[sys.executable, "-c", code], env={}, ready_url="http://127.0.0.1:1/"
    )


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    procs = {n: processes.start(_sleeper(n), layout) for n in ("a", "b")}
    assert set(processes.running_pids(layout)) == {"a", "b"}
    processes.stop(layout, ["b", "a"], procs, grace_s=5)
    assert processes.running_pids(layout) == {}
    assert all(p.poll() is not None for p in procs.values())
    assert not list(layout.pids.glob("*.pid"))


def test_a_component_that_exits_is_named_with_its_log_tail(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    cmd = _sleeper("etcd", "import sys; print('bind: address already in use'); sys.exit(3)")
    proc = processes.start(cmd, layout)
    with pytest.raises(processes.ComponentFailedError) as info:
        processes.wait_ready(cmd, proc, layout, None, timeout_s=10)
    assert "etcd exited with code 3" in str(info.value)
    assert "bind: address already in use" in str(info.value)


def test_cluster_start_on_a_busy_port_fails_before_building_or_starting(tmp_path: Path) -> None:
    from dataclasses import replace

    from cheapspot_localcluster.cluster import LocalCluster

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = replace(Ports.free(), apiserver=busy.getsockname()[1])
        cluster = LocalCluster("busy", state_dir=tmp_path, ports=ports, with_s3=False)
        with pytest.raises(processes.PortInUseError, match="apiserver"):
            cluster.start()
    assert cluster.running() == {}
