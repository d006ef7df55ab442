"""``cheapspot build | up | down | kubeconfig | nodes | preempt | spot`` (dispatched by cheapspot.cli).

Every command acts on one cluster, named by ``--name`` (default ``cheapspot``) or located by
``--state-dir``; ``up`` records its choices there, the other commands read them back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from cheapspot_localcluster import build, components, versions
from cheapspot_localcluster.cluster import LocalCluster, default_state_dir
from cheapspot_localcluster.components import PodLifecycle, Ports
from cheapspot_localcluster.nodepool import PoolFileError
from cheapspot_localcluster.processes import ClusterError
from cheapspot_localcluster.table import node_rows, nodes_table

# Piped output (CI logs) gets a wide table rather than rich's 80-column default.
console = Console(highlight=False, width=shutil.get_terminal_size((140, 24)).columns)
errors = Console(stderr=True, highlight=False)

COLD_BUILD_NOTE = (
    "A cold build compiles etcd, Kubernetes and kwok from source: about 8 minutes on 2 cores, "
    "plus downloading about 160 MB of Go modules the first time. Later runs build nothing."
)


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        default=components.CLUSTER_NAME_DEFAULT,
        help="cluster name (default: %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory (default: in the cache, by name)",
    )


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir(args.name)


def _attach(args: argparse.Namespace) -> LocalCluster:
    return LocalCluster.attach(_state_dir(args))


def _fail(message: str) -> int:
    errors.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return 1


def _build(quiet: bool = False) -> Path:
    target = build.bin_dir()
    if build.is_complete(target):
        if not quiet:
            console.print(f"cluster binaries up to date in {target}")
        return target
    console.print(f"building the local cluster's binaries into {target}")
    console.print(COLD_BUILD_NOTE)
    started = time.monotonic()
    with console.status("building") as status:

        def progress(message: str) -> None:
            console.log(message)
            status.update(f"{message} ({time.monotonic() - started:.0f}s so far)")

        path = build.ensure_binaries(progress)
    console.print(f"built in {time.monotonic() - started:.0f}s: {path}")
    return path


def build_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot build", description="Build the local cluster's binaries (once, cached)."
    )
    parser.parse_args(argv)
    try:
        _build()
    except build.BuildError as exc:
        return _fail(str(exc))
    return 0


def up_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot up", description="Start the local cluster and S3 endpoint."
    )
    _cluster_args(parser)
    parser.add_argument(
        "--pools", type=Path, default=None, help="node-pool YAML file (default: the shipped pools)"
    )
    parser.add_argument(
        "--pod-lifecycle",
        choices=[m.value for m in PodLifecycle],
        default=PodLifecycle.KWOK.value,
        help="kwok: kwok marks pods Running; external: something else (the pod runner) does",
    )
    parser.add_argument("--no-s3", action="store_true", help="do not start the S3 endpoint")
    parser.add_argument("--apiserver-port", type=int, default=Ports().apiserver)
    parser.add_argument("--s3-port", type=int, default=Ports().s3)
    args = parser.parse_args(argv)

    state_dir = _state_dir(args)
    try:
        existing = LocalCluster.attach(state_dir)
        if existing.running():
            console.print(f"cluster {existing.name} is already up")
            _print_access(existing)
            return 0
    except ClusterError:
        pass  # never started here

    cluster = LocalCluster(
        name=args.name,
        state_dir=state_dir,
        ports=Ports(apiserver=args.apiserver_port, s3=args.s3_port),
        pools_file=args.pools,
        pod_lifecycle=PodLifecycle(args.pod_lifecycle),
        with_s3=not args.no_s3,
    )
    started = time.monotonic()
    try:
        _build(quiet=True)
        with console.status("starting the local cluster") as status:

            def progress(message: str) -> None:
                status.update(message)

            cluster.start(progress)
    except (ClusterError, PoolFileError, build.BuildError) as exc:
        return _fail(str(exc))
    console.print(f"cluster [bold]{cluster.name}[/] up in {time.monotonic() - started:.1f}s")
    _print_access(cluster)
    return 0


def _print_access(cluster: LocalCluster) -> None:
    console.print(f"  export KUBECONFIG={cluster.kubeconfig_path}")
    console.print(f"  kubectl {versions.KUBERNETES_VERSION}: {build.bin_dir() / 'kubectl'}")
    if cluster.spec.with_s3:
        s3 = cluster.s3
        console.print(f"  S3 endpoint {s3.url}, bucket {s3.bucket} (credentials: any; env below)")
        for key, value in s3.env().items():
            console.print(f"  export {key}={value}")
    console.print(f"  logs in {cluster.layout.logs}; stop with `cheapspot down`")


def down_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot down", description="Stop everything `up` started."
    )
    _cluster_args(parser)
    args = parser.parse_args(argv)
    try:
        cluster = _attach(args)
    except ClusterError:
        console.print("no cluster to stop")
        return 0
    running = cluster.running()
    cluster.stop()
    left = cluster.running()
    if left:
        return _fail(f"still running after stop: {left}")
    console.print(f"stopped {', '.join(running) or 'nothing (was not running)'}")
    return 0


def kubeconfig_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot kubeconfig", description="Print the admin kubeconfig path."
    )
    _cluster_args(parser)
    args = parser.parse_args(argv)
    try:
        cluster = _attach(args)
    except ClusterError as exc:
        return _fail(str(exc))
    if not cluster.running():
        return _fail(f"cluster {cluster.name} is not running: `cheapspot up` starts it")
    print(cluster.kubeconfig_path)
    return 0


def nodes_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot nodes", description="Show the cluster's nodes."
    )
    _cluster_args(parser)
    args = parser.parse_args(argv)
    try:
        cluster = _attach(args)
        rows = node_rows(cluster.node_objects(), cluster.pools.placement)
    except (ClusterError, PoolFileError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # the API server is down: say so plainly
        return _fail(f"cannot list nodes of cluster {args.name}: {exc}")
    console.print(
        nodes_table(rows, title=f"cluster {cluster.name} ({cluster.pools.profile} profile)")
    )
    return 0


def preempt_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot preempt",
        description="Reclaim a node as a spot cloud does: interruption taint, then after the "
        "notice the machine goes away and Kubernetes' controllers evict its pods.",
    )
    parser.add_argument("node")
    parser.add_argument(
        "--notice", type=float, default=None, help="seconds of notice (default: the profile's)"
    )
    _cluster_args(parser)
    args = parser.parse_args(argv)
    try:
        cluster = _attach(args)
        cluster.preempt(args.node, args.notice, log=console.log)
    except (ClusterError, LookupError, TimeoutError) as exc:
        return _fail(str(exc))
    return 0


def spot_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot spot", description="Take all spot capacity away (off) or give it back (on)."
    )
    parser.add_argument("state", choices=["off", "on"])
    parser.add_argument("--notice", type=float, default=0.0, help="seconds of notice for `off`")
    _cluster_args(parser)
    args = parser.parse_args(argv)
    try:
        cluster = _attach(args)
        if args.state == "off":
            names = cluster.spot_off(args.notice, log=console.log)
            console.print(f"spot capacity off: reclaimed {', '.join(names) or 'no nodes'}")
        else:
            names = cluster.spot_on()
            console.print(f"spot capacity on: created {', '.join(names) or 'nothing (all there)'}")
    except (ClusterError, LookupError, TimeoutError) as exc:
        return _fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(up_main(sys.argv[1:]))
