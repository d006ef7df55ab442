"""Everything the kind tier runs, built here from package registries: no image registry needed.

``kind build node-image`` cannot work offline (it pulls its CNI, storage and pause images), so
the node image is assembled by the same steps, from parts built here:

1. a Debian root filesystem from ``debootstrap --variant=minbase``, imported as an image;
2. kind's base image FROM it: kind's own files (in the kind Go module) plus systemd,
   containerd, runc and the CNI plugins from Debian, and a small pod network service in place
   of kindnetd (see ``PODNET_SCRIPT``);
3. kubelet, kubeadm and kube-proxy built from ``k8s.io/kubernetes`` with the same wrapper
   module as the local cluster's control plane; the control plane binaries and etcd from
   :mod:`cheapspot_localcluster.build`; CoreDNS from its module; pause compiled from the
   ``pause.c`` in the Kubernetes module;
4. one image per component (tagged as kubeadm asks for them), saved and imported into the
   node's containerd, and the node committed.

kind and helm are built from their Go modules. Everything is cached by version: images by a
tag that hashes their inputs, binaries in the cache directory; a second run builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cheapspot_localcluster import build, versions
from cheapspot_localcluster.build import BuildError, cache_root
from cheapspot_localcluster.dockerengine import DockerError, apt_install

Progress = Callable[[str], None]

ROOTFS_PACKAGES_NODE = [
    "systemd",
    "conntrack",
    "iptables",
    "nftables",
    "iproute2",
    "ethtool",
    "util-linux",
    "mount",
    "kmod",
    "libseccomp2",
    "pigz",
    "bash",
    "ca-certificates",
    "curl",
    "jq",
    "procps",
    "containerd",
    "runc",
    "containernetworking-plugins",
]

# The pod network, in place of kindnetd: each node reads the nodes (with the kubelet's own
# credentials), gives its pods an address from its podCIDR through the ptp and host-local CNI
# plugins, routes every other node's podCIDR to that node, and masquerades what leaves the
# pod network. Polled, so a node that comes back with another address or CIDR is followed.
PODNET_SCRIPT = r"""#!/bin/sh
# Written by cheapspot: a static pod network for kind nodes without kindnetd.
set -u
kubeconfig=/etc/kubernetes/kubelet.conf
conf=/etc/cni/net.d/10-cheapspot-podnet.conflist
me=$(hostname)
sysctl -qw net.ipv4.ip_forward=1
while true; do
  if [ -f "$kubeconfig" ] && kubectl --kubeconfig "$kubeconfig" get nodes -o \
      jsonpath='{range .items[*]}{.metadata.name} {.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' \
      > /run/podnet.nodes 2>/run/podnet.err; then
    while read -r name cidr ip; do
      [ -n "$cidr" ] && [ -n "$ip" ] || continue
      if [ "$name" = "$me" ]; then
        want=$(printf '{"cniVersion":"0.4.0","name":"cheapspot-podnet","plugins":[{"type":"ptp","ipMasq":false,"mtu":1500,"ipam":{"type":"host-local","ranges":[[{"subnet":"%s"}]],"routes":[{"dst":"0.0.0.0/0"}]}},{"type":"portmap","capabilities":{"portMappings":true}}]}' "$cidr")
        if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
          mkdir -p /etc/cni/net.d && printf '%s' "$want" > "$conf.tmp" && mv "$conf.tmp" "$conf"
        fi
        pods=$(printf '%s' "$cidr" | sed 's#\.[0-9]*\.[0-9]*/.*#.0.0/16#')
        iptables -t nat -C POSTROUTING -s "$pods" ! -d "$pods" -j MASQUERADE 2>/dev/null \
          || iptables -t nat -A POSTROUTING -s "$pods" ! -d "$pods" -j MASQUERADE
      else
        ip route replace "$cidr" via "$ip"
      fi
    done < /run/podnet.nodes
  fi
  sleep 2
done
"""

# Since 1.32 a kubelet's credentials read only its own Node; the pod network service reads
# them all (as kindnetd's service account would). Applied once the control plane is up.
PODNET_RBAC = """apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: cheapspot-podnet}
rules:
  - {apiGroups: [""], resources: [nodes], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: cheapspot-podnet}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cheapspot-podnet}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}
