"""The replica's readiness endpoint asks vLLM each time: a vLLM that stops answering (its
process frozen, its engine hung) makes the replica not Ready, and Ready again once it answers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from cheapspot.contract import ServeTask
from cheapspot_worker.serving import Launcher


def test_readiness_asks_vllm_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> list[int]:
        silent, thawed = asyncio.Event(), asyncio.Event()

        async def health(request: web.Request) -> web.Response:
            if silent.is_set():  # frozen: the connection is taken, nothing comes back
                await thawed.wait()
            return web.Response(text="")

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        monkeypatch.setenv("CHEAPSPOT_BIND_HOST", "127.0.0.1")
        monkeypatch.setenv("CHEAPSPOT_SERVE_PORT", str(port))
        task = ServeTask.model_validate(
            {"pool": {"namespace": "t", "name": "p"}, "model": {"uri": "file:///m/"}}
        )
        launcher = Launcher(task)
        launcher._http = aiohttp.ClientSession()
        seen = []
        try:
            seen.append((await launcher._ready(None)).status)  # not started yet
            launcher.state.ready, launcher.state.phase = True, "ready"
            seen.append((await launcher._ready(None)).status)
            silent.set()
            started = asyncio.get_running_loop().time()
            seen.append((await launcher._ready(None)).status)
            # within the readiness probe's own 2 s timeout: the probe sees a 503, not a hang
            assert asyncio.get_running_loop().time() - started < 2.0
            silent.clear()
            seen.append((await launcher._ready(None)).status)
        finally:
            thawed.set()
            await launcher._http.close()
            await runner.cleanup()
        return seen

    assert asyncio.run(scenario()) == [503, 200, 503, 200]
