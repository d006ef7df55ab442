"""Adapter versions on a replica: what identifies one, how one is fetched, and what a change
of the desired adapter list loads and unloads.

A version of an adapter is its URI and the digest of its published manifest
(:func:`manifest_digest`): a new URI is a new version, and so is the same URI published
again (deleted and re-published: its files, and so its manifest, differ). The replica
computes the digest when it reads the manifest, keeps each version's files in a cache
directory of their own (vLLM keys its prefix cache on the adapter's name *and path*, so a
new version must never reuse the old one's path) and reports ``{name, uri, digest}`` per
adapter, which the operator and the routers compare.

:func:`sync_plan` is the pure diff of the loaded versions against the desired ones;
:class:`AdapterSync` applies a new desired list to vLLM.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
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
from cheapspot_worker.progress import event


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


class AdapterSync:
    """A replica's adapters in vLLM, by version: loaded, desired (with the pool generation it
    came with) and the errors of the last change. ``post`` calls vLLM's runtime LoRA API
    (``''`` on success, else what went wrong); ``fetch`` is :func:`fetch_adapter` with the
    replica's base model and rank limit."""

    def __init__(
        self,
        post: Callable[[str, dict[str, str]], Awaitable[str]],
        fetch: Callable[[AdapterSource], tuple[Path, AdapterVersion]],
        settle_seconds: float,
    ) -> None:
        self.post, self.fetch, self.settle_seconds = post, fetch, settle_seconds
        self.loaded: dict[str, AdapterVersion] = {}
        """Adapter name -> the version loaded in vLLM under that name."""
        self.desired: dict[str, AdapterVersion] = {}
        """Adapter name -> the version asked for last (digest ``""`` where it could not be
        read), announced before anything is swapped, so routers stop sending it here."""
        self.generation = 0
        """The pool generation the desired list came with (0: the task's own list)."""
        self.errors: dict[str, str] = {}

    def started(self, loaded: dict[str, AdapterVersion]) -> None:
        """vLLM started with these versions (the task's list)."""
        self.loaded, self.desired = dict(loaded), dict(loaded)

    def to_json(self) -> dict[str, Any]:
        return {
            "adapters": [v.to_json(n) for n, v in sorted(self.loaded.items())],
            "desired": {
                "generation": self.generation,
                "adapters": [v.to_json(n) for n, v in sorted(self.desired.items())],
            },
        }

    async def apply(self, desired: list[AdapterSource], generation: int) -> dict[str, str]:
        """Fetch every desired version, announce the list, then change vLLM (a name whose
        version cannot be fetched keeps what it has: no router sends it here).

        A new version of a loaded name is swapped ``settle_seconds`` after the announcement
        (:data:`~cheapspot.contract.ADAPTER_SWAP_SETTLE_SECONDS`: the routers stop sending
        the name here first), by an unload and a load from the version's own directory:
        requests vLLM has admitted keep the old weights to their end (it pins an adapter per
        request), new ones get the new version. Not vLLM's in-place reload: it replaces the
        weights under the requests running with them."""
        errors: dict[str, str] = {}
        fetched: dict[str, tuple[Path, AdapterVersion]] = {}
        for source in desired:
            try:
                fetched[source.name] = await asyncio.to_thread(self.fetch, source)
            except AdapterError as exc:
                errors[source.name] = str(exc)
        self.generation = generation
        self.desired = {
            a.name: fetched[a.name][1] if a.name in fetched else AdapterVersion(pretty(a.uri), "")
            for a in desired
        }
        plan = sync_plan(
            {n: v for n, v in self.loaded.items() if n not in errors},
            {n: version for n, (_, version) in fetched.items()},
        )
        if plan.replace:
            event("adapter_swap_announced", adapters=list(plan.replace), generation=generation)
            await asyncio.sleep(self.settle_seconds)
        for name in plan.unload:
            await self.post("/v1/unload_lora_adapter", {"lora_name": name})
            del self.loaded[name]
            event("adapter_unloaded", adapter=name)
        for name in (*plan.replace, *plan.load):
            path, version = fetched[name]
            if name in self.loaded:
                await self.post("/v1/unload_lora_adapter", {"lora_name": name})
                del self.loaded[name]
            problem = await self.post(
                "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}
            )
            if problem:
                errors[name] = f"adapter {name!r}: vLLM refused it: {problem}"
                continue
            self.loaded[name] = version
            event("adapter_loaded", adapter=name, uri=version.uri, digest=version.digest)
        self.errors = errors
        return errors