"""

PODNET_UNIT = """[Unit]
Description=cheapspot pod network (routes and CNI config from the nodes' podCIDRs)
After=kubelet.service

[Service]
ExecStart=/kind/bin/cheapspot-podnet.sh
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""

CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


class NodeImageError(BuildError):
    """A step of the node image build failed; the message names the step."""


def kind_cache(env: Mapping[str, str] | None = None) -> Path:
    return cache_root(env) / "kind"


def _run(argv: list[str], step: str, **kwargs: object) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        out = (done.stdout or "")[-3000:] + (done.stderr or "")[-3000:]
        raise NodeImageError(f"{step} failed (exit {done.returncode}): {' '.join(argv)}\n{out}")
    result: str = done.stdout
    return result


def _go() -> str:
    return shutil.which("go") or build.bootstrap_go(cache_root(), print)


def _go_env() -> dict[str, str]:
    return build.go_env(os.environ)


def module_dir(module: str, version: str) -> Path:
    """Where the Go module cache holds ``module@version`` (downloaded if needed)."""
    out = _run(
        [_go(), "mod", "download", "-json", f"{module}@{version}"],
        f"downloading {module}@{version}",
        env={**_go_env(), "GOFLAGS": ""},
    )
    return Path(json.loads(out)["Dir"])


# ---------------------------------------------------------------------------------------------
# Binaries: kind, helm, CoreDNS (go install); kubelet, kubeadm, kube-proxy (wrapper module);
# pause (cc)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoTool:
    """A command built with ``go install package@version`` into the cache."""

    name: str
    package: str
    version: str
    # ``-X symbol=value`` pairs, as the tool's own release build sets them.
    stamps: tuple[tuple[str, str], ...] = ()

    def ldflags(self) -> str:
        return " ".join(["-s", "-w", *(f"-X {symbol}={value}" for symbol, value in self.stamps)])

    def install_argv(self, go: str) -> list[str]:
        return [
            go, "install", "-trimpath", f"-ldflags={self.ldflags()}",
            f"{self.package}@{self.version}",
        ]  # fmt: skip

    def cache_name(self) -> str:
        """Its directory in the cache: name and version, and a digest of the stamps if any, so
        a binary built with other stamps (or none) is never taken for this one."""
        if not self.stamps:
            return f"{self.name}-{self.version}"
        return f"{self.name}-{self.version}-{_digest(self.ldflags())}"


def helm_stamps() -> tuple[tuple[str, str], ...]:
    """What helm's Makefile passes with ``-ldflags`` when it builds a release tag (v3.19.x).

    ``go install`` alone leaves ``helm version`` at the source's placeholder (``v3.19``, no
    commit) and the Kubernetes version that ``helm lint`` checks deprecated APIs against and
    ``helm template`` renders ``.Capabilities.KubeVersion`` with at 1.20; the release build
    derives the latter from its k8s.io/client-go version (v0.X.Y -> 1.X).
    """
    _, minor, _ = versions.HELM_CLIENT_GO_VERSION.lstrip("v").split(".")
    major = "1"
    return (
        ("helm.sh/helm/v3/internal/version.version", versions.HELM_VERSION),
        ("helm.sh/helm/v3/internal/version.gitCommit", versions.HELM_GIT_COMMIT),
        ("helm.sh/helm/v3/internal/version.gitTreeState", "clean"),
        ("helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor", major),
        ("helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor", minor),
        ("helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor", major),
        ("helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor", minor),
    )


KIND = GoTool("kind", "sigs.k8s.io/kind", versions.KIND_VERSION)
HELM = GoTool("helm", "helm.sh/helm/v3/cmd/helm", versions.HELM_VERSION, helm_stamps())
COREDNS = GoTool("coredns", "github.com/coredns/coredns", versions.COREDNS_VERSION)


def tool_binary(tool: GoTool) -> Path:
    """Where ``tool`` lives once built (it may not be yet)."""
    return kind_cache() / "tools" / tool.cache_name() / tool.name


def go_install(tool: GoTool, progress: Progress) -> Path:
    """``go install package@version`` into a directory of the cache named by the build."""
    binary = tool_binary(tool)
    if os.access(binary, os.X_OK):
        return binary
    progress(f"building {tool.name} {tool.version} from the Go module proxy")
    kind_cache().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{tool.name}-", dir=kind_cache()))
    try:
        _run(
            tool.install_argv(_go()),
            f"building {tool.name} {tool.version}",
            env={**_go_env(), "GOBIN": str(work), "GOFLAGS": ""},
        )
        built = work / tool.package.rstrip("/").rsplit("/", 1)[-1]
        binary.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built, binary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def kind_binary(progress: Progress = print) -> Path:
    return go_install(KIND, progress)


def helm_binary(progress: Progress = print) -> Path:
    return go_install(HELM, progress)


def coredns_binary(progress: Progress = print) -> Path:
    return go_install(COREDNS, progress)


def node_bin_dir() -> Path:
    return kind_cache() / "node-bin" / versions.build_id()


def node_binaries(progress: Progress = print) -> Path:
    """kubelet, kubeadm and kube-proxy at the pinned Kubernetes version (about 20 minutes cold)."""
    target = node_bin_dir()
    stamp = {"kubernetes": versions.KUBERNETES_VERSION, "binaries": sorted(versions.NODE_BINARIES)}
    stamp_file = target / build.STAMP_FILE
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target
    kind_cache().mkdir(parents=True, exist_ok=True)
    log = kind_cache() / "node-bin.log"
    log.write_text(f"node binaries {stamp}\n")
    requirements = {"k8s.io/kubernetes": versions.KUBERNETES_VERSION}
    packages = list(versions.NODE_BINARIES.values())
    files = {
        "go.mod": build.render_go_mod(requirements, "kind-node-build"),
        "tools.go": build.render_tools_go(packages),
    }
    go = _go()
    return build.build_module(
        files,
        lambda out: build.build_steps(go, out, packages, "kubelet, kubeadm, kube-proxy"),
        stamp=stamp,
        target=target,
        log=log,
        env=_go_env(),
        progress=progress,
        prefix="node-bin-",
    )


def pause_version(kubernetes_dir: Path) -> str:
    """The pause image tag of the Kubernetes release (``TAG ?= 3.10.2`` in build/pause/Makefile)."""
    for line in (kubernetes_dir / "build" / "pause" / "Makefile").read_text().splitlines():
        if line.replace(" ", "").startswith("TAG?="):
            return line.split("=", 1)[1].strip()
    raise NodeImageError(f"no TAG in {kubernetes_dir}/build/pause/Makefile")


def pause_binary(progress: Progress = print) -> tuple[Path, str]:
    """pause, compiled statically from the Kubernetes module's own pause.c."""
    source_root = module_dir("k8s.io/kubernetes", versions.KUBERNETES_VERSION)
    tag = pause_version(source_root)
    target = kind_cache() / "tools" / f"pause-{tag}" / "pause"
    if os.access(target, os.X_OK):
        return target, tag
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NodeImageError("no C compiler (cc) to build pause from pause.c: install gcc")
    progress(f"compiling pause {tag}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            cc, "-Os", "-Wall", "-Werror", "-static", f"-DVERSION=v{tag}-cheapspot",
            "-o", str(target) + ".tmp", str(source_root / "build" / "pause" / "linux" / "pause.c"),
        ],
        "compiling pause.c (a static build needs libc6-dev)",
    )  # fmt: skip
    os.replace(str(target) + ".tmp", target)
    return target, tag


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def image_exists(tag: str) -> bool:
    probe = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, check=False, timeout=60
    )
    return probe.returncode == 0


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here (so debootstrap works where apt does)."""
    candidates = [*sorted((sources_dir / "sources.list.d").glob("*.sources"))]
    for path in candidates:
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri
    sources_list = sources_dir / "sources.list"
    if sources_list.is_file():
        for line in sources_list.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb" and "security" not in fields[1]:
                return fields[1] if not fields[1].startswith("[") else fields[2]
    return "http://deb.debian.org/debian"


def rootfs_image(progress: Progress = print) -> str:
    """A minimal Debian image from ``debootstrap --variant=minbase`` (about 70 s cold)."""
    tag = f"cheapspot/debian:{versions.DEBIAN_SUITE}-minbase"
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        try:
            apt_install(["debootstrap"], progress)
        except DockerError as exc:
            raise NodeImageError(f"debootstrap is not installed: {exc}") from None
    kind_cache().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=kind_cache()))
    try:
        mirror = debian_mirror()
        progress(f"debootstrap {versions.DEBIAN_SUITE} (minbase) from {mirror}")
        _run(
            ["debootstrap", "--variant=minbase", versions.DEBIAN_SUITE, str(work / "root"), mirror],
            "debootstrap",
        )
        # Keep apt's sources as debootstrap wrote them; drop caches and logs.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for child in (work / "root" / junk).glob("*"):
                if child.is_file():
                    child.unlink()
        tar = subprocess.Popen(
            ["tar", "-C", str(work / "root"), "--numeric-owner", "-c", "."],
            stdout=subprocess.PIPE,
        )
        _run(
            ["docker", "import", "-", tag], "docker import of the root filesystem", stdin=tar.stdout
        )
        tar.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tag


def docker_build(
    tag: str, dockerfile: str, files: Mapping[str, Path | str], step: str, progress: Progress
) -> str:
    """Build ``tag`` from a Dockerfile text and a context of files (paths or text contents)."""
    if image_exists(tag):
        return tag
    progress(step)
    kind_cache().mkdir(parents=True, exist_ok=True)
    context = Path(tempfile.mkdtemp(prefix="context-", dir=kind_cache()))
    try:
        (context / "Dockerfile").write_text(dockerfile)
        for name, source in files.items():
            dest = context / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                if source.is_dir():
                    shutil.copytree(source, dest)
                else:
                    shutil.copy2(source, dest)
            else:
                dest.write_text(source)
        _run(["docker", "build", "-t", tag, str(context)], step)
    finally:
        shutil.rmtree(context, ignore_errors=True)
    return tag


@dataclass(frozen=True)
class ComponentImage:
    """One image the node's containerd holds, as kubeadm (or containerd) names it."""

    name: str  # registry.k8s.io/kube-apiserver:v1.36.3
    dockerfile: str
    files: dict[str, Path | str]


