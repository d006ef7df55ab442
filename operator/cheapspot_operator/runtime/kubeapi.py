"""A small JSON client for the few Kubernetes calls the operator makes.

The generated ``kubernetes`` client turns every object into typed models and validates
request bodies against them; the operator builds and reads plain dicts (the pure builders
return them), so this talks JSON through the same ``ApiClient`` (same kubeconfig or
in-cluster configuration, same authentication) and returns dicts.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client, config

REQUEST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds for every request: a hung API server must not hang a reconcile."""


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client with the in-cluster configuration when running in a pod, else the
    kubeconfig's (``kubeconfig``, or the default one)."""
    try:
        if kubeconfig:
            raise config.ConfigException("kubeconfig given")
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return client.ApiClient()


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body

    @property
    def message(self) -> str:
        """The API server's own words (``Status.message``), else the raw body."""
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return self.body[:500]
        if isinstance(parsed, dict) and parsed.get("message"):
            return str(parsed["message"])
        return self.body[:500]


def request_kind(method: str, path: str) -> tuple[str, str]:
    """(verb, resource[/subresource]) of a request, as the API server counts it
    (``apiserver_request_total``): a GET of a collection is a LIST."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] if rest else ""
    if len(rest) > 2:
        resource += "/" + rest[2]
    verb = "LIST" if method == "GET" and len(rest) < 2 else method
    return verb, resource


class KubeApi:
    def __init__(
        self, api_client: Any, on_request: Callable[[str, str], None] | None = None
    ) -> None:
        self._client = api_client
        self.on_request = on_request
        """Told ``(verb, resource)`` (:func:`request_kind`) of every request sent."""

    @property
    def configuration(self) -> Any:
        """The client's ``kubernetes.client.Configuration`` (host, TLS, credentials)."""
        return self._client.configuration

    @classmethod
    def from_config(
        cls, kubeconfig: str | None = None, on_request: Callable[[str, str], None] | None = None
    ) -> KubeApi:
        """In-cluster configuration when running in a pod, else the kubeconfig."""
        return cls(api_client(kubeconfig), on_request)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self._client.param_serialize(
            method,
            path,
            query_params=list(query.items()) if query else None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        if self.on_request is not None:
            self.on_request(*request_kind(method, path))
        response = self._client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT
        )
        data = response.read() or b"{}"
        if not 200 <= response.status < 300:
            raise ApiError(int(response.status), data.decode(errors="replace"))
        return json.loads(data)

    # -- the calls the operator makes ----------------------------------------------------

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> list[dict[str, Any]]:
        return self.list_versioned(path, label_selector, field_selector)[0]

    def list_versioned(
        self, path: str, label_selector: str | None = None, field_selector: str | None = None
    ) -> tuple[builtins.list[dict[str, Any]], int | None]:
        """The items and the LIST's own resourceVersion (None when it is not an integer)."""
        query = {"labelSelector": label_selector} if label_selector else {}
        if field_selector:
            query["fieldSelector"] = field_selector
        result = self.request("GET", path, query=query or None)
        items: list[dict[str, Any]] = result.get("items") or []
        try:
            list_version: int | None = int((result.get("metadata") or {})["resourceVersion"])
        except (KeyError, TypeError, ValueError):
            list_version = None
        return items, list_version

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create ``body`` and return the object as created; None when it already exists
        (409), which callers treat as done."""
        try:
            created: dict[str, Any] = self.request("POST", path, body=dict(body))
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise
        return created

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PATCH", path, body=dict(body), content_type="application/merge-patch+json"
        )
        return result

    def delete(self, path: str, grace_seconds: int | None = None) -> bool:
        """Delete; False when it was already gone (404)."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", path, body=body)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
