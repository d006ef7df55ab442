"""Adapter versions on a replica: what identifies one, how one is fetched, and what a change
of the desired adapter list loads and unloads.

A version of an adapter is its URI and the digest of its published manifest
(:func:`manifest_digest`): a new URI is a new version, and so is the same URI published
again (deleted and re-published: its files, and so its manifest, differ). The replica
computes the digest when it reads the manifest, keeps each version's files in a cache
directory of their own (vLLM keys its prefix cache on the adapter's name *and path*, so a
new version must never reuse the old one's path) and reports ``{name, uri, digest}`` per
adapter, which the operator and the routers compare.

:func:`sync_plan` is the pure diff of the loaded versions against the desired ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cheapspot.contract import AdapterSource
from cheapspot.store import (
    CorruptObjectError,
    Manifest,
    NotFoundError,
    PermissionStoreError,
    Store,
    TransientStoreError,
)
from cheapspot_worker.adapters import AdapterError, check_adapter
from cheapspot_worker.loading import COMPLETE_MARKER, cache_dir, staged


@dataclass(frozen=True)
class AdapterVersion:
    """One published version of an adapter: its URI (a prefix, ending in ``/``) and the
    digest of its manifest (``sha256:<hex>``)."""

    uri: str
    digest: str

    def to_json(self, name: str) -> dict[str, str]:
        return {"name": name, "uri": self.uri, "digest": self.digest}


def manifest_digest(manifest: Manifest) -> str:
    """The digest of a manifest in its canonical form (sorted keys): the same files with the
    same sums give the same digest however the manifest's bytes were laid out."""
    return "sha256:" + hashlib.sha256(manifest.to_json()).hexdigest()


def pretty(uri: str) -> str:
    return uri.rstrip("/") + "/"


class AdapterNotPublished(AdapterError):  # noqa: N818 (a state, not a fault)
    """Nothing is published at the adapter's URI yet: a training job still running, or a
    wrong URI. The replica exits transient (75), so the pool retries with backoff for
    ``failurePolicy.transientRetrySeconds`` before it counts as a failure."""


def fetch_adapter(
    source: AdapterSource, base_config: dict[str, Any], max_rank: int
) -> tuple[Path, AdapterVersion]:
    """Download the version of an adapter published now (manifest verified) into a cache
    directory of that version's own, and check it fits the base model. :class:`AdapterError`
    for anything the user must fix; store outages propagate."""
    prefix = pretty(source.uri)
    store = Store(prefix)
    try:
        manifest = store.read_manifest("")
        if manifest is None:
            raise NotFoundError(f"{prefix} has no manifest")
        digest = manifest_digest(manifest)
        key = hashlib.sha256(prefix.encode()).hexdigest()[:16]
        dest = cache_dir() / "adapters" / f"{key}-{digest.removeprefix('sha256:')[:16]}"
        if not (dest / COMPLETE_MARKER).is_file():
            with staged(dest, prefix) as staging:
                if manifest_digest(store.fetch("", staging)) != digest:
                    raise TransientStoreError(
                        f"adapter {source.name!r} at {prefix} was published again while it "
                        "was being fetched; fetching it again"
                    )
    except NotFoundError as exc:
        raise AdapterNotPublished(
            f"adapter {source.name!r}: nothing is published at {prefix} (no MANIFEST.json; "
            "a wrong URI, or a training job that has not finished)"
        ) from exc
    except CorruptObjectError as exc:
        raise AdapterError(
            f"adapter {source.name!r} at {prefix} is corrupt, it does not match its manifest: {exc}"
        ) from exc
    except PermissionStoreError as exc:
        raise AdapterError(f"adapter {source.name!r} at {prefix} cannot be read: {exc}") from exc
    check_adapter(dest, base_config, max_rank=max_rank, name=source.name)
    return dest, AdapterVersion(prefix, digest)


@dataclass(frozen=True)
class SyncPlan:
    """What a new desired list changes in vLLM, by adapter name."""

    unload: tuple[str, ...] = ()
    """Loaded and no longer desired."""
    replace: tuple[str, ...] = ()
    """Loaded at another version than the desired one: unloaded, then loaded anew."""
    load: tuple[str, ...] = ()
    """Desired and not loaded at all."""

    @property
    def empty(self) -> bool:
        return not (self.unload or self.replace or self.load)


def sync_plan(
    loaded: Mapping[str, AdapterVersion], desired: Mapping[str, AdapterVersion]
) -> SyncPlan:
    """The diff of the loaded versions against the desired ones, by name, URI and digest
    (a desired version whose digest is unknown, ``""``, matches any digest of its URI)."""
    replace = []
    for name, want in desired.items():
        have = loaded.get(name)
        if have is None:
            continue
        if have.uri != want.uri or (want.digest and have.digest != want.digest):
            replace.append(name)
    return SyncPlan(
        unload=tuple(sorted(n for n in loaded if n not in desired)),
        replace=tuple(sorted(replace)),
        load=tuple(sorted(n for n in desired if n not in loaded)),
    )
