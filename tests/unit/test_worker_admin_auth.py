"""The replica's admin port takes changes from the operator only: the launcher's real admin
app (its token middleware and handlers, vLLM's part stood in for) behind a real socket, asked
by the operator's real admin client and by a stranger."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from cheapspot.contract import ADMIN_PORT, ADMIN_TOKEN_ENV, AdapterSource, ServeTask
from cheapspot_operator.inferencepool.admin import AdminClient
from cheapspot_operator.testing.pool import make_replica
from cheapspot_worker.adapter_versions import AdapterVersion
from cheapspot_worker.serving import Launcher

pytestmark = pytest.mark.unit

IP = "127.0.9.21"  # a loopback address of its own: nothing else listens there
TOKEN = "pool-admin-token-0123456789"


class Replica:
    """A launcher's admin app on IP:ADMIN_PORT in a thread; applying adapters is recorded
    instead of reaching vLLM."""

    def __init__(self, launcher: Launcher) -> None:
        from aiohttp import web

        self.applied: list[list[str]] = []

        async def apply(desired: list[AdapterSource], generation: int) -> dict[str, str]:
            self.applied.append([a.name for a in desired])
            launcher.adapters.loaded = {a.name: AdapterVersion(a.uri, "") for a in desired}
            launcher.adapters.generation = generation
            return {}

        launcher.adapters.apply = apply  # type: ignore[method-assign]
        launcher.state.ready, launcher.state.phase = True, "ready"
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(launcher.admin_app())
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, IP, ADMIN_PORT).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _launcher(monkeypatch: pytest.MonkeyPatch, token: str | None) -> Launcher:
    monkeypatch.setenv("CHEAPSPOT_BIND_HOST", IP)
    if token is None:
        monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(ADMIN_TOKEN_ENV, token)
    task = ServeTask.model_validate(
        {"pool": {"namespace": "t", "name": "p"}, "model": {"uri": "file:///m/"}}
    )
    launcher = Launcher(task)
    # the status document asks vLLM for its load only when ready; nothing answers here
    launcher.state.ready = False

    async def status_doc() -> dict[str, Any]:
        return {"adapters": sorted(launcher.adapters.loaded)}

    launcher._status_doc = status_doc  # type: ignore[method-assign]
    return launcher


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Replica]:
    try:
        replica = Replica(_launcher(monkeypatch, TOKEN))
    except OSError as exc:
        pytest.skip(f"cannot listen on {IP}:{ADMIN_PORT}: {exc}")
    yield replica
    replica.close()


def _put(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://{IP}:{ADMIN_PORT}/cheapspot/adapters",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


ADAPTERS = {"adapters": [{"name": "mine", "uri": "s3://attacker/weights/"}]}


def test_a_change_without_the_pools_token_is_refused_and_changes_nothing(
    guarded: Replica,
) -> None:
    assert _put(ADAPTERS, {})[0] == 401
    assert _put(ADAPTERS, {"Authorization": "Bearer not-the-token"})[0] == 401
    assert _put(ADAPTERS, {"Authorization": TOKEN})[0] == 401  # no scheme
    assert guarded.applied == []
    # reading stays open (the kubelet's probe cannot carry a secret; the routers poll the
    # adapter versions without one)
    for path in ("/cheapspot/status", "/cheapspot/adapters"):
        with urllib.request.urlopen(f"http://{IP}:{ADMIN_PORT}{path}", timeout=10) as r:
            assert r.status == 200


def test_the_operators_push_carries_the_token_and_is_applied(guarded: Replica) -> None:
    rp = make_replica(1)
    rp = type(rp)(pod=rp.pod, ready=True, ip=IP)
    admin = AdminClient()
    admin.push_adapters(rp, [{"name": "qa", "uri": "s3://ckpt/qa/"}], 1, token=TOKEN)
    deadline = time.monotonic() + 10
    while (admin.pushing or not guarded.applied) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guarded.applied == [["qa"]]


def test_without_a_token_configured_the_port_takes_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        replica = Replica(_launcher(monkeypatch, None))
    except OSError as exc:
        pytest.skip(f"cannot listen on {IP}:{ADMIN_PORT}: {exc}")
    try:
        code, doc = _put(ADAPTERS, {})
        assert code == 200 and doc["adapters"] == ["mine"]
    finally:
        replica.close()
