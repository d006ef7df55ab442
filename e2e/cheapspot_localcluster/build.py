"""Build etcd, the Kubernetes control plane, kubectl and kwok from the Go module proxy, once.

``go install k8s.io/kubernetes/cmd/kube-apiserver@v1.X`` does not work: Kubernetes' go.mod
replaces its staging modules (k8s.io/api, k8s.io/client-go, ...) with local paths, which a
module download does not have. So we generate a small wrapper module that requires
k8s.io/kubernetes, kwok and etcd's server at pinned versions and replaces every staging
module with its published ``v0.X.Y`` tag, then ``go build`` the command packages from it.

The result lives in a cache outside the repository, keyed by the Kubernetes version, and is
written atomically (build into a temporary directory, then rename) with a stamp recording
the versions: a second run finds the stamp and builds nothing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cheapspot_localcluster import versions

STAMP_FILE = ".cheapspot-build.json"
_RESOURCES = "gobuild"


class BuildError(RuntimeError):
    """A step of the build failed; the message names the step and ends with its output."""


# ---------------------------------------------------------------------------------------------
# Decide: paths, generated files, command lines (pure)
# ---------------------------------------------------------------------------------------------


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """``$CHEAPSPOT_CACHE`` or ``~/.cache/cheapspot``: outside the repository, shared by clones."""
    env = os.environ if env is None else env
    configured = env.get("CHEAPSPOT_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cheapspot"


def bin_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the binaries of the pinned versions live (they may not be built yet)."""
    return cache_root(env) / "bin" / versions.build_id()


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(_RESOURCES, name).read_text(encoding="utf-8")


def staging_modules() -> list[str]:
    """The modules k8s.io/kubernetes replaces with ``./staging/...`` paths (shipped, pinned)."""
    data = json.loads(_template("staging-modules.json"))
    if data["kubernetes"] != versions.KUBERNETES_VERSION:
        raise BuildError(
            f"staging-modules.json lists Kubernetes {data['kubernetes']}'s staging modules, "
            f"but {versions.KUBERNETES_VERSION} is pinned: regenerate it from that release's go.mod"
        )
    modules: list[str] = data["modules"]
    return modules


def render_go_mod(
    requirements: Mapping[str, str] | None = None, module: str = "localcluster-build"
) -> str:
    """The wrapper module's go.mod: pinned requirements plus one replace per staging module."""
    pinned = versions.ROOT_REQUIREMENTS if requirements is None else requirements
    requires = "\n".join(f"\t{mod} {ver}" for mod, ver in pinned.items())
    replaces = "\n".join(
        f"replace {mod} => {mod} {versions.STAGING_VERSION}" for mod in staging_modules()
    )
    return _template("gomod.go.tmpl").format(
        module=module, go_version=versions.GO_VERSION, requires=requires, replaces=replaces
    )


def render_tools_go(packages: list[str] | None = None) -> str:
    listed = list(versions.BINARIES.values()) if packages is None else packages
    imports = "\n".join(f'\t_ "{pkg}"' for pkg in listed if not pkg.startswith("./"))
    return _template("tools.go.tmpl").format(imports=imports)


def ldflags() -> str:
    """Strip symbols, and stamp the version so ``/version`` and ``kubectl version`` tell the truth."""
    pkg = "k8s.io/component-base/version"
    stamps = {
        "gitVersion": versions.KUBERNETES_VERSION,
        "gitMajor": versions.KUBERNETES_MAJOR,
        "gitMinor": versions.KUBERNETES_MINOR,
        "gitTreeState": "clean",
    }
    return " ".join(["-s", "-w", *(f"-X {pkg}.{k}={v}" for k, v in stamps.items())])


