"""The router's memory under 1,000 concurrent long streams: the router's RSS (its process,
from /proc) at the start, its peak, once every stream is under way, at the end of the streams
and after them.

    .venv/bin/python benchmarks/serving_router_memory.py    # --streams 1000 --tokens 2048 --waves 2

The router is the real one (``cheapspot router --replica URL``, its own process, its
default bounds but ``--capacity``: one replica takes every stream). The replica in front of
which it stands is synthetic, and says so: an aiohttp server (this script with
``--upstream``, its own process) that streams completions the way the replicas' vLLM does
with ``return_token_ids`` (the prompt's token ids in the first chunk, each chunk's token
ids, ``finish_reason``, a usage chunk, ``[DONE]``), slowly and for long, several tokens a
chunk as vLLM sends them when its server falls behind. It measures the router's memory, not
a model's; a vLLM on two CPU cores would not serve 1,000 streams at once.

``--source DIR`` runs the router from another checkout (e.g. one before the memory bounds)
for a before/after figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_open_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the synthetic replica -----------------------------------------------------------------


def serve_upstream(port: int, prompt_tokens: int, per_chunk: int, interval: float) -> None:
    """A completions stream as vLLM sends it with token ids: ``max_tokens`` tokens,
    ``per_chunk`` a chunk, one chunk each ``interval`` seconds."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        count = int(body["max_tokens"])
        prompt = body["prompt"]
        prompt_ids = prompt if isinstance(prompt, list) else list(range(7, 7 + prompt_tokens))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = len(prompt_ids)
        sent = 0
        while sent < count:
            ids = list(range(start + sent, start + min(count, sent + per_chunk)))
            sent += len(ids)
            choice: dict[str, Any] = {
                "index": 0,
                "text": "".join(f" w{t}" for t in ids),
                "logprobs": None,
                "finish_reason": "length" if sent >= count else None,
                "token_ids": ids,
            }
            chunk: dict[str, Any] = {
                "id": "cmpl-bench",
                "object": "text_completion",
                "created": 1,
                "model": body["model"],
                "choices": [choice],
            }
            if ids[0] == start:
                chunk["prompt_token_ids"] = prompt_ids
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(interval)
        usage = {"prompt_tokens": start, "completion_tokens": count, "total_tokens": start + count}
        tail = {"id": "cmpl-bench", "object": "text_completion", "choices": [], "usage": usage}
        await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


# -- the router and its RSS ----------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class Sampler:
    """The router's RSS every ``period`` seconds, with the streams open then."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float, int]] = []
        self.open_streams = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self.t0, rss_mib(self.pid), self.open_streams))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def now(self) -> float:
        return rss_mib(self.pid)


def start_router(upstream: str, source: Path, capacity: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(source / "operator"), str(source / "worker"), str(source)]
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "cheapspot.cli", "router", "--replica", upstream),
            *("--host", "127.0.0.1", "--port", str(port), "--capacity", str(capacity)),
        ],
        env=env,
        cwd=source,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/healthz", proc)
    return proc, url


def wait_for(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def revision(source: Path) -> str:
    """The commit the router ran from (``+`` where its checkout has changes)."""
    git = ["git", "-C", str(source)]
    rev = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    )
    dirty = subprocess.run(
        [*git, "status", "--porcelain"], check=True, capture_output=True, text=True
    )
    return rev.stdout.strip() + ("+" if dirty.stdout.strip() else "")


# -- the clients ---------------------------------------------------------------------------


async def one_stream(
    session: aiohttp.ClientSession, url: str, prompt: str, tokens: int, sampler: Sampler
) -> tuple[bool, int]:
    """One long stream read to its end: whether it ended whole, and its tokens."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "stream": True}
    got = 0
    whole = False
    sampler.open_streams += 1
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                return False, 0
            buffer = b""
            async for piece in resp.content.iter_any():
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        whole = True
                    elif b'"choices":[{' in data.replace(b" ", b""):
                        got += data.count(b" w")
    finally:
        sampler.open_streams -= 1
    return whole and got == tokens, got


