"""``cheapspot demo`` (``make demo``): for now, the local cluster and object store, shown.

Brings up the cluster (building its binaries on first use) and the S3 endpoint, prints the
nodes with capacity type, zone and GPUs, and leaves everything running for you to explore.
A later issue turns this into the full job: train on spot, get preempted, finish anyway.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cheapspot_localcluster import cli


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    code = cli.up_main(args)
    if code != 0:
        return code
    # `up` takes more options than `nodes`; hand on only the ones naming the cluster.
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--name")
    which.add_argument("--state-dir")
    known, _ = which.parse_known_args(args)
    nodes_args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(known).items() if v]
    code = cli.nodes_main(nodes_args)
    cli.console.print(
        "\nThe cluster keeps running. Try:\n"
        "  kubectl get nodes -L cheapspot.dev/capacity-type,topology.kubernetes.io/zone\n"
        "  cheapspot preempt spot-gpu-zone-a-0 --notice 10\n"
        "  cheapspot spot off   /   cheapspot spot on\n"
        "Stop everything with `cheapspot down` (or `make clean-cluster`)."
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
