"""The e2e suite's backends: the same scenarios on the local cluster and on kind.

``backend`` is parametrized: ``local`` (the real control plane built from source, kwok nodes,
pods run as local processes by the pod runner, moto S3, ``cheapspot operator`` as a child
process) runs everywhere; ``kind`` (Docker nodes, the two images built and loaded, the Helm
chart; Docker, kind, helm and the node image built here when missing) is skipped with the
reason where no Docker engine can run (not Linux, or not root and none running). Everything here is
module-scoped: one cluster and one set of tiny materials serve every scenario of the module.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cheapspot_localcluster.cluster import LocalCluster
from cheapspot_localcluster.components import PodLifecycle
from cheapspot_localcluster.s3 import S3Endpoint
from cheapspot_localcluster.stack import Backend, LocalBackend
from cheapspot_localcluster.trainjobs import Materials, publish_materials


@pytest.fixture(scope="module", params=["local", "kind"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    workdir = tmp_path_factory.mktemp(f"e2e-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "kind":
            from cheapspot_localcluster import kind

            reason = kind.unavailable() or kind.not_requested()
            if reason:
                pytest.skip(f"kind backend: {reason}")
            kind_backend = kind.KindBackend.create(namespace, workdir)
            for key, value in kind_backend.s3.env().items():
                mp.setenv(key, value)
            try:
                kind_backend.install()
                yield kind_backend
            finally:
                kind_backend.close()
            return

        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
        for key, value in s3.env().items():
            mp.setenv(key, value)
        before = cluster.spec.pod_lifecycle
        cluster.set_pod_lifecycle(PodLifecycle.EXTERNAL)
        local = LocalBackend(cluster, s3, namespace, workdir)
        try:
            local.install()
            yield local
        finally:
            print(f"--- operator log (tail) ---\n{local.operator.log_tail()}")
            local.close()
            cluster.set_pod_lifecycle(before)


@pytest.fixture(scope="module")
def materials(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Materials:
    """A tiny Qwen2-architecture model and datasets, built here and uploaded."""
    return publish_materials(backend.s3.uri(""), tmp_path_factory.mktemp("materials"))


@pytest.fixture(scope="module")
def outputs(backend: Backend) -> str:
    """Where this module's jobs write: a prefix of their own in the bucket."""
    return backend.s3.uri(f"e2e/{uuid.uuid4().hex[:6]}/")
