"""The kind tier's decisions: host quirks, kind's configuration, the runc wrapper, versions."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cheapspot_localcluster import dockerengine, kind, kindnode, versions
from cheapspot_localcluster.dockerengine import HostQuirks
from cheapspot_localcluster.profiles import PROFILES

PLAIN = HostQuirks(no_sys_resource=False, cgroup_v1=False, restricted_oom_score_adj=False)
RESTRICTED = HostQuirks(no_sys_resource=True, cgroup_v1=True, restricted_oom_score_adj=True)


def test_bounding_set_without_cap_sys_resource_is_detected(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapBnd:\t000001fffeffffff\n")
    assert dockerengine.bounding_set(status.read_text()) == 0x1FFFEFFFFFF
    assert not dockerengine.bounding_set(status.read_text()) & (1 << 24)
    status.write_text("CapBnd:\t000001ffffffffff\n")
    assert dockerengine.bounding_set(status.read_text()) & (1 << 24)


def test_a_plain_docker_host_gets_a_plain_kind_config() -> None:
    config = kind.kind_config(PLAIN)
    assert config["kubeadmConfigPatches"] == []
    assert "containerdConfigPatches" not in config
    assert config["networking"] == {"disableDefaultCNI": True}


def test_quirks_become_kubelet_and_containerd_patches() -> None:
    config = kind.kind_config(RESTRICTED)
    patches = [yaml.safe_load(p) for p in config["kubeadmConfigPatches"]]
    assert {"kind": "KubeletConfiguration", "failCgroupV1": False}.items() <= patches[0].items()
    assert "restrict_oom_score_adj = true" in config["containerdConfigPatches"][0]


def test_workers_carry_the_profile_labels() -> None:
    config = kind.kind_config(PLAIN, PROFILES["eks-karpenter"])
    roles = [n["role"] for n in config["nodes"]]
    assert roles == ["control-plane"] + ["worker"] * len(kind.WORKERS)
    values = sorted(n["labels"]["karpenter.sh/capacity-type"] for n in config["nodes"][1:])
    assert values == ["on-demand", "spot", "spot"]
    assert {n["labels"]["topology.kubernetes.io/zone"] for n in config["nodes"][1:]} == {
        "zone-a",
        "zone-b",
    }


def test_the_kind_tier_runs_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHEAPSPOT_KIND", raising=False)
    assert "make e2e-kind" in kind.not_requested()
    monkeypatch.setenv("CHEAPSPOT_KIND", "1")
    assert kind.not_requested() == ""


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_runc_wrapper_drops_cap_sys_resource_from_create_and_exec(tmp_path: Path) -> None:
    caps = ["CAP_CHOWN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps({"process": {"capabilities": {"bounding": caps, "effective": caps}}})
    )
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"capabilities": {"bounding": caps}}))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "runc").write_text('#!/bin/sh\necho "runc $*"\n')
    (fake_bin / "runc").chmod(0o755)
    (fake_bin / "jq").symlink_to(shutil.which("jq") or "jq")
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(dockerengine.RUNC_WRAPPER)
    wrapper.chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    out = subprocess.run(
        [str(wrapper), "--root", "/r", "create", "--bundle", str(bundle), "c1"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == f"runc --root /r create --bundle {bundle} c1"
    spec = json.loads((bundle / "config.json").read_text())
    assert spec["process"]["capabilities"]["bounding"] == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    assert spec["process"]["capabilities"]["effective"] == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    subprocess.run(
        [str(wrapper), "exec", f"--process={process}", "c1"], env=env, check=True, text=True
    )
    assert json.loads(process.read_text())["capabilities"]["bounding"] == [
        "CAP_CHOWN",
        "CAP_NET_ADMIN",
    ]


def test_debian_mirror_is_read_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
    )
    assert kindnode.debian_mirror(tmp_path) == "http://mirror.example/debian"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert kindnode.debian_mirror(empty) == "http://deb.debian.org/debian"


def test_pause_version_comes_from_the_kubernetes_makefile(tmp_path: Path) -> None:
    makefile = tmp_path / "build" / "pause" / "Makefile"
    makefile.parent.mkdir(parents=True)
    makefile.write_text("REV = x\nTAG ?= 3.10.2\n")
    assert kindnode.pause_version(tmp_path) == "3.10.2"


def test_a_kubeadm_image_of_another_version_is_refused() -> None:
    kindnode._check_version("registry.k8s.io/etcd:3.6.8-0", versions.ETCD_VERSION)
    with pytest.raises(kindnode.NodeImageError, match=r"etcd:3\.5\.0-0"):
        kindnode._check_version("registry.k8s.io/etcd:3.5.0-0", versions.ETCD_VERSION)


def test_base_image_dockerfile_uses_debians_parts_and_kinds_entrypoint() -> None:
    dockerfile = kindnode.base_image_dockerfile("cheapspot/debian:x", "3.10.2")
    assert dockerfile.startswith("FROM cheapspot/debian:x\n")
    for package in ("systemd", "containerd", "runc", "containernetworking-plugins"):
        assert package in dockerfile
    assert 'sandbox_image = "registry.k8s.io/pause:3.10.2"' in dockerfile
    assert 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' in dockerfile


def test_helm_is_built_with_the_stamps_of_its_release_build() -> None:
    argv = kindnode.HELM.install_argv("go")
    assert argv[:3] == ["go", "install", "-trimpath"]
    assert argv[-1] == f"helm.sh/helm/v3/cmd/helm@{versions.HELM_VERSION}"
    flags = argv[3].removeprefix("-ldflags=").split()
    assert flags[:2] == ["-s", "-w"]
    stamps = dict(v.split("=", 1) for v in flags[3::2])
    assert flags[2::2] == ["-X"] * len(stamps)
    # `helm version --short` prints the version and the commit's first seven characters.
    assert stamps["helm.sh/helm/v3/internal/version.version"] == versions.HELM_VERSION
    assert stamps["helm.sh/helm/v3/internal/version.gitCommit"] == versions.HELM_GIT_COMMIT
    assert stamps["helm.sh/helm/v3/internal/version.gitTreeState"] == "clean"
    # Kubernetes 1.34, from its client-go v0.34.x: what lint and template assume, not 1.20.
    for package in ("pkg/lint/rules", "pkg/chartutil"):
        assert stamps[f"helm.sh/helm/v3/{package}.k8sVersionMajor"] == "1"
        assert stamps[f"helm.sh/helm/v3/{package}.k8sVersionMinor"] == "34"


def test_a_stamped_helm_is_a_new_cache_entry_and_kind_keeps_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHEAPSPOT_CACHE", str(tmp_path))
    tools = tmp_path / "kind" / "tools"
    # Built before helm was stamped: an unstamped helm must not be found as this one.
    assert kindnode.tool_binary(kindnode.HELM).parent != tools / f"helm-{versions.HELM_VERSION}"
    assert kindnode.HELM.cache_name().startswith(f"helm-{versions.HELM_VERSION}-")
    other = kindnode.GoTool("helm", kindnode.HELM.package, versions.HELM_VERSION, (("x.y", "z"),))
    assert other.cache_name() != kindnode.HELM.cache_name()
    # kind and CoreDNS are built as before, so what is cached for them stays valid.
    assert kindnode.tool_binary(kindnode.KIND) == tools / f"kind-{versions.KIND_VERSION}" / "kind"
    assert kindnode.KIND.install_argv("go") == [
        "go", "install", "-trimpath", "-ldflags=-s -w", f"sigs.k8s.io/kind@{versions.KIND_VERSION}"
    ]  # fmt: skip
    assert kindnode.COREDNS.cache_name() == f"coredns-{versions.COREDNS_VERSION}"


def test_a_cached_tool_is_not_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHEAPSPOT_CACHE", str(tmp_path))
    binary = kindnode.tool_binary(kindnode.HELM)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)

    def no_go(*_args: object, **_kwargs: object) -> str:
        raise AssertionError("a cached tool must not run go")

    monkeypatch.setattr(kindnode, "_run", no_go)
    assert kindnode.helm_binary(lambda _m: None) == binary