async def run_streams(url: str, args: argparse.Namespace, sampler: Sampler) -> dict[str, Any]:
    prompt = "Tell me a long story about a router. " * (args.prompt_tokens // 8)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for _ in range(args.streams):
            tasks.append(
                asyncio.ensure_future(one_stream(session, url, prompt, args.tokens, sampler))
            )
            await asyncio.sleep(args.ramp / args.streams)
        while sampler.open_streams < args.streams and not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
        all_open = sampler.now
        results = await asyncio.gather(*tasks, return_exceptions=True)
    whole = sum(1 for r in results if isinstance(r, tuple) and r[0])
    return {"all_open_rss_mib": all_open, "streams_whole": whole}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=2048, help="tokens a stream")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--per-chunk", type=int, default=8, help="tokens a chunk")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between chunks")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds to open every stream")
    p.add_argument(
        "--waves",
        type=int,
        default=2,
        help="waves of streams, one after the other: a later wave's peak at the first's shows "
        "that what a stream held was freed (Python keeps freed memory for reuse, so the RSS "
        "does not fall back after a wave)",
    )
    p.add_argument("--source", type=Path, default=ROOT, help="the checkout to run the router from")
    p.add_argument("--upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.upstream is not None:
        serve_upstream(args.upstream, args.prompt_tokens, args.per_chunk, args.interval)
        return 0
    raise_open_files()  # the router and the replica inherit it: 1,000 streams, 2,000 sockets
    up_port = free_port()
    upstream = subprocess.Popen(
        [
            *(sys.executable, __file__, "--upstream", str(up_port)),
            *("--prompt-tokens", str(args.prompt_tokens), "--per-chunk", str(args.per_chunk)),
            *("--interval", str(args.interval)),
        ],
    )
    router: subprocess.Popen[bytes] | None = None
    try:
        wait_for(f"http://127.0.0.1:{up_port}/health", upstream)
        router, url = start_router(
            f"http://127.0.0.1:{up_port}", args.source.resolve(), args.streams + 1
        )
        time.sleep(2)
        sampler = Sampler(router.pid)
        start = sampler.now
        waves = []
        for _ in range(args.waves):
            began = time.monotonic()
            out = asyncio.run(run_streams(url, args, sampler))
            end = sampler.now
            time.sleep(5)
            out.update(
                seconds=round(time.monotonic() - 5 - began, 1),
                peak_rss_mib=round(
                    max(s[1] for s in sampler.samples if s[0] >= began - sampler.t0), 1
                ),
                end_rss_mib=round(end, 1),
                after_rss_mib=round(sampler.now, 1),
            )
            out["all_open_rss_mib"] = round(out["all_open_rss_mib"], 1)
            waves.append(out)
        sampler.stop()
        with urllib.request.urlopen(url + "/cheapspot/router", timeout=5) as resp:
            stats = json.loads(resp.read())
    finally:
        for proc in (router, upstream):
            if proc is not None:
                proc.kill()
                proc.wait()
    stats.pop("replicas", None)
    row = {
        "streams": args.streams,
        "tokens_a_stream": args.tokens,
        "prompt_tokens": args.prompt_tokens,
        "start_rss_mib": round(start, 1),
        "waves": waves,
        "router": stats,
        "source": revision(args.source),
    }
    print(f"router RSS at the start: {start:.1f} MiB")
    for i, w in enumerate(waves, 1):
        print(
            f"wave {i}: all {args.streams} streams open {w['all_open_rss_mib']:.1f} MiB, "
            f"peak {w['peak_rss_mib']:.1f}, at the end {w['end_rss_mib']:.1f}, "
            f"5 s after {w['after_rss_mib']:.1f}; {w['streams_whole']}/{args.streams} streams "
            f"whole ({args.tokens} tokens each) in {w['seconds']:.0f} s"
        )
    for t, rss, open_ in sampler.samples[:: max(1, len(sampler.samples) // 16)]:
        print(f"  t={t:6.1f}s  rss {rss:6.1f} MiB  open streams {open_}")
    print(json.dumps({"router_memory": row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
