"""Which storage URIs a namespace's jobs and pools may name: the operator's
``allowedUriPrefixes``, decided purely.

Worker pods of every namespace run with the same worker identity (one service account, one
cloud role), so without a limit a pool author in one namespace could serve another
namespace's adapters, or a job read its dataset, by naming their URI. The allowlist draws the
line per namespace: every URI a spec names must lie under one of its namespace's prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ANY_NAMESPACE = "*"
NAMESPACE_PLACEHOLDER = "{namespace}"


def prefixes_for(namespace: str, allowed: Mapping[str, Sequence[str]]) -> list[str]:
    """The prefixes ``namespace`` may use: its own entry, else the ``*`` entry, with
    ``{namespace}`` filled in."""
    chosen = allowed.get(namespace, allowed.get(ANY_NAMESPACE, ()))
    return [p.replace(NAMESPACE_PLACEHOLDER, namespace) for p in chosen]


def under(uri: str, prefix: str) -> bool:
    """``uri`` lies under ``prefix``. A prefix ends at a ``/`` boundary (``s3://b/team-a``
    does not admit ``s3://b/team-ab/``) unless it ends with ``://`` (a whole scheme, such
    as ``hf://``); a URI with ``.`` or ``..`` path segments lies under nothing, since a
    file:// path would leave its prefix through them."""
    _, sep, rest = uri.partition("://")
    if not sep or any(seg in (".", "..") for seg in rest.split("/")):
        return False
    if prefix.endswith("://") or prefix.endswith("/"):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")


def refused_uris(
    namespace: str, uris: Mapping[str, str], allowed: Mapping[str, Sequence[str]]
) -> str:
    """Why some of ``uris`` (spec field -> URI; empty ones skipped) may not be used in
    ``namespace`` under ``allowed``, or ``""``. An empty ``allowed`` sets no limit."""
    if not allowed:
        return ""
    prefixes = prefixes_for(namespace, allowed)
    outside = [
        f"{field} {uri}"
        for field, uri in uris.items()
        if uri and not any(under(uri, p) for p in prefixes)
    ]
    if not outside:
        return ""
    if not prefixes:
        where = f"namespace {namespace} may use no storage URI (none allowed)"
    else:
        where = f"namespace {namespace} may use only URIs under {', '.join(prefixes)}"
    return (
        f"{'; '.join(outside)}: outside the allowed prefixes: {where} (operator setting "
        "allowedUriPrefixes)"
    )
