"""From raw Kubernetes objects to the planner's views: the facts failures are judged on."""

from __future__ import annotations

from typing import Any

from cheapspot_operator.cluster.views import node_view, pod_requests
from cheapspot_operator.trainjob.observed import pod_view


def _pod(status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "j-shard-0-0",
            "labels": {"cheapspot.dev/role": "train", "cheapspot.dev/shard": "0"},
            "annotations": {"cheapspot.dev/attempt": "0"},
        },
        "spec": spec,
        "status": status,
    }


def test_a_pod_that_cannot_pull_its_image_says_why() -> None:
    view = pod_view(
        _pod(
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "worker",
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "nope:1"',
                            }
                        },
                    }
                ],
            }
        )
    )
    assert view is not None
    assert (view.waiting_reason, view.waiting_message) == (
        "ImagePullBackOff",
        'Back-off pulling image "nope:1"',
    )


def test_an_oom_kill_keeps_its_reason() -> None:
    view = pod_view(
        _pod(
            {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                ],
            }
        )
    )
    assert view is not None
    assert (view.exit_code, view.exit_reason) == (137, "OOMKilled")


def test_free_gpus_are_allocatable_minus_what_bound_pods_request() -> None:
    gpu_pod = {
        "spec": {
            "containers": [
                {"resources": {"requests": {"cpu": "2", "nvidia.com/gpu": "1"}}},
                {"resources": {"requests": {"nvidia.com/gpu": "2", "memory": "1Gi"}}},
            ]
        }
    }
    assert pod_requests(gpu_pod) == {"nvidia.com/gpu": 3.0}
    node = node_view(
        {
            "metadata": {"name": "n"},
            "status": {"allocatable": {"nvidia.com/gpu": "4", "cpu": "16", "memory": "64Gi"}},
        },
        pod_requests(gpu_pod),
    )
    assert node.free("nvidia.com/gpu") == 1.0
    assert node.free("aliyun.com/gpu-mem") == 0.0
