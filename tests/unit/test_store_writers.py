"""Two writers for one slot: a zombie (a pod on a partitioned node, force-deleted but still
running) and its replacement publish the same checkpoint prefix, interleaved every way.
Whatever the order, exactly one publish wins, and what its manifest lists can never be
changed by the other: on the local file store and over HTTP against the S3 endpoint."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from cheapspot.store import FENCE_PREFIX, Store
from cheapspot_localcluster.s3 import S3Endpoint

PREFIX = "shards/1/checkpoints/00000040/"
LIVE = {"adapter.safetensors": b"live weights", "trainer_state.pt": b"live optimizer"}
ZOMBIE = {"adapter.safetensors": b"zombie weights", "trainer_state.pt": b"zombie optimizer"}


@pytest.fixture(params=["file", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/job/"
    s3: S3Endpoint = request.getfixturevalue("s3_endpoint")
    mp = request.getfixturevalue("monkeypatch")
    for key, value in s3.env().items():
        mp.setenv(key, value)
    return s3.uri(f"writers-{uuid.uuid4().hex[:8]}/")


class Writer(Store):
    """A writer that runs ``interleave`` just before its ``pause_at``-th write; a zombie has
    already passed publish's "is it published?" check (it looked before the other did)."""

    def __init__(self, uri: str, *, zombie: bool = False) -> None:
        super().__init__(uri)
        self.zombie = zombie
        self.writes = 0
        self.pause_at = -1
        self.interleave: Any = None

    def has_manifest(self, prefix: str) -> bool:
        return False if self.zombie else super().has_manifest(prefix)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if self.writes == self.pause_at and self.interleave is not None:
            self.interleave()
        self.writes += 1
        return super().put_bytes(key, data, if_absent=if_absent)


def _fetched(store: Store, tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / uuid.uuid4().hex
    manifest = store.fetch(PREFIX, out)
    return {name: (out / name).read_bytes() for name in manifest.files}


@pytest.mark.parametrize("zombie_pauses", [True, False], ids=["zombie-paused", "live-paused"])
@pytest.mark.parametrize(
    "pause_at", [0, 1, 2], ids=["before-objects", "mid-objects", "before-manifest"]
)
def test_whatever_the_interleaving_one_publish_wins_and_its_objects_stay_put(
    root: str, tmp_path: Path, zombie_pauses: bool, pause_at: int
) -> None:
    live, zombie = Writer(root), Writer(root, zombie=True)
    paused, other = (zombie, live) if zombie_pauses else (live, zombie)
    files = {id(live): LIVE, id(zombie): ZOMBIE}
    results: dict[int, bool] = {}

    def run_other() -> None:
        results[id(other)] = other.publish(PREFIX, files[id(other)])

    paused.pause_at, paused.interleave = pause_at, run_other
    results[id(paused)] = paused.publish(PREFIX, files[id(paused)])

    winners = [w for w in (live, zombie) if results[id(w)]]
    assert len(winners) == 1, results
    (winner,) = winners
    reader = Store(root)
    assert _fetched(reader, tmp_path) == files[id(winner)]
    # The loser keeps writing (a zombie does not know it lost): nothing it writes counts.
    loser = zombie if winner is live else live
    loser.zombie = True
    assert not loser.publish(PREFIX, files[id(loser)])
    assert _fetched(reader, tmp_path) == files[id(winner)]


def test_the_replacement_publishes_over_a_crashed_attempts_partial_upload(
    root: str, tmp_path: Path
) -> None:
    crashed = Store(root)
    crashed.put_bytes(PREFIX + "adapter.safetensors", b"half of an old attempt")
    live = Store(root)
    assert live.publish(PREFIX, LIVE)
    manifest = live.read_manifest(PREFIX)
    assert manifest is not None
    moved = manifest.files["adapter.safetensors"].key
    assert moved is not None and moved.startswith(FENCE_PREFIX), "the taken name was reused"
    assert manifest.files["trainer_state.pt"].key is None  # a free name is used as is
    assert _fetched(live, tmp_path) == LIVE


def test_a_retried_publish_reuses_its_own_objects(root: str, tmp_path: Path) -> None:
    # The first try wrote the objects, then the store went away before the manifest.
    first = Store(root)
    for name, data in LIVE.items():
        first.put_bytes(PREFIX + name, data, if_absent=True)
    assert Store(root).publish(PREFIX, LIVE)
    manifest = first.read_manifest(PREFIX)
    assert manifest is not None and all(e.key is None for e in manifest.files.values())
    assert _fetched(first, tmp_path) == LIVE


def test_a_manifest_key_outside_its_fence_is_refused(root: str) -> None:
    store = Store(root)
    store.put_bytes(
        PREFIX + "MANIFEST.json",
        b'{"version": 1, "meta": {}, "files": {"a": {"sha256": "0", "size": 1, '
        b'"key": "../../other/a"}}}',
    )
    from cheapspot.store import CorruptObjectError

    with pytest.raises(CorruptObjectError, match="bad key"):
        store.read_manifest(PREFIX)