def go_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment for every ``go`` call.

    GOTOOLCHAIN=auto lets an older local ``go`` fetch the toolchain the module asks for through
    the same proxy; GOFLAGS is cleared so a user's ``-mod=vendor`` cannot break the build.
    The module cache stays the user's normal one, so downloads are shared with other builds.
    """
    env = dict(base)
    env["GOTOOLCHAIN"] = "auto"
    env["GOFLAGS"] = "-mod=mod"
    env.setdefault("CGO_ENABLED", "0")
    env["GOWORK"] = "off"
    return env


@dataclass(frozen=True)
class Step:
    """One command of the build, with a label for the progress display."""

    label: str
    argv: list[str]


def build_steps(
    go: str,
    out_dir: Path,
    packages: list[str] | None = None,
    what: str = "etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok",
) -> list[Step]:
    """The commands run inside the wrapper module's directory, in order: the control plane's
    binaries, or the ``packages`` given (``what`` names them for the progress display)."""
    listed = list(versions.BINARIES.values()) if packages is None else packages
    return [
        Step("resolving modules (go mod tidy)", [go, "mod", "tidy", "-e"]),
        Step(
            f"compiling {what}",
            [go, "build", "-trimpath", "-ldflags", ldflags(), "-o", str(out_dir) + os.sep, *listed],
        ),
    ]


def is_complete(directory: Path) -> bool:
    """True when ``directory`` holds every binary and a stamp matching the pinned versions."""
    stamp_path = directory / STAMP_FILE
    if not stamp_path.is_file():
        return False
    try:
        recorded = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        return False
    if recorded != versions.stamp():
        return False
    return all(os.access(directory / name, os.X_OK) for name in versions.BINARIES)


# ---------------------------------------------------------------------------------------------
# Act: find Go, run the steps, install atomically
# ---------------------------------------------------------------------------------------------


def bootstrap_go(cache: Path, progress: Callable[[str], None]) -> str:
    """Fetch a Go toolchain from the module proxy when no ``go`` is installed.

    The proxy serves every Go release as the module ``golang.org/toolchain``; this is the same
    download ``GOTOOLCHAIN`` performs, done by hand because there is no ``go`` to do it.
    """
    machine = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    system = platform.system().lower()
    if machine is None or system not in ("linux", "darwin"):
        raise BuildError(
            f"no `go` command found and no Go toolchain download for {system}/{platform.machine()}: "
            "install Go 1.21 or newer"
        )
    version = f"v0.0.1-{versions.BOOTSTRAP_GO_TOOLCHAIN}.{system}-{machine}"
    root = cache / "go" / version
    go = root / "bin" / "go"
    if go.is_file():
        return str(go)
    proxy = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0].split("|")[0]
    if proxy in ("direct", "off"):
        proxy = "https://proxy.golang.org"
    url = f"{proxy.rstrip('/')}/golang.org/toolchain/@v/{version}.zip"
    progress(f"no `go` found: downloading {versions.BOOTSTRAP_GO_TOOLCHAIN} from {url}")
    tmp = Path(tempfile.mkdtemp(prefix="go-", dir=cache))
    try:
        archive = tmp / "go.zip"
        with urllib.request.urlopen(url, timeout=600) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        prefix = f"golang.org/toolchain@{version}/"
        unpacked = tmp / "go"
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(prefix) or info.is_dir():
                    continue
                target = unpacked / info.filename[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        # Zip entries lose their mode bits: the go command and its tools must be executable.
        for tool in [*unpacked.glob("bin/*"), *unpacked.glob("pkg/tool/*/*")]:
            tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(go)


def run_step(step: Step, cwd: Path, env: Mapping[str, str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(step.argv)}\n")
        out.flush()
        result = subprocess.run(
            step.argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"{step.label} failed (exit {result.returncode}); log {log}:\n{tail}")


def build_module(
    files: Mapping[str, str],
    steps: Callable[[Path], list[Step]],
    *,
    stamp: Mapping[str, object],
    target: Path,
    log: Path,
    env: Mapping[str, str],
    progress: Callable[[str], None],
    prefix: str = "build-",
) -> Path:
    """Build a wrapper module in a scratch directory beside ``log`` and install the result.

    ``files`` (path in the module -> text) make the module; ``steps(out_dir)`` are run in it
    in order, each appending to ``log``; ``stamp`` is recorded beside the binaries, which
    then replace ``target`` in one rename, so a half-finished build never sits where a later
    run looks for a finished one. The scratch directory goes whatever happens.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=log.parent))
    try:
        module = work / "module"
        for name, text in files.items():
            (module / name).parent.mkdir(parents=True, exist_ok=True)
            (module / name).write_text(text)
        out_dir = work / "bin"
        out_dir.mkdir()
        for step in steps(out_dir):
            started = time.monotonic()
            progress(step.label)
            run_step(step, module, env, log)
            progress(f"{step.label}: done in {time.monotonic() - started:.0f}s")
        (out_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def ensure_binaries(
    progress: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Return the directory holding the pinned binaries, building them first if needed."""
    target = bin_dir(env)
    if is_complete(target):
        return target
    cache = cache_root(env)
    cache.mkdir(parents=True, exist_ok=True)
    go = shutil.which("go") or bootstrap_go(cache, progress)
    log = cache / "build.log"
    log.write_text(f"cheapspot build of {versions.stamp()}\n")
    files = {
        "go.mod": render_go_mod(),
        "tools.go": render_tools_go(),
        "etcd/main.go": _template("etcd_main.go.tmpl"),
    }
    return build_module(
        files,
        lambda out_dir: build_steps(go, out_dir),
        stamp=versions.stamp(),
        target=target,
        log=log,
        env=go_env(os.environ if env is None else env),
        progress=progress,
    )