def _static_image(binary: Path, path: str, entrypoint: bool) -> tuple[str, dict[str, Path | str]]:
    lines = [
        "FROM scratch",
        "ENV PATH=/usr/local/bin:/usr/bin:/bin",
        f"COPY {binary.name} {path}",
    ]
    if entrypoint:
        lines.append(f'ENTRYPOINT ["{path}"]')
    return "\n".join(lines) + "\n", {binary.name: binary}


def kubeadm_images(kubeadm: Path) -> dict[str, str]:
    """What kubeadm will run, by short name: ``{"etcd": "registry.k8s.io/etcd:3.6.8-0", ...}``."""
    out = _run(
        [str(kubeadm), "config", "images", "list", "--kubernetes-version",
         versions.KUBERNETES_VERSION],
        "kubeadm config images list",
    )  # fmt: skip
    return {ref.rsplit("/", 1)[-1].split(":")[0]: ref for ref in out.split()}


def _check_version(ref: str, built: str) -> None:
    """kubeadm's tag for etcd, CoreDNS or pause must name the version built here."""
    tag = ref.rsplit(":", 1)[-1].lstrip("v")
    if not tag.startswith(built.lstrip("v")):
        raise NodeImageError(
            f"kubeadm {versions.KUBERNETES_VERSION} runs {ref}, but {built} is built here: "
            "pin the matching version in cheapspot_localcluster/versions.py"
        )


