"""The generated wrapper module and the cache: pure decisions, no Go run."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cheapspot_localcluster import build, versions


def test_every_staging_module_is_replaced_by_its_published_tag() -> None:
    go_mod = build.render_go_mod()
    modules = build.staging_modules()
    assert {"k8s.io/api", "k8s.io/client-go", "k8s.io/apiserver", "k8s.io/kubectl"} <= set(modules)
    for module in modules:
        assert f"replace {module} => {module} {versions.STAGING_VERSION}\n" in go_mod + "\n"
    assert "./staging" not in go_mod


def test_root_requirements_are_pinned_before_tidy() -> None:
    go_mod = build.render_go_mod()
    assert f"\tk8s.io/kubernetes {versions.KUBERNETES_VERSION}\n" in go_mod
    assert f"\tgo.etcd.io/etcd/server/v3 {versions.ETCD_VERSION}\n" in go_mod
    assert f"\tsigs.k8s.io/kwok {versions.KWOK_VERSION}\n" in go_mod


def test_tools_go_imports_every_command_but_the_local_etcd_main() -> None:
    tools = build.render_tools_go()
    assert tools.startswith("//go:build tools")
    assert '_ "k8s.io/kubernetes/cmd/kube-apiserver"' in tools
    assert '_ "sigs.k8s.io/kwok/cmd/kwok"' in tools
    assert "./etcd" not in tools


def test_ldflags_stamp_the_version() -> None:
    flags = build.ldflags()
    assert f"k8s.io/component-base/version.gitVersion={versions.KUBERNETES_VERSION}" in flags
    assert "version.gitMinor=36" in flags


def test_build_step_compiles_all_binaries_with_toolchain_auto(tmp_path: Path) -> None:
    steps = build.build_steps("go", tmp_path)
    assert steps[0].argv == ["go", "mod", "tidy", "-e"]
    compile_argv = steps[-1].argv
    for package in versions.BINARIES.values():
        assert package in compile_argv
    assert build.go_env({"GOFLAGS": "-mod=vendor"})["GOTOOLCHAIN"] == "auto"
    assert build.go_env({"GOFLAGS": "-mod=vendor"})["GOFLAGS"] == "-mod=mod"


def test_cache_is_outside_the_repository_and_configurable(tmp_path: Path) -> None:
    assert build.cache_root({"CHEAPSPOT_CACHE": str(tmp_path)}) == tmp_path
    assert build.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cheapspot"
    assert build.bin_dir({"CHEAPSPOT_CACHE": str(tmp_path)}).name == versions.build_id()


def _fake_build(directory: Path, stamp: dict[str, str]) -> None:
    directory.mkdir(parents=True)
    for name in versions.BINARIES:
        path = directory / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (directory / build.STAMP_FILE).write_text(json.dumps(stamp))


def test_a_finished_build_is_recognised_and_a_stale_one_is_not(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _fake_build(good, versions.stamp())
    assert build.is_complete(good)
    stale = tmp_path / "stale"
    _fake_build(stale, {**versions.stamp(), "etcd": "v3.5.0"})
    assert not build.is_complete(stale)
    (good / "kwok").unlink()
    assert not build.is_complete(good)


def test_second_run_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"CHEAPSPOT_CACHE": str(tmp_path)}
    _fake_build(build.bin_dir(env), versions.stamp())

    def no_go(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a complete cache must not run go")

    monkeypatch.setattr(build, "run_step", no_go)
    assert build.ensure_binaries(progress=lambda _m: None, env=env) == build.bin_dir(env)


def test_node_binaries_compile_with_the_same_stamps(tmp_path: Path) -> None:
    packages = list(versions.NODE_BINARIES.values())
    steps = build.build_steps("go", tmp_path, packages, "kubelet, kubeadm, kube-proxy")
    assert steps[-1].label == "compiling kubelet, kubeadm, kube-proxy"
    assert steps[-1].argv == [
        "go", "build", "-trimpath", "-ldflags", build.ldflags(), "-o", f"{tmp_path}/", *packages
    ]  # fmt: skip


def _writes(out_name: str, text: str) -> Callable[[Path], list[build.Step]]:
    """Steps that stand in for ``go build``: a Python one-liner writing into the output."""

    def steps(out_dir: Path) -> list[build.Step]:
        code = f"import pathlib; pathlib.Path({str(out_dir / out_name)!r}).write_text({text!r})"
        return [
            build.Step("checking the module", [sys.executable, "-c", "open('go.mod')"]),
            build.Step("writing", [sys.executable, "-c", code]),
        ]

    return steps


def test_a_module_build_installs_its_output_with_the_stamp(tmp_path: Path) -> None:
    target = tmp_path / "bin" / "k8s-v0"
    target.mkdir(parents=True)
    (target / "leftover").write_text("from an older build")
    seen: list[str] = []
    installed = build.build_module(
        {"go.mod": "module x\n", "etcd/main.go": "package main\n"},
        _writes("tool", "built"),
        stamp={"kubernetes": "v0"},
        target=target,
        log=tmp_path / "build.log",
        env=dict(os.environ),
        progress=seen.append,
    )
    assert installed == target
    assert (target / "tool").read_text() == "built"
    assert not (target / "leftover").exists()
    assert json.loads((target / build.STAMP_FILE).read_text()) == {"kubernetes": "v0"}
    assert [m.split(":")[0] for m in seen] == ["checking the module"] * 2 + ["writing"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "build.log"]  # no scratch left


def test_a_failed_module_build_leaves_the_installed_one_alone(tmp_path: Path) -> None:
    target = tmp_path / "bin" / "k8s-v0"
    target.mkdir(parents=True)
    (target / "tool").write_text("the old build")

    def failing(out_dir: Path) -> list[build.Step]:
        return [
            build.Step("compiling", [sys.executable, "-c", "raise SystemExit('no such package')"])
        ]

    with pytest.raises(build.BuildError, match=r"(?s)compiling failed \(exit 1\).*no such package"):
        build.build_module(
            {"go.mod": ""},
            failing,
            stamp={},
            target=target,
            log=tmp_path / "b.log",
            env=dict(os.environ),
            progress=print,
        )
    assert (target / "tool").read_text() == "the old build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.log", "bin"]
