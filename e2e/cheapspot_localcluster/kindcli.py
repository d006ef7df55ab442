"""``cheapspot kind build | up | down | load IMAGE...``: a real kind cluster, built offline.

``up`` installs and starts Docker where needed (as root), builds kind, helm and the node image
once (cached), and brings up a control plane with spot and on-demand GPU workers labelled
as the ``local`` placement profile expects.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cheapspot_localcluster.build import cache_root
from cheapspot_localcluster.kind import CLUSTER, KindCluster, KindError


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def default_kubeconfig(name: str) -> Path:
    return cache_root() / "kind" / "clusters" / name / "kubeconfig"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cheapspot kind", description="A kind cluster built offline for the kind tier."
    )
    parser.add_argument("action", choices=["build", "up", "down", "load"])
    parser.add_argument("images", nargs="*", help="for load: docker images to load")
    parser.add_argument("--name", default=CLUSTER, help="cluster name (default: %(default)s)")
    parser.add_argument(
        "--recreate", action="store_true", help="up: a new cluster even if one exists"
    )
    parser.add_argument(
        "--no-images",
        action="store_true",
        help="up: skip building the operator and worker images and loading them into the nodes",
    )
    args = parser.parse_args(argv)
    kubeconfig = default_kubeconfig(args.name)
    started = time.monotonic()
    try:
        cluster = KindCluster.prepare(args.name, kubeconfig, _log)
        if args.action == "build":
            _log(f"built: {cluster.tools}")
        elif args.action == "up":
            if cluster.exists() and not args.recreate:
                _log(f"cluster {args.name} exists: resuming it (--recreate for a new one)")
                kubeconfig.parent.mkdir(parents=True, exist_ok=True)
                kubeconfig.write_text(cluster.kind("get", "kubeconfig", "--name", args.name))
                cluster.resume(_log)
            else:
                cluster.create(kubeconfig.parent, _log)
            if not args.no_images:
                cluster.images(_log)
            _log(f"cluster {args.name} up in {time.monotonic() - started:.0f}s")
            print(f"  export KUBECONFIG={kubeconfig}")
            print(f"  kubectl: {cluster.tools.kubectl}   helm: {cluster.tools.helm}")
        elif args.action == "down":
            cluster.delete()
            _log(f"cluster {args.name} deleted")
        else:
            for image in args.images:
                cluster.load(image)
            _log(f"loaded {', '.join(args.images)}")
    except KindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