def component_images(
    control_plane_dir: Path,
    node_dir: Path,
    coredns: Path,
    pause: tuple[Path, str],
    rootfs: str,
) -> list[ComponentImage]:
    """One image per component, named exactly as kubeadm asks for it."""
    wanted = kubeadm_images(node_dir / "kubeadm")
    images: list[ComponentImage] = []
    for name in CONTROL_PLANE:
        dockerfile, files = _static_image(control_plane_dir / name, f"/usr/local/bin/{name}", False)
        images.append(ComponentImage(wanted[name], dockerfile, files))
    # kube-proxy programs iptables / nftables through their command-line tools.
    proxy_df = (
        f"FROM {rootfs}\n"
        "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        "--no-install-recommends iptables nftables conntrack ipset kmod "
        "&& rm -rf /var/lib/apt/lists/*\n"
        "COPY kube-proxy /usr/local/bin/kube-proxy\n"
    )
    images.append(
        ComponentImage(wanted["kube-proxy"], proxy_df, {"kube-proxy": node_dir / "kube-proxy"})
    )
    _check_version(wanted["etcd"], versions.ETCD_VERSION)
    dockerfile, files = _static_image(control_plane_dir / "etcd", "/usr/local/bin/etcd", False)
    images.append(ComponentImage(wanted["etcd"], dockerfile, files))
    _check_version(wanted["coredns"], versions.COREDNS_VERSION)
    dockerfile, files = _static_image(coredns, "/coredns", True)
    images.append(ComponentImage(wanted["coredns"], dockerfile, files))
    _check_version(wanted["pause"], pause[1])
    dockerfile, files = _static_image(pause[0], "/pause", True)
    images.append(ComponentImage(wanted["pause"], dockerfile, files))
    return images


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_image_dockerfile(rootfs: str, pause_tag: str) -> str:
    packages = " ".join(ROOTFS_PACKAGES_NODE)
    # Debian's packages first: kind's files then replace their configuration (containerd's).
    return f"""FROM {rootfs}
RUN echo "deb {debian_mirror()} {versions.DEBIAN_SUITE} main" > /etc/apt/sources.list \\
    && apt-get update -q \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {packages} \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/etc/ /etc/
COPY cheapspot-podnet.sh /kind/bin/cheapspot-podnet.sh
COPY cheapspot-podnet.service /etc/systemd/system/cheapspot-podnet.service
RUN chmod 0755 /usr/local/bin/* /kind /kind/bin /kind/bin/* \\
    && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \\
    && rm -f /lib/systemd/system/multi-user.target.wants/* \\
    && rm -f /etc/systemd/system/*.wants/* \\
    && rm -f /lib/systemd/system/local-fs.target.wants/* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*udev* \\
    && rm -f /lib/systemd/system/sockets.target.wants/*initctl* \\
    && rm -f /lib/systemd/system/basic.target.wants/* \\
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \\
    && ln -sf /usr/lib/systemd/systemd /sbin/init \\
    && ln -sf /usr/bin/containerd /usr/local/bin/containerd \\
    && mkdir -p /opt/cni && ln -sfn /usr/lib/cni /opt/cni/bin \\
    && sed -i 's#sandbox_image = .*#sandbox_image = "registry.k8s.io/pause:{pause_tag}"#' \\
        /etc/containerd/config.toml \\
    && ctr oci spec \\
        | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {{"path": "/kind/bin/mount-product-files.sh"}}' \\
        | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \\
    && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
        cheapspot-podnet.service \\
    && systemctl mask systemd-binfmt.service \\
    && mkdir -p /etc/kubernetes/manifests
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
"""


