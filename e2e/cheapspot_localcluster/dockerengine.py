"""A Docker engine for the kind tier: Debian's ``docker.io``, installed and started here.

Where ``docker info`` already answers, nothing is touched. Otherwise (as root) the Debian
packages are installed with apt and ``dockerd`` is started in the background with its log in
the cache. What the host cannot do is detected, never assumed:

* a capability bounding set without CAP_SYS_RESOURCE (some VMs withhold it): privileged
  containers, which kind's nodes are, then fail to start, so dockerd's default runtime
  becomes a small wrapper around runc that removes that capability from each container's
  spec first;
* cgroup v1 and a restricted ``oom_score_adj`` are reported for the node image and kind's
  configuration to adapt to (see :mod:`cheapspot_localcluster.kindnode`).

One dockerd only: a second one started with ``--bridge none`` deletes the host's docker0
bridge, so a dockerd that runs but does not answer is an error here, not a reason to start
another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cheapspot_localcluster.build import cache_root

APT_PACKAGES = ("docker.io", "containerd", "runc", "jq", "debootstrap")
"""Debian's packages the kind tier needs on the host: the engine and ``debootstrap`` for the
nodes' root file system."""
CAP_SYS_RESOURCE = 24
RUNTIME_NAME = "cheapspot-runc"

# Removes CAP_SYS_RESOURCE from the OCI spec of the container being created, then runs runc.
RUNC_WRAPPER = """#!/bin/sh
# Written by cheapspot: this host's capability bounding set lacks CAP_SYS_RESOURCE, so a
# container or exec that asks for it (every privileged one) cannot start. Drop it from the
# container's spec (create: --bundle DIR/config.json) or the process's (exec: --process FILE).
drop='map(select(. != "CAP_SYS_RESOURCE"))'
bundle=""
process=""
prev=""
for arg in "$@"; do
  case "$prev" in
    --bundle|-b) bundle="$arg" ;;
    --process|-p) process="$arg" ;;
  esac
  case "$arg" in
    --bundle=*) bundle="${arg#--bundle=}" ;;
    --process=*) process="${arg#--process=}" ;;
  esac
  prev="$arg"
done
rewrite() {
  jq "$2" "$1" > "$1.cheapspot" && mv "$1.cheapspot" "$1"
}
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  rewrite "$bundle/config.json" \
    "if .process.capabilities then .process.capabilities |= with_entries(.value |= $drop) else . end"
fi
if [ -n "$process" ] && [ -f "$process" ]; then
  rewrite "$process" "if .capabilities then .capabilities |= with_entries(.value |= $drop) else . end"
fi
exec runc "$@"
"""


class DockerError(RuntimeError):
    """Docker cannot be had here; the message says why and what to do."""


@dataclass(frozen=True)
class HostQuirks:
    """What this host withholds from containers, read from /proc and /sys."""

    no_sys_resource: bool
    cgroup_v1: bool
    # Lowering a process's oom_score_adj is refused (it needs CAP_SYS_RESOURCE).
    restricted_oom_score_adj: bool

    def describe(self) -> str:
        parts = []
        if self.no_sys_resource:
            parts.append("CAP_SYS_RESOURCE withheld (runc wrapper)")
        if self.cgroup_v1:
            parts.append("cgroup v1 (kubelet failCgroupV1: false)")
        if self.restricted_oom_score_adj:
            parts.append("negative oom_score_adj refused (containerd restrict_oom_score_adj)")
        return ", ".join(parts) or "none"


def bounding_set(status_text: str) -> int:
    """The CapBnd mask from the text of /proc/self/status."""
    for line in status_text.splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise DockerError("no CapBnd line in /proc/self/status")


def detect_quirks(proc_status: Path = Path("/proc/self/status")) -> HostQuirks:
    mask = bounding_set(proc_status.read_text())
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    lower_oom = subprocess.run(
        ["sh", "-c", "echo -1 > /proc/self/oom_score_adj"], capture_output=True, check=False
    )
    return HostQuirks(
        no_sys_resource=not mask & (1 << CAP_SYS_RESOURCE),
        cgroup_v1=not unified,
        restricted_oom_score_adj=lower_oom.returncode != 0,
    )


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60)
    return probe.returncode == 0


def engine_dir(env: Mapping[str, str] | None = None) -> Path:
    return cache_root(env) / "docker"


def dockerd_command(quirks: HostQuirks, wrapper: Path) -> list[str]:
    argv = ["dockerd", "--pidfile", "/var/run/docker.pid"]
    if quirks.no_sys_resource:
        argv += [f"--add-runtime={RUNTIME_NAME}={wrapper}", f"--default-runtime={RUNTIME_NAME}"]
    return argv


def _dockerd_pid() -> int | None:
    try:
        pid = int(Path("/var/run/docker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def apt_install(packages: Sequence[str], progress: Callable[[str], None]) -> None:
    """Install Debian packages the kind tier needs on the host (as root, with apt-get)."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise DockerError(f"{', '.join(packages)} missing, and no apt-get as root to install them")
    progress(f"installing {' '.join(packages)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise DockerError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr}")


def ensure_engine(progress: Callable[[str], None] = print) -> HostQuirks:
    """Make ``docker info`` answer: install and start dockerd when it does not already."""
    quirks = detect_quirks()
    if docker_answers():
        return quirks
    if os.geteuid() != 0:
        raise DockerError(
            "the Docker daemon does not answer and starting one needs root "
            "(run as root, or start Docker yourself)"
        )
    pid = _dockerd_pid()
    if pid is not None:
        raise DockerError(
            f"dockerd (pid {pid}) runs but `docker info` fails: see its log; "
            "a second dockerd is not started, it would take the first one's network over"
        )
    if shutil.which("dockerd") is None or shutil.which("jq") is None:
        apt_install(APT_PACKAGES, progress)
    directory = engine_dir()
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "runc-without-sys-resource"
    wrapper.write_text(RUNC_WRAPPER)
    wrapper.chmod(0o755)
    log = directory / "dockerd.log"
    progress(f"starting dockerd (host quirks: {quirks.describe()}); log {log}")
    with log.open("ab") as out:
        subprocess.Popen(
            dockerd_command(quirks, wrapper),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if docker_answers():
            return quirks
        time.sleep(1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise DockerError(
        f"dockerd started but `docker info` still fails after 60 s; log {log}:\n{tail}"
    )
