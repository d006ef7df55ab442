"""Each pool's admin token, which its replicas ask of every change on their admin port, and
its NetworkPolicy (:class:`PoolGuard`).

A pool's token is derived from one key of the operator's (HMAC-SHA256 over the pool's
namespace, name and uid), so the operator never needs to read the pools' Secrets back: it
only creates ``<pool>-admin`` in the pool's namespace (the replica pods take the token from
there) and computes the token again whenever it needs it, after a restart too. The key itself
is a Secret in the operator's own namespace (``cheapspot-admin-key``), made on first use: the
one Secret the operator reads.

Without a namespace of its own (the operator run as a process, as on the local cluster) the
key lives in memory, like the last known good prices: after a restart, pools created before
get their Secret's token read back instead (which needs ``get`` on Secrets there).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading

from cheapspot_operator.inferencepool.manifests import (
    ADMIN_TOKEN_KEY,
    PoolInfo,
    admin_secret_name,
    build_admin_secret,
    build_network_policy,
)
from cheapspot_operator.runtime.config import ServingSettings
from cheapspot_operator.runtime.kubeapi import KubeApi

log = logging.getLogger("cheapspot.operator.pools")

KEY_SECRET = "cheapspot-admin-key"
"""The operator's key, in its own namespace."""
KEY_FIELD = "key"


def derive_token(key: bytes, pool: PoolInfo) -> str:
    """The pool's admin token: the same for the same key and pool, unguessable without the
    key, and a new one for a pool deleted and made again (a new uid)."""
    message = f"{pool.namespace}/{pool.name}/{pool.uid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _decoded(secret: dict[str, object] | None, field: str) -> str:
    data = (secret or {}).get("data") or {}
    value = data.get(field, "") if isinstance(data, dict) else ""
    if value:
        return base64.b64decode(str(value)).decode()
    # An API that keeps stringData as written (a test double).
    plain = (secret or {}).get("stringData") or {}
    return str(plain.get(field, "")) if isinstance(plain, dict) else ""


class AdminTokens:
    """Pool admin tokens, with their Secrets made if absent."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._load_key()
            return self._key

    def _load_key(self) -> bytes:
        fresh = secrets.token_urlsafe(48)
        if not self.namespace:
            log.warning("no operator namespace: the pools' admin key lives in memory only")
            return fresh.encode()
        path = f"/api/v1/namespaces/{self.namespace}/secrets"
        self.api.create(
            path,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": KEY_SECRET,
                    "labels": {"app.kubernetes.io/managed-by": "cheapspot"},
                },
                "stringData": {KEY_FIELD: fresh},
            },
        )
        stored = _decoded(self.api.get(f"{path}/{KEY_SECRET}"), KEY_FIELD)
        if not stored:
            raise RuntimeError(f"secret {self.namespace}/{KEY_SECRET} has no {KEY_FIELD!r}")
        return stored.encode()

    def ensure(self, pool: PoolInfo) -> str:
        """The pool's token, its Secret made first if absent."""
        token = derive_token(self.key(), pool)
        path = f"/api/v1/namespaces/{pool.namespace}/secrets"
        created = self.api.create(path, build_admin_secret(pool, token))
        if created is None and not self.namespace:
            # Made by an earlier operator process whose in-memory key is gone.
            return _decoded(self.api.get(f"{path}/{admin_secret_name(pool.name)}"), ADMIN_TOKEN_KEY)
        return token


class PoolGuard:
    """What keeps strangers from a pool's replicas, made once per pool and operator process
    (so an upgraded operator gives older pools theirs): the admin token Secret and, unless
    ``serving.networkPolicies`` is off, the NetworkPolicy."""

    def __init__(self, api: KubeApi, serving: ServingSettings) -> None:
        self.api = api
        self.serving = serving
        self.tokens = AdminTokens(api, serving.operator_namespace_or_env())
        self.secured: dict[str, str] = {}
        """Pool uid -> its admin token, once its Secret and NetworkPolicy are in place."""

    def secure(self, pool: PoolInfo) -> str:
        """The pool's admin token, its Secret and NetworkPolicy made first if absent."""
        token = self.secured.get(pool.uid)
        if token is not None:
            return token
        token = self.tokens.ensure(pool)
        if self.serving.network_policies:
            self.api.create(
                f"/apis/networking.k8s.io/v1/namespaces/{pool.namespace}/networkpolicies",
                build_network_policy(
                    pool, self.serving.operator_namespace_or_env(), self.serving.operator_pod_labels
                ),
            )
        self.secured[pool.uid] = token
        return token