def base_image(rootfs: str, pause_tag: str, progress: Progress) -> str:
    kind_dir = module_dir("sigs.k8s.io/kind", versions.KIND_VERSION) / "images" / "base" / "files"
    dockerfile = base_image_dockerfile(rootfs, pause_tag)
    tag = "cheapspot/kind-base:" + _digest(dockerfile, PODNET_SCRIPT, PODNET_UNIT)
    files: dict[str, Path | str] = {
        "files": kind_dir,
        "cheapspot-podnet.sh": PODNET_SCRIPT,
        "cheapspot-podnet.service": PODNET_UNIT,
    }
    return docker_build(tag, dockerfile, files, "building kind's base image", progress)


@dataclass(frozen=True)
class KindTools:
    """What a kind cluster of the pinned version needs, all built here."""

    kind: Path
    helm: Path
    kubectl: Path
    node_image: str


def node_image(progress: Progress = print) -> str:
    """The node image, assembled offline (cold: about 30 minutes on 2 cores, mostly Go)."""
    control_plane_dir = build.ensure_binaries(progress)
    node_dir = node_binaries(progress)
    coredns = coredns_binary(progress)
    pause = pause_binary(progress)
    rootfs = rootfs_image(progress)
    images = component_images(control_plane_dir, node_dir, coredns, pause, rootfs)
    base = base_image(rootfs, pause[1], progress)
    inputs = [base, versions.KUBERNETES_VERSION]
    for image in images:
        inputs.append(image.name)
        inputs.append(image.dockerfile)
        inputs += [_file_digest(p) if isinstance(p, Path) else p for p in image.files.values()]
    inputs += [_file_digest(node_dir / b) for b in ("kubelet", "kubeadm")]
    tag = f"cheapspot/kind-node:{versions.KUBERNETES_VERSION}-{_digest(*inputs)}"
    if image_exists(tag):
        return tag
    tars = kind_cache() / "images"
    tars.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    for image in images:
        docker_build(image.name, image.dockerfile, image.files, f"building {image.name}", progress)
        tar = tars / (image.name.rsplit("/", 1)[-1].replace(":", "_") + ".tar")
        _run(["docker", "save", "-o", str(tar), image.name], f"saving {image.name}")
        saved.append(tar)
    progress("assembling the node image (component images into its containerd)")
    _assemble(base, tag, node_dir, control_plane_dir, saved)
    return tag


