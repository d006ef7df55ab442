"""Kubernetes Events the operator posts (``kubectl describe`` and ``get events`` show them)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cheapspot_operator.runtime.kubeapi import ApiError, KubeApi

log = logging.getLogger(__name__)


def post(
    api: KubeApi,
    involved: Mapping[str, Any],
    *,
    type_: str,
    reason: str,
    message: str,
    now: datetime,
) -> None:
    """Post an event about ``involved`` (an object reference: apiVersion, kind, name,
    namespace, uid); a lost event is logged, never fatal."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "metadata": {"generateName": f"{involved['name']}.", "namespace": involved["namespace"]},
        "involvedObject": dict(involved),
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "cheapspot-operator"},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        api.create(f"/api/v1/namespaces/{involved['namespace']}/events", body)
    except ApiError as exc:  # an event lost is not worth failing anything
        log.warning("cannot post event %s: %s", reason, exc)


def reference(api_version: str, kind: str, obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": str(meta.get("name", "")),
        "namespace": str(meta.get("namespace", "")),
        "uid": str(meta.get("uid", "")),
    }
