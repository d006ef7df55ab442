"""``cheapspot operator``: run the operator against the current kubeconfig or in-cluster.

    cheapspot operator [--config FILE] [--kubeconfig FILE] [--namespace NS ...] [--verbose]

The configuration file is YAML (:class:`config.OperatorConfig`; the Helm chart mounts it from
a ConfigMap), also found through ``CHEAPSPOT_OPERATOR_CONFIG``. kopf's own logging is set up
by kopf; ``--verbose`` turns on debug output.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from collections.abc import Sequence

import kopf
from prometheus_client import start_http_server

from cheapspot_operator.app.registry import make_registry
from cheapspot_operator.inferencepool.controller import PoolReconciler
from cheapspot_operator.runtime import metrics
from cheapspot_operator.runtime.config import OperatorConfig, load_config
from cheapspot_operator.runtime.kubeapi import KubeApi
from cheapspot_operator.runtime.nodelist import SharedNodeList
from cheapspot_operator.runtime.pricebook import start_price_book
from cheapspot_operator.trainjob.controller import Reconciler


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cheapspot operator", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", help="operator configuration YAML (default: $CHEAPSPOT_OPERATOR_CONFIG)"
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: the config's, else all)",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


async def run_operator(
    config: OperatorConfig,
    kubeconfig: str | None = None,
    namespaces: Sequence[str] = (),
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or forever). Tests run this in a thread."""
    api = KubeApi.from_config(kubeconfig, on_request=metrics.count_kube_request)
    book, refresher = start_price_book(
        api, config.pricing, config.placement_profile(), config.price_table()
    )
    # One node LIST a second at most for every job and pool, dropped on any node change.
    nodes = SharedNodeList(api, ttl=1.0)
    jobs = Reconciler(api, config, quotes=book.snapshot, nodes=nodes)
    pools = PoolReconciler(api, config, quotes=book.snapshot, nodes=nodes)
    registry = make_registry(jobs, pools, config)
    watched = list(namespaces) or list(config.namespaces)
    health = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
    try:
        await kopf.operator(
            liveness_endpoint=health,
            registry=registry,
            clusterwide=not watched,
            namespaces=watched,
            standalone=config.peering_priority is None,
            priority=config.peering_priority,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        refresher.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv or []))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # One line per handled watch event (kopf) or store client (botocore) is noise.
        for name in ("kopf.objects", "kopf.activities", "botocore", "aiohttp"):
            logging.getLogger(name).setLevel(logging.WARNING)
    config = load_config(args.config)
    if config.metrics_port:
        start_http_server(config.metrics_port)
    logging.getLogger("cheapspot.operator").info(
        "cheapspot operator: profile %s, worker image %s", config.profile, config.worker.image
    )
    try:
        asyncio.run(run_operator(config, args.kubeconfig, args.namespace))
    except KeyboardInterrupt:
        return 130
    return 0
