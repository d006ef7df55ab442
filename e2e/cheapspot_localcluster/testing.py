"""Pytest fixtures for the local cluster and the S3 endpoint (a pytest plugin).

Registered from the repository's root ``conftest.py`` (``pytest_plugins``). Everything here is
session-scoped and lazy: a test that asks for none of these fixtures (every unit test) never
waits for a build or a cluster.

* ``s3_endpoint``: moto's S3 server on a free loopback port, bucket ``cheapspot``.
* ``local_cluster``: a :class:`LocalCluster` on free ports in a temporary state directory,
  started once per session (building the binaries first if they are missing) and stopped at
  the end. Its processes die with the test process, so even a killed run leaves none behind.
  ``CHEAPSPOT_TEST_POD_LIFECYCLE=external`` starts it in the pod-runner mode.
* ``pods_running_cluster``: the same cluster, switched to the pod-runner mode for a module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_localcluster.components import PodLifecycle, Ports
from cheapspot_localcluster.s3 import S3Endpoint, start_s3


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A moto S3 server on a free loopback port with the bucket ``cheapspot``.

    Point boto3 at it with ``monkeypatch.setenv`` over ``s3_endpoint.env().items()``, or pass
    ``s3_endpoint.env()`` to a subprocess.
    """
    endpoint = start_s3(port=0)
    try:
        yield endpoint
    finally:
        endpoint.stop()


def make_test_cluster(
    state_dir: Path, pod_lifecycle: PodLifecycle = PodLifecycle.KWOK
) -> LocalCluster:
    """A cluster that cannot clash with a user's own: its own name, state and free ports."""
    return LocalCluster(
        name="cheapspot-test",
        state_dir=state_dir,
        ports=Ports.free(),
        pod_lifecycle=pod_lifecycle,
        with_s3=False,  # tests that need S3 ask for `s3_endpoint`
        die_with_parent=True,
    )


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The session's local cluster (real control plane, kwok nodes from the default pools)."""
    mode = PodLifecycle(os.environ.get("CHEAPSPOT_TEST_POD_LIFECYCLE", PodLifecycle.KWOK.value))
    cluster = make_test_cluster(tmp_path_factory.mktemp("cluster"), mode)
    cluster.start(progress=lambda message: print(f"[local cluster] {message}", flush=True))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def pods_running_cluster(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's cluster with pods run as local processes (the pod runner plays kubelet:
    ``external`` pod lifecycle) for the tests of one module; the mode before is restored after,
    so tests where kwok fakes pods and tests where they really run share one cluster."""
    before = local_cluster.spec.pod_lifecycle
    local_cluster.set_pod_lifecycle(PodLifecycle.EXTERNAL)
    try:
        yield local_cluster
    finally:
        local_cluster.set_pod_lifecycle(before)