def _assemble(base: str, tag: str, node_dir: Path, cp_dir: Path, tars: list[Path]) -> None:
    """Run the base image, add binaries and images, commit: ``kind build node-image``'s steps."""
    name = f"cheapspot-node-build-{os.getpid()}"
    _run(
        ["docker", "run", "-d", "--privileged", "--name", name, "--entrypoint", "sleep", base,
         "infinity"],
        "starting the node build container",
    )  # fmt: skip
    try:

        def exec_(*argv: str, step: str) -> str:
            return _run(["docker", "exec", name, *argv], step)

        for binary, source in (
            ("kubelet", node_dir),
            ("kubeadm", node_dir),
            ("kubectl", cp_dir),
        ):
            _run(
                ["docker", "cp", str(source / binary), f"{name}:/usr/bin/{binary}"],
                f"copying {binary}",
            )
        exec_(
            "sh", "-c", f"echo {versions.KUBERNETES_VERSION} > /kind/version && mkdir -p /kind/images",
            step="writing /kind/version",
        )  # fmt: skip
        for tar in tars:
            _run(["docker", "cp", str(tar), f"{name}:/kind/images/{tar.name}"], f"copying {tar}")
        exec_(
            "sh", "-c", "containerd >/var/log/containerd-build.log 2>&1 &",
            step="starting containerd in the build container",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while subprocess.run(
            ["docker", "exec", name, "ctr", "version"], capture_output=True, check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise NodeImageError(
                    "containerd in the node build container did not start: "
                    + exec_("cat", "/var/log/containerd-build.log", step="reading its log")
                )
            time.sleep(1)
        for tar in tars:
            exec_(
                "ctr", "--namespace=k8s.io", "images", "import", "--all-platforms",
                "--no-unpack", f"/kind/images/{tar.name}",
                step=f"importing {tar.name} into the node's containerd",
            )  # fmt: skip
        exec_("sh", "-c", "pkill containerd; rm -rf /kind/images", step="stopping containerd")
        time.sleep(2)
        _run(
            [
                "docker", "commit",
                "--change", 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]',
                "--change", "CMD []",
                name, tag,
            ],
            "committing the node image",
        )  # fmt: skip
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def ensure_tools(progress: Progress = print) -> KindTools:
    """kind, helm, kubectl and the node image: built once, found in the cache afterwards."""
    image = node_image(progress)
    return KindTools(
        kind=kind_binary(progress),
        helm=helm_binary(progress),
        kubectl=build.bin_dir() / "kubectl",
        node_image=image,
    )


# ---------------------------------------------------------------------------------------------
# cheapspot's own images, from Dockerfile.operator and Dockerfile.worker
# ---------------------------------------------------------------------------------------------

# A stand-in for python:3.11-slim built from the Debian root: Debian's Python 3.11 with a
# virtual environment at /usr/local, so `pip install --prefix=/install` and `COPY --from=build
# /install /usr/local` behave as they do on the public image. Certificate authorities the
# build host added locally (Debian's /usr/local/share/ca-certificates: a TLS-inspecting proxy
# in front of PyPI, say) are trusted too, so pip reaches PyPI from the build as it does here.
PYTHON_BASE_DOCKERFILE = """FROM {rootfs}
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update -q \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
        python3 python3-venv ca-certificates \\
    && apt-get clean && rm -rf /var/lib/apt/lists/* \\
    && update-ca-certificates \\
    && python3 -m venv /usr/local
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
"""
LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def python_base_image(progress: Progress = print) -> str:
    rootfs = rootfs_image(progress)
    dockerfile = PYTHON_BASE_DOCKERFILE.format(rootfs=rootfs)
    cas: dict[str, Path | str] = {"ca-certificates/.keep": ""}
    for crt in sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []:
        cas[f"ca-certificates/{crt.name}"] = crt
    digests = [_file_digest(p) for p in cas.values() if isinstance(p, Path)]
    tag = "cheapspot/python:3.11-" + _digest(dockerfile, *digests)
    return docker_build(tag, dockerfile, cas, "building a Python 3.11 base image", progress)


def app_image(
    dockerfile: Path, tag: str, base: str, progress: Progress, target: str | None = None
) -> str:
    """``docker build -f dockerfile --build-arg BASE=base -t tag`` of the repository."""
    progress(f"building {tag} from {dockerfile.name}")
    argv = ["docker", "build", "-f", str(dockerfile), "--build-arg", f"BASE={base}", "-t", tag]
    if target is not None:
        argv += ["--target", target]
    started = time.monotonic()
    _run([*argv, str(dockerfile.parent)], f"docker build of {dockerfile.name}")
    progress(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag
