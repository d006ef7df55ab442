"""The ``cheapspot`` command (also installed as ``kubectl-cheapspot``).

Each sub-command lives with the part it drives and is imported only when used,
so ``cheapspot worker`` never loads the Kubernetes client and ``cheapspot up``
never loads torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name -> ("module:function", help). The function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "build": (
        "cheapspot_localcluster.cli:build_main",
        "build the local cluster's binaries (once, cached)",
    ),
    "up": ("cheapspot_localcluster.cli:up_main", "start the local cluster and S3 endpoint"),
    "down": ("cheapspot_localcluster.cli:down_main", "stop everything `up` started"),
    "kubeconfig": ("cheapspot_localcluster.cli:kubeconfig_main", "print the admin kubeconfig path"),
    "nodes": ("cheapspot_localcluster.cli:nodes_main", "show the cluster's nodes in a table"),
    "preempt": ("cheapspot_localcluster.cli:preempt_main", "simulate a spot reclaim of a node"),
    "spot": ("cheapspot_localcluster.cli:spot_main", "take all spot capacity away or give it back"),
    "kind": (
        "cheapspot_localcluster.kindcli:main",
        "a real kind cluster, built offline: kind build | up | down | load IMAGE...",
    ),
    "operator": ("cheapspot_operator.app.main:main", "run the operator"),
    "cost": (
        "cheapspot_operator.app.costview:main",
        "what each job and pool has cost, by namespace",
    ),
    "router": ("cheapspot_operator.router.server:main", "run an inference pool's router"),
    "worker": ("cheapspot_worker.main:main", "run a worker role (train, anchor, serve)"),
    "demo": ("cheapspot_localcluster.demo:main", "the main job, end to end on the local cluster"),
}


def _usage() -> str:
    lines = ["usage: cheapspot COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


class NotInstalledError(RuntimeError):
    """The command's part is not in this installation (the images ship only theirs)."""


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    package = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise
        where = {
            "cheapspot_localcluster": "the local cluster (folder e2e/ of a source checkout)",
        }.get(package, f"the package {package}")
        raise NotInstalledError(
            f"this installation does not include {where}; the container images ship only "
            "the operator and the worker: run it from a source checkout (`make venv`)"
        ) from exc
    func: Callable[[Sequence[str]], int] = getattr(module, func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"cheapspot: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        command = _resolve(COMMANDS[name][0])
    except NotInstalledError as exc:
        print(f"cheapspot {name}: {exc}", file=sys.stderr)
        return 2
    return command(rest)


if __name__ == "__main__":
    sys.exit(main())
