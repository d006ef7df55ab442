"""Serving through the real code: the worker's serve role (launcher + vLLM on CPU) with a tiny
Qwen2 and two LoRA adapters fetched from a real S3 endpoint, and the router in front of two
such replicas.

Two replicas (two vLLM processes) serve the whole module; the test that SIGKILLs one runs
last. Needs the serving environment (`make serve-venv`, which `make test` builds).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cheapspot.contract import ExitCode, ServeTask
from cheapspot_localcluster.s3 import S3Endpoint
from cheapspot_operator.router import limits, routing, streams
from cheapspot_operator.router.routing import Replica, StreamState
from cheapspot_operator.router.server import Router
from cheapspot_worker.serve_testing import ServeReplica, free_port, http_json, publish_dir
from cheapspot_worker.serving import parse_metrics, serve_python

pytestmark = [
    pytest.mark.integration,
    # two vLLM processes start in the first test's setup: about a minute each on an idle
    # two-core machine, many more on a busy one
    pytest.mark.timeout(3600),
    pytest.mark.skipif(serve_python() is None, reason="no serving environment (make serve-venv)"),
]

PROMPTS = ["what colour is the sky", "3 plus 4 is", "say hello", "the cat and the dog"]
TOKENS = 12
CHAT_PATH = "/v1/chat/completions"
ENGINE = {"maxNumSeqs": 32, "maxLoras": 2, "maxLoraRank": 8, "args": ["--dtype", "float32"]}


def _task(model_uri: str, adapters: dict[str, str], name: str = "pool") -> ServeTask:
    return ServeTask.model_validate(
        {
            "pool": {"namespace": "test", "name": name},
            "model": {"uri": model_uri},
            "adapters": [{"name": n, "uri": u} for n, u in adapters.items()],
            "engine": ENGINE,
        }
    )


class Served:
    def __init__(self, root: Path, env: dict[str, str], model: Path, adapters: dict[str, Path]):
        self.root, self.env, self.model_dir, self.adapter_dirs = root, env, model, adapters
        self.model_uri = ""
        self.adapter_uris: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(
    s3_endpoint: S3Endpoint,
    tiny_models: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """The tiny Qwen2 and two adapters, published on S3 with manifests."""
    from cheapspot_worker.tiny import build_adapter

    root = tmp_path_factory.mktemp("serving")
    model = tiny_models("qwen2")
    adapters = {
        "qa": build_adapter(root / "qa", model, seed=1),
        "sums": build_adapter(root / "sums", model, seed=2, target_modules=["q_proj", "v_proj"]),
    }
    env = {**s3_endpoint.env(), "CHEAPSPOT_CACHE_DIR": str(root / "cache")}
    s = Served(root, env, model, adapters)
    store_root = s3_endpoint.uri(f"serving-{uuid.uuid4().hex[:8]}/")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_endpoint.env().items():
            mp.setenv(k, v)
        s.model_uri = publish_dir(store_root, "models/tiny-qwen2/", model)
        for name, path in adapters.items():
            s.adapter_uris[name] = publish_dir(store_root, f"adapters/{name}/", path)
    s.store_root = store_root  # type: ignore[attr-defined]
    yield s


@pytest.fixture(scope="module")
def replicas(served: Served) -> Iterator[list[ServeReplica]]:
    task = _task(served.model_uri, served.adapter_uris)
    started = [
        ServeReplica(
            f"replica-{i}",
            task,
            served.root / "replicas",
            # a cache of its own, as each pod has
            {**served.env, "CHEAPSPOT_CACHE_DIR": str(served.root / f"cache-{i}")},
        )
        for i in range(2)
    ]
    try:
        for r in started:
            r.wait_ready(2400)
        yield started
    finally:
        for r in started:
            r.stop(timeout=60)


def _complete(url: str, model: str, prompt: str, tokens: int = TOKENS) -> dict[str, Any]:
    code, doc = http_json(
        "POST",
        url + "/v1/completions",
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=300,
    )
    assert code == 200, doc
    return doc


def _peft_greedy(
    model_dir: Path, adapter: Path | None, prompt: str, tokens: int = TOKENS
) -> tuple[list[int], list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


# -- the replica -------------------------------------------------------------------------------


def test_base_and_adapters_equal_offline_peft(served: Served, replicas: list[ServeReplica]) -> None:
    url = replicas[0].url
    outputs: dict[str, list[int]] = {}
    cases: list[tuple[str, Path | None]] = [("tiny-qwen2", None), *served.adapter_dirs.items()]
    for name, adapter in cases:
        for prompt in PROMPTS[:2]:
            choice = _complete(url, name, prompt)["choices"][0]
            prompt_ids, expected = _peft_greedy(served.model_dir, adapter, prompt)
            assert choice["prompt_token_ids"] == prompt_ids, (name, prompt)
            assert choice["token_ids"] == expected, (name, prompt)
            outputs[f"{name}:{prompt}"] = choice["token_ids"]
    # the adapters change the answers: a test of adapters that did nothing would pass above
    assert outputs["qa:" + PROMPTS[0]] != outputs["tiny-qwen2:" + PROMPTS[0]]
    assert outputs["sums:" + PROMPTS[0]] != outputs["qa:" + PROMPTS[0]]


def test_a_mixed_adapter_batch_equals_the_requests_one_by_one(replicas: list[ServeReplica]) -> None:
    url = replicas[1].url
    jobs = [(m, p) for p in PROMPTS for m in ("tiny-qwen2", "qa", "sums")]
    alone = [_complete(url, m, p)["choices"][0]["token_ids"] for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _complete(url, *j)["choices"][0]["token_ids"], jobs))
    assert together == alone


def test_status_reports_adapters_and_load(served: Served, replicas: list[ServeReplica]) -> None:
    status = replicas[0].status()
    assert status["ready"] is True and status["phase"] == "ready"
    assert [(a["name"], a["uri"]) for a in status["adapters"]] == [
        ("qa", served.adapter_uris["qa"]),
        ("sums", served.adapter_uris["sums"]),
    ]
    assert all(a["digest"].startswith("sha256:") for a in status["adapters"])
    assert status["model"] == ["tiny-qwen2", "pool"]
    assert status["running"] == 0 and status["waiting"] == 0


def test_adapters_added_and_removed_at_runtime(
    served: Served, replicas: list[ServeReplica]
) -> None:
    r = replicas[0]
    desired = [{"name": n, "uri": u} for n, u in served.adapter_uris.items()]
    extra = {"name": "qa-copy", "uri": served.adapter_uris["qa"]}
    code, doc = http_json(
        "PUT", r.admin_url + "/cheapspot/adapters", {"adapters": [*desired, extra]}
    )
    assert code == 200, doc
    assert [a["name"] for a in doc["adapters"]] == ["qa", "qa-copy", "sums"]
    copy = _complete(r.url, "qa-copy", PROMPTS[0])["choices"][0]["token_ids"]
    assert copy == _complete(r.url, "qa", PROMPTS[0])["choices"][0]["token_ids"]
    # a bad adapter is refused with its reason; the good ones stay
    missing = {"name": "ghost", "uri": served.store_root + "adapters/ghost/"}  # type: ignore[attr-defined]
    code, doc = http_json(
        "PUT", r.admin_url + "/cheapspot/adapters", {"adapters": [*desired, missing]}
    )
    assert code == 422 and "nothing is published" in doc["error"] and "ghost" in doc["error"]
    assert [a["name"] for a in doc["adapters"]] == ["qa", "sums"]
    code, err = http_json(
        "POST",
        r.url + "/v1/completions",
        {"model": "qa-copy", "prompt": "x", "max_tokens": 2},
    )
    assert code == 404, err


# -- bad input ---------------------------------------------------------------------------------


def _fails(
    served: Served, task: ServeTask, tmp_path: Path, code: ExitCode = ExitCode.PERMANENT
) -> str:
    """The replica's log once it has exited with ``code`` (permanent: the user must fix
    something; transient: the pool backs off and retries)."""
    replica = ServeReplica("bad", task, tmp_path, served.env)
    rc = replica.wait(timeout=300)
    log = replica.log_tail(200)
    assert rc == code, log
    return log


def test_a_missing_model_is_a_permanent_error(served: Served, tmp_path: Path) -> None:
    uri = served.store_root + "models/nope/"  # type: ignore[attr-defined]
    log = _fails(served, _task(uri, {}), tmp_path)
    assert "models/nope" in log


def test_an_adapter_not_published_yet_is_a_transient_failure(
    served: Served, tmp_path: Path
) -> None:
    """Nothing published at the URI yet (a training job still running, or a wrong URI): the
    replica exits transient, so the pool backs off and retries for
    ``failurePolicy.transientRetrySeconds`` before it counts the exits as failures."""
    uri = served.store_root + "adapters/nope/"  # type: ignore[attr-defined]
    log = _fails(served, _task(served.model_uri, {"nope": uri}), tmp_path, ExitCode.TRANSIENT)
    assert "adapter 'nope'" in log and "nothing is published" in log


def test_a_corrupt_adapter_is_a_permanent_error(served: Served, tmp_path: Path) -> None:
    bad = tmp_path / "bad-adapter"
    shutil.copytree(served.adapter_dirs["qa"], bad)
    uri = f"file://{tmp_path}/published/"
    publish_dir(uri, "", bad)
    weights = tmp_path / "published" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    log = _fails(served, _task(served.model_uri, {"bad": uri}), tmp_path)
    assert "corrupt" in log and "does not match its manifest" in log


def test_an_adapter_for_another_base_model_is_a_permanent_error(
    served: Served, tmp_path: Path
) -> None:
    from cheapspot_worker.tiny import build_adapter, build_model

    other = build_model(tmp_path / "wider", "qwen2", hidden=64)
    adapter = build_adapter(tmp_path / "wider-adapter", other)
    uri = f"file://{tmp_path}/published/"
    publish_dir(uri, "", adapter)
    log = _fails(served, _task(served.model_uri, {"wider": uri}), tmp_path)
    assert "trained for a different base model" in log


# -- the router ----------------------------------------------------------------------------------


class RouterThread:
    """The router's aiohttp app on a free port, in a thread with its own loop."""

    def __init__(self, router: Any) -> None:
        from aiohttp import web

        self.router = router
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._web = web
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = self._web.AppRunner(self.router.app(), access_log=None)
        self.loop.run_until_complete(runner.setup())
        site = self._web.TCPSite(runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self._runner = runner
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_replicas(self, replicas: list[Any]) -> None:
        asyncio.run_coroutine_threadsafe(self.router.replicas.update(replicas), self.loop).result(
            10
        )

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def _replica(r: ServeReplica) -> Any:
    return Replica(r.name, "127.0.0.1", r.port, ready=True)


@pytest.fixture
def router_for() -> Iterator[Callable[..., RouterThread]]:
    made: list[RouterThread] = []

    def make(replicas: list[Any], **kwargs: Any) -> RouterThread:
        rt = RouterThread(Router(**kwargs))
        rt.set_replicas(replicas)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def _client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_router_serves_base_and_adapters_like_the_replica(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    rt = router_for([_replica(r) for r in replicas])
    client = _client(rt.url)
    models = {m.id for m in client.models.list().data}
    assert {"tiny-qwen2", "qa", "sums"} <= models
    for model in ("tiny-qwen2", "qa", "sums"):
        direct = _complete(replicas[0].url, model, PROMPTS[1])["choices"][0]["text"]
        routed = client.completions.create(
            model=model,
            prompt=PROMPTS[1],
            max_tokens=TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert routed.choices[0].text == direct
        streamed = client.completions.create(
            model=model,
            prompt=PROMPTS[1],
            max_tokens=TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices) == direct


def test_router_errors_are_openai_errors(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    import openai

    client = _client(router_for([_replica(r) for r in replicas]).url)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert "no-such-adapter" in str(unknown.value)
    # an unknown model is the replica's to say (the router does not know the adapters)
    code, doc = http_json(
        "POST",
        router_for([_replica(replicas[0])]).url + "/v1/chat/completions",
        {"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}]},
    )
    assert code == 404 and doc["error"]["param"] == "model", doc
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="qa", prompt="red " * 400, max_tokens=2)
    assert "context" in str(too_long.value).lower() or "length" in str(too_long.value).lower()
    # the runtime adapter API is the operator's, never the clients'
    code, _ = http_json(
        "POST",
        router_for([_replica(replicas[0])]).url + "/v1/load_lora_adapter",
        {"lora_name": "x", "lora_path": "/etc"},
    )
    assert code in (404, 405)


def test_a_new_version_of_an_adapter_rolls_out_under_load_and_no_answer_mixes(
    served: Served,
    replicas: list[ServeReplica],
    router_for: Callable[..., RouterThread],
    s3_endpoint: S3Endpoint,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``qa`` moves to a new URI (another random adapter: other greedy answers) on both
    replicas, as the operator pushes it, while clients stream and ask through the router.
    Every answer is v1's or v2's whole answer (none fails, none is spliced from both), every
    request sent after the rollout gets v2's, which equals offline PEFT with v2; answers of
    both versions were given while the change was under way."""
    from cheapspot_worker.tiny import build_adapter

    for k, v in s3_endpoint.env().items():
        monkeypatch.setenv(k, v)
    v2_dir = build_adapter(served.root / "qa-v2", served.model_dir, seed=3)
    v2_uri = publish_dir(served.store_root, "adapters/qa-v2/", v2_dir)  # type: ignore[attr-defined]
    prompt, tokens = PROMPTS[3], 24
    v1 = _complete(replicas[0].url, "qa", prompt, tokens)["choices"][0]["text"]
    rt = router_for(
        [
            Replica(r.name, "127.0.0.1", r.port, ready=True, admin_port=r.admin_port)
            for r in replicas
        ]
    )
    stop = threading.Event()
    answers: list[tuple[float, float, str]] = []  # (sent, answered, text or the error)

    def ask(stream: bool) -> None:
        client = _client(rt.url).with_options(timeout=120)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                got = client.completions.create(
                    model="qa",
                    prompt=prompt,
                    max_tokens=tokens,
                    temperature=0,
                    stream=stream,
                    extra_body={"ignore_eos": True},
                )
                if stream:
                    text = "".join(c.choices[0].text for c in got if c.choices)  # type: ignore[union-attr]
                else:
                    text = got.choices[0].text  # type: ignore[union-attr]
            except Exception as exc:  # any failure is a wrong answer here
                text = f"failed: {exc!r}"
            answers.append((sent, time.monotonic(), text))

    def push(r: ServeReplica, uri: str, generation: int) -> tuple[int, Any]:
        adapters = [
            {"name": "qa", "uri": uri},
            {"name": "sums", "uri": served.adapter_uris["sums"]},
        ]
        return http_json(
            "PUT",
            r.admin_url + "/cheapspot/adapters",
            {"generation": generation, "adapters": adapters},
            timeout=300,
        )

    try:
        with ThreadPoolExecutor(6) as pool:
            load = [pool.submit(ask, stream) for stream in (True, True, False, True)]
            deadline = time.monotonic() + 120
            while len(answers) < 4:
                assert time.monotonic() < deadline, "no answer before the change"
                time.sleep(0.1)
            changing = time.monotonic()
            pushes = [pool.submit(push, r, v2_uri, 1) for r in replicas]
            results = [p.result(timeout=300) for p in pushes]
            rolled_out = time.monotonic()
            deadline = rolled_out + 120
            while sum(1 for a in answers if a[0] > rolled_out) < 8:
                assert time.monotonic() < deadline, "no answer after the change"
                time.sleep(0.1)
            stop.set()
            for f in load:
                f.result(timeout=300)
        assert all(code == 200 for code, _ in results), results
        v2 = _complete(replicas[1].url, "qa", prompt, tokens)["choices"][0]
        assert v2["text"] != v1
        assert v2["token_ids"] == _peft_greedy(served.model_dir, v2_dir, prompt, tokens)[1]
        print(
            f"{len(answers)} answers: {sum(a[2] == v1 for a in answers)} v1, "
            f"{sum(a[2] == v2['text'] for a in answers)} v2; the rollout took "
            f"{rolled_out - changing:.1f} s"
        )
        wrong = [a for a in answers if a[2] not in (v1, v2["text"])]
        assert not wrong, (v1, v2["text"], wrong)
        late = [a for a in answers if a[0] > rolled_out]
        assert all(a[2] == v2["text"] for a in late), late
        during = [a for a in answers if a[0] < rolled_out and a[1] > changing]
        assert {a[2] for a in during} == {v1, v2["text"]}, during

        # A stream that started on v1 and is cut once the other replica has moved to v2
        # resumes on v1 (the replica still on it), never spliced onto v2.
        with ThreadPoolExecutor(2) as pool:
            back = list(pool.map(lambda r: push(r, served.adapter_uris["qa"], 2), replicas))
        assert all(code == 200 for code, _ in back), back
        _resume_stays_on_its_version(replicas, router_for, v2_uri, push)
    finally:
        stop.set()
        for r in replicas:
            code, doc = push(r, served.adapter_uris["qa"], 4)
            assert code == 200, doc


def _resume_stays_on_its_version(
    replicas: list[ServeReplica],
    router_for: Callable[..., RouterThread],
    v2_uri: str,
    push: Callable[[ServeReplica, str, int], tuple[int, Any]],
) -> None:
    old, new = replicas
    proxy = CutProxy(old.port)
    through = Replica("proxied", "127.0.0.1", proxy.port, ready=True, admin_port=old.admin_port)
    direct = Replica("z-direct", "127.0.0.1", old.port, ready=True, admin_port=old.admin_port)
    # named to come first among equals: where versions are not minded, the resume goes there
    moved = Replica("a-moved", "127.0.0.1", new.port, ready=True, admin_port=new.admin_port)

    def text_of(url: str) -> str:
        c = _client(url).with_options(timeout=120)
        chunks = c.completions.create(
            model="qa",
            prompt=PROMPTS[0],
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)

    moves: list[int] = []

    def move_then_cut() -> None:
        code, _ = push(new, v2_uri, 3)
        moves.append(code)
        rt.set_replicas([through, moved, direct])
        time.sleep(1.5)  # the router's first reports of the replicas added

    try:
        v1_long = text_of(old.url)
        measure = router_for([through])
        assert text_of(measure.url) == v1_long
        length = proxy.passed
        rt = router_for([through], stall_seconds=60, first_token_seconds=60)
        time.sleep(1.5)  # the router's first report of the replica: the version a stream pins
        proxy.cut_after, proxy.before_cut = length // 2, move_then_cut
        got = text_of(rt.url)
        proxy.cut_after = None
    finally:
        proxy.close()
    assert moves == [200] and proxy.cuts == 1
    assert rt.router.stats["resumes"] >= 1 and rt.router.stats["failed"] == 0
    assert got.encode() == v1_long.encode(), (got, v1_long)


def test_a_keyed_router_answers_only_its_keys_and_only_for_their_models(
    replicas: list[ServeReplica],
    router_for: Callable[..., RouterThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import openai

    from cheapspot_operator.router import keyfile

    path = tmp_path / "keys.yaml"
    path.write_text("keys: [{name: qa-only, key: sk-qa-0123456789abcdef, models: [qa]}]\n")
    monkeypatch.setattr(keyfile, "KEYS_CHECK_SECONDS", 0.0)
    rt = router_for([_replica(r) for r in replicas], api_keys=keyfile.KeyFile(str(path)))
    url = rt.url + "/v1/completions"
    ask = {"model": "qa", "prompt": PROMPTS[0], "max_tokens": 2}
    code, doc = http_json("POST", url, ask)
    assert code == 401 and doc["error"]["code"] == "missing_api_key", doc
    keyed = _keyed_client(rt.url, "sk-qa-0123456789abcdef")
    with pytest.raises(openai.AuthenticationError):
        _keyed_client(rt.url, "sk-wrong-0123456789abcdef").completions.create(**ask)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        keyed.completions.create(**{**ask, "model": "sums"})
    assert "sums" in str(denied.value)
    answer = keyed.completions.create(**ask, temperature=0)
    assert answer.choices[0].text  # the replica answered
    assert {m.id for m in keyed.models.list().data} == {"qa"}
    # a new key in the file works without a restart; the old one stops
    path.write_text("keys: [{name: all, key: sk-all-0123456789abcdef}]\n")
    assert (
        _keyed_client(rt.url, "sk-all-0123456789abcdef")
        .completions.create(**{**ask, "model": "sums"})
        .choices
    )
    with pytest.raises(openai.AuthenticationError):
        keyed.completions.create(**ask)


def _keyed_client(url: str, key: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)


class CountingReplica:
    """A stand-in replica that counts the requests reaching it and answers each with an
    empty completion."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[str] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append(self.path)
                data = json.dumps({"id": "x", "object": "text_completion", "choices": []})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _post_raw(url: str, raw: bytes) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=raw, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, kind, data = resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as exc:
        status, kind, data = exc.code, exc.headers.get_content_type(), exc.read()
    try:
        return status, (kind, json.loads(data))
    except ValueError:
        return status, (kind, {"body": data.decode(errors="replace")})


def test_malformed_requests_get_openai_errors_and_never_reach_a_replica(
    router_for: Callable[..., RouterThread],
) -> None:
    """Malformed bodies through the real router: a 400 in OpenAI's error format naming the
    field (none for a body that is no JSON object), and no request at the replica. A
    well-formed one then does reach it. (Every check: tests/unit/test_routing.py.)"""
    chat = routing.CHAT
    ok = {"model": "qa", "prompt": "hi"}
    ok_chat = {"model": "qa", "messages": [{"role": "user", "content": "hi"}]}
    malformed: list[tuple[str, bytes | dict[str, Any], str | None]] = [
        (routing.COMPLETIONS, b"\xff\xfe{}", None),
        (routing.COMPLETIONS, b"{not json", None),
        (routing.COMPLETIONS, b"[1, 2]", None),
        (chat, b"", None),
        ("/v1/embeddings", {"input": "hi"}, "model"),
        (routing.COMPLETIONS, {**ok, "model": 7}, "model"),
        (routing.COMPLETIONS, {**ok, "stream": "false"}, "stream"),
        (chat, {**ok_chat, "stream": "true"}, "stream"),
        (routing.COMPLETIONS, {**ok, "stream_options": {"include_usage": True}}, "stream_options"),
        (routing.COMPLETIONS, {**ok, "n": "x"}, "n"),
        (routing.COMPLETIONS, {**ok, "n": 10**6}, "n"),
        (chat, {**ok_chat, "max_tokens": -1}, "max_tokens"),
        (routing.COMPLETIONS, {**ok, "max_tokens": 10**30}, "max_tokens"),
        (chat, {**ok_chat, "stop": ["a", 5]}, "stop"),
        (routing.COMPLETIONS, {**ok, "prompt": ""}, "prompt"),
        (routing.COMPLETIONS, {**ok, "prompt": [[]]}, "prompt"),
        (chat, {**ok_chat, "messages": []}, "messages"),
        (chat, {**ok_chat, "logprobs": "false"}, "logprobs"),
    ]
    stub = CountingReplica()
    try:
        rt = router_for([Replica("stub", "127.0.0.1", stub.port, ready=True)])
        bad = []
        for path, body, param in malformed:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            code, (kind, doc) = _post_raw(rt.url + path, raw)
            error = doc.get("error") or {}
            if (
                code != 400
                or kind != "application/json"
                or set(error) != {"message", "type", "param", "code"}
                or (error["type"], error["param"], error["code"])
                != ("invalid_request_error", param, 400)
            ):
                bad.append((path, body, code, doc))
        assert not bad, bad
        assert stub.seen == []
        assert rt.router.stats["refused"] == len(malformed) and rt.router.stats["requests"] == 0
        code, _ = _post_raw(rt.url + routing.COMPLETIONS, b'{"model": "qa", "prompt": "hi"}')
        assert code == 200 and stub.seen == [routing.COMPLETIONS]
    finally:
        stub.close()


def test_router_retries_a_dead_replica_and_queues_when_busy(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    dead = Replica("a-dead", "127.0.0.1", free_port(), ready=True)
    rt = router_for([dead, _replica(replicas[0])], capacity=1, max_queue_seconds=120)
    client = _client(rt.url)
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda p: (
                    client.completions.create(model="qa", prompt=p, max_tokens=4, temperature=0)
                    .choices[0]
                    .text
                ),
                PROMPTS,
            )
        )
    assert all(isinstance(a, str) for a in answers) and len(answers) == 4
    assert rt.router.stats["retries"] >= 1 and rt.router.stats["failed"] == 0
    # nobody to serve: a clear 503 once maxQueueSeconds is up, not a hang
    empty = router_for([], max_queue_seconds=1)
    started = time.monotonic()
    code, doc = http_json("POST", empty.url + "/v1/completions", {"model": "qa", "prompt": "x"})
    assert code == 503 and "maxQueueSeconds" in doc["error"]["message"]
    assert time.monotonic() - started < 10


def test_the_routers_bounds_answer_like_openai_and_a_stream_lets_go_of_its_request(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    """The router's memory bounds with a real replica and OpenAI's client. A chat stream
    held part-way (its replica frozen) holds no request body (vLLM's first chunk brought the
    prompt's token ids, the messages are dropped); the router is at maxConcurrentRequests 1,
    so a second request is a RateLimitError with Retry-After; thawed, the stream ends as the
    replica's own answer. A body over maxRequestBytes is a 413 naming the setting."""
    import openai

    replica = replicas[0]
    rt = router_for(
        [_replica(replica)],
        bounds=limits.Limits(max_request_bytes=16 * 1024, max_concurrent_requests=1),
    )
    client = _client(rt.url)
    ask: dict[str, Any] = {
        "model": "qa",
        "messages": [{"role": "user", "content": PROMPTS[0] + " " + "and the sea " * 30}],
        "max_tokens": 60,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    direct = _client(replica.url).chat.completions.create(**ask).choices[0].message.content

    def chat_stream(into: list[str]) -> None:
        for chunk in client.chat.completions.create(stream=True, **ask):
            into.extend(c.delta.content or "" for c in chunk.choices)

    with ThreadPoolExecutor(1) as pool:
        deadline = time.monotonic() + 300
        futures, got = _held_under_way(pool, [chat_stream], [direct or ""], replica, deadline)
        try:
            _, status = http_json("GET", rt.url + "/cheapspot/router")
            with pytest.raises(openai.RateLimitError) as busy:
                client.completions.create(model="qa", prompt="x", max_tokens=2)
        finally:
            replica.thaw()
        futures[0].result(timeout=300)
    assert (status["active"], status["buffered_bytes"]) == (1, 0), status
    assert busy.value.response.headers["retry-after"] == str(limits.RETRY_AFTER_SECONDS)
    assert "router.maxConcurrentRequests" in busy.value.message
    assert "".join(got[0]) == direct
    with pytest.raises(openai.APIStatusError) as large:
        client.completions.create(model="qa", prompt="sky " * 5000, max_tokens=2)
    assert large.value.status_code == 413 and "router.maxRequestBytes" in large.value.message
    assert rt.router.stats["overloaded"] == 1 and rt.router.buffered.held == 0


class CutProxy:
    """A TCP proxy in front of a replica that resets the connection once it has passed
    ``cut_after`` bytes of a response: the replica lost at an exact byte of its stream, over
    and over, with no replica restarted. ``before_cut`` runs just before the reset."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after: int | None = None
        self.before_cut: Callable[[], None] = lambda: None
        self.passed = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        sent = [0]  # response bytes passed since the client last spoke

        def upward() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    sent[0] = 0
                    up.sendall(data)
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)

        upward_thread = threading.Thread(target=upward, daemon=True)
        upward_thread.start()
        try:
            while data := up.recv(65536):
                limit = self.cut_after
                if limit is not None and sent[0] + len(data) >= limit:
                    client.sendall(data[: limit - sent[0]])
                    self.passed = limit
                    self.before_cut()
                    self.cuts += 1
                    # a reset, as from a host gone; shutdown first wakes the thread reading
                    # the client, whose hold on the socket would delay it
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.shutdown(socket.SHUT_RDWR)
                    upward_thread.join(10)
                    break
                client.sendall(data)
                sent[0] += len(data)
                self.passed = sent[0]
        except OSError:
            pass
        finally:
            client.close()
            up.close()

    def close(self) -> None:
        self.listener.close()


def test_a_stream_cut_at_any_byte_resumes_byte_identical(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    """The replica's connection reset at byte after byte of its response (headers, mid-event,
    between events, in the last chunk): every answer, completions and chat, equals the
    undisturbed one, byte for byte, and ends with finish_reason "length".

    Also with a stop string that never matches: vLLM then holds back the text of the last
    (longest stop - 1) characters of every chunk whose token ids it already sent, so the
    client has less text than tokens all through the stream."""
    replica = replicas[1]
    proxy = CutProxy(replica.port)
    direct = Replica("direct", "127.0.0.1", replica.port, ready=True)
    through = Replica("proxied", "127.0.0.1", proxy.port, ready=True)
    tokens = 24
    messages = [{"role": "user", "content": PROMPTS[0]}]

    stop = "}}}}}}}}"

    def ask(url: str, chat: bool, stops: bool) -> tuple[str, str | None]:
        c = _client(url).with_options(timeout=60)
        settings: dict[str, Any] = {"max_tokens": tokens, "temperature": 0, "stream": True}
        settings["extra_body"] = {"ignore_eos": True}
        if stops:
            settings["stop"] = [stop, "{{{{"]
        stream: Any = (
            c.chat.completions.create(model="sums", messages=messages, **settings)
            if chat
            else c.completions.create(model="qa", prompt=PROMPTS[2], **settings)
        )
        parts: list[str] = []
        finish = None
        for chunk in stream:
            if chunk.choices:
                choice = chunk.choices[0]
                parts.append((choice.delta.content if chat else choice.text) or "")
                finish = choice.finish_reason or finish
        return "".join(parts), finish

    try:
        for chat, stops in ((False, False), (True, False), (False, True), (True, True)):
            full, _ = ask(replica.url, chat, stops)
            assert stop not in full
            rt = router_for([through])
            ask(rt.url, chat, stops)
            length = proxy.passed
            bad = []
            # 30 points over the response, and every third byte of its last 60: a cut after
            # the finish_reason, with only [DONE] lost, must not add a token. With stop
            # strings, 20 points: the end of a stream is the same with them or without.
            cuts = (
                set(range(1, length, max(1, length // 20)))
                if stops
                else {*range(1, length, max(1, length // 30)), *range(length - 60, length, 3)}
            )
            for cut in sorted(cuts):
                rt = router_for([through])
                proxy.cut_after = cut
                proxy.before_cut = functools.partial(rt.set_replicas, [through, direct])
                got, finish = ask(rt.url, chat, stops)
                proxy.cut_after = None
                if got.encode() != full.encode() or finish != "length":
                    bad.append((cut, got, finish))
            assert not bad, (chat, stops, full, bad)
    finally:
        proxy.close()


def test_a_resume_after_a_merged_chunk_starts_after_the_text_the_client_has(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    """vLLM puts several tokens in one chunk when its server falls behind, and holds back the
    text of a token that ends inside a character. A stream cut after such a merged chunk must
    continue after the tokens whose text the client has: the router settles on that count
    with the replica's detokenizer, and the continuation's text is the rest of the answer."""
    replica = replicas[1]
    rt = router_for([_replica(replica)])
    body = {
        "model": "qa",
        "prompt": PROMPTS[2],
        "max_tokens": 120,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    chunks: list[dict[str, Any]] = []
    for c in _client(replica.url).completions.create(
        model="qa",
        prompt=PROMPTS[2],
        max_tokens=120,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ):
        if c.choices:
            chunks.append(c.model_dump())
    texts = [c["choices"][0]["text"] for c in chunks]
    full = "".join(texts)
    held = [i for i, t in enumerate(texts) if i > 0 and not t and texts[i - 1]]
    assert held, "no token's text was held back: the case this test is about did not occur"
    i = held[0]
    # chunks i-1 and i merged into one: its text is chunk i-1's, token i's text held back
    state = StreamState(routing.COMPLETIONS, body)
    for c in chunks[: i - 1]:
        routing.relay_chunk(state, json.dumps(c).encode(), resumed=False)
    merged = json.loads(json.dumps(chunks[i - 1]))
    merged["choices"][0]["token_ids"] += chunks[i]["choices"][0]["token_ids"]
    routing.relay_chunk(state, json.dumps(merged).encode(), resumed=False)
    assert state.sure < state.committed == i + 1
    settle = streams.settle(rt.router.relay.client, _replica(replica), state)
    asyncio.run_coroutine_threadsafe(settle, rt.loop).result(60)
    assert state.committed == i, (i, state.committed)
    assert state.prompt_ids is not None
    doc = routing.continuation_body(body, state.prompt_ids, routing.resume_point(state))
    rest = "".join(
        c.choices[0].text
        for c in _client(replica.url).completions.create(
            model="qa",
            prompt=doc["prompt"],
            max_tokens=doc["max_tokens"],
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert (state.text + rest).encode() == full.encode()


def _sse(url: str, body: dict[str, Any], path: str = "/v1/completions") -> list[Any]:
    """A stream's events, read to its end: JSON chunks, then "[DONE]"."""
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        events, rest = routing.parse_sse(resp.read())
    assert not rest.strip(), rest
    return [e.decode() if e.strip() == b"[DONE]" else json.loads(e) for e in events]


def _texts(events: list[Any]) -> dict[int, str]:
    """Each choice's text, by index (chat deltas or completion text)."""
    out: dict[int, str] = {}
    for e in events:
        for c in (e.get("choices") or []) if isinstance(e, dict) else []:
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            out[c["index"]] = out.get(c["index"], "") + (piece or "")
    return out


def _cut_half_way(
    replica: ServeReplica,
    router_for: Callable[..., RouterThread],
    body: dict[str, Any],
    path: str = "/v1/completions",
) -> tuple[list[Any], list[Any]]:
    """``body``'s stream undisturbed, and through the router with the replica's connection
    reset half-way through its response (by bytes), another replica then ready to continue."""
    proxy = CutProxy(replica.port)
    direct = Replica("direct", "127.0.0.1", replica.port, ready=True)
    through = Replica("proxied", "127.0.0.1", proxy.port, ready=True)
    try:
        full = _sse(replica.url, body, path)
        _sse(router_for([through]).url, body, path)
        rt = router_for([through])
        proxy.cut_after = proxy.passed // 2
        proxy.before_cut = functools.partial(rt.set_replicas, [through, direct])
        got = _sse(rt.url, body, path)
        assert proxy.cuts == 1, "the stream was not cut: the case this test is about"
        return full, got
    finally:
        proxy.close()


ALLOWED = list(range(40, 140, 9))
"""Few allowed tokens, far apart: the greedy answer among them is not what the model
continues it with unconstrained."""
GREEDY = {
    "model": "qa",
    "prompt": PROMPTS[2],
    "max_tokens": 24,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


@pytest.mark.parametrize(
    ("param", "extra", "path"),
    [
        ("frequency_penalty", {"frequency_penalty": 1.5}, "/v1/completions"),
        ("presence_penalty", {"presence_penalty": 1.5}, "/v1/completions"),
        ("bad_words", {"bad_words": ["the cat"]}, "/v1/completions"),
        ("seed", {"seed": 7, "temperature": 1.0}, "/v1/completions"),
        ("prompt", {"prompt": [PROMPTS[0], PROMPTS[2]]}, "/v1/completions"),
        ("response_format", {"response_format": {"type": "json_object"}}, CHAT_PATH),
    ],
)
def test_a_cut_stream_the_continuation_cannot_honour_ends_with_an_error_event(
    replicas: list[ServeReplica],
    router_for: Callable[..., RouterThread],
    param: str,
    extra: dict[str, Any],
    path: str,
) -> None:
    """Penalties counted over the generated tokens, multi-token bad words, a seeded sample, a
    batch of prompts, guided decoding: a continuation would not give the undisturbed answer,
    so a stream cut half-way is not resumed. The client has a part of the answer (each
    choice's text a prefix of the undisturbed one, never a spliced one) and then an OpenAI
    error event naming the parameter, then [DONE]: never a clean end."""
    body = {**GREEDY, **extra}
    if path == CHAT_PATH:
        body.pop("prompt")
        body["model"], body["messages"] = "sums", [{"role": "user", "content": PROMPTS[0]}]
    full, got = _cut_half_way(replicas[1], router_for, body, path)
    assert full[-1] == "[DONE]" and not any("error" in e for e in full if isinstance(e, dict))
    assert got[-1] == "[DONE]" and "error" in got[-2], got[-3:]
    message = got[-2]["error"]["message"]
    assert f"the stream was not resumed: '{param}'" in message, message
    whole, part = _texts(full), _texts(got[:-2])
    assert sum(map(len, part.values())) > 0, got
    assert all(whole[i].startswith(t) for i, t in part.items()), (whole, part)
    assert sum(map(len, part.values())) < sum(map(len, whole.values())), (whole, part)


def test_a_cut_stream_with_per_token_constraints_resumes_byte_identical(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    """``logit_bias``, ``allowed_token_ids`` and ``repetition_penalty`` mean the same to a
    continuation (vLLM applies the first two to each token whatever came before, the third
    over prompt and output alike): each carried, a stream cut half-way gives the undisturbed
    greedy answer, byte for byte. Each is chosen so it changes the answer (else dropping it
    from the continuation would go unseen)."""
    replica = replicas[1]
    plain = _complete(replica.url, "qa", PROMPTS[2], 24)["choices"][0]
    seen = sorted(set(plain["token_ids"]))
    cases = {
        "logit_bias": {"logit_bias": {str(t): -100 for t in seen}},
        "allowed_token_ids": {"allowed_token_ids": ALLOWED},
        "repetition_penalty": {"repetition_penalty": 3.0},
    }
    bad = []
    for name, extra in cases.items():
        _dropped_would_show(replica, name, extra)
        full, got = _cut_half_way(replica, router_for, {**GREEDY, **extra})
        if _texts(got) != _texts(full) or got[-1] != "[DONE]":
            bad.append((name, _texts(full), got))
    assert not bad, bad


def _dropped_would_show(replica: ServeReplica, name: str, extra: dict[str, Any]) -> None:
    """A continuation half-way through ``extra``'s greedy answer without ``extra`` gives
    another rest of the answer: else a router that dropped it would pass unseen."""
    doc = {k: v for k, v in GREEDY.items() if k != "stream"}
    code, answer = http_json(
        "POST", replica.url + "/v1/completions", {**doc, **extra, "return_token_ids": True}
    )
    assert code == 200, answer
    ids, prompt = answer["choices"][0]["token_ids"], answer["choices"][0]["prompt_token_ids"]
    half = len(ids) // 2
    rest = {**doc, "prompt": prompt + ids[:half], "max_tokens": len(ids) - half}
    code, free = http_json(
        "POST", replica.url + "/v1/completions", {**rest, "return_token_ids": True}
    )
    assert code == 200, free
    assert free["choices"][0]["token_ids"] != ids[half:], f"{name} does not matter after a cut"


def _in_flight(router_url: str) -> dict[str, int]:
    """Requests in flight per replica, as the router reports them (``/cheapspot/router``)."""
    code, doc = http_json("GET", router_url + "/cheapspot/router", timeout=5)
    assert code == 200, doc
    return {r["name"]: r["in_flight"] for r in doc["replicas"]}


def _status_of(url: str) -> int:
    try:
        return http_json("GET", url, timeout=5)[0]
    except OSError:  # not listening yet
        return 0


def _held_under_way(
    pool: ThreadPoolExecutor,
    streams: Sequence[Callable[[list[str]], None]],
    full: list[str],
    replica: ServeReplica,
    deadline: float,
) -> tuple[list[Future[None]], list[list[str]]]:
    """Start the streams and return them held part-way: the replica frozen (SIGSTOP), every
    byte it had sent received, each stream with some of its text and none with all of it
    (`full`: the undisturbed texts). The caller thaws or kills the replica.

    The replica runs in short bursts between freezes, and after each the test waits for the
    text to stop growing before it looks. Looking at the client alone cannot tell a stream
    part-way: the replica may have sent all of it while the router or the client lagged, and
    vLLM puts the tokens of several steps in one chunk when its server falls behind, so chunk
    counts tell nothing. An attempt in which a stream ended before another began is waited out
    and made again."""
    for _ in range(5):
        got: list[list[str]] = [[] for _ in streams]
        replica.freeze()
        futures = [pool.submit(s, g) for s, g in zip(streams, got, strict=True)]
        try:
            while True:
                assert time.monotonic() < deadline, "the streams did not start"
                replica.thaw()
                time.sleep(0.05)
                replica.freeze()
                sizes = _settled(got)
                if any(f.done() for f in futures) or any(
                    n >= len(ref) for n, ref in zip(sizes, full, strict=True)
                ):
                    break
                if all(sizes):
                    return futures, got
        except BaseException:
            replica.thaw()
            raise
        replica.thaw()
        for f in futures:
            f.result(timeout=300)
    pytest.fail("in 5 tries, one stream had always ended before another began")


def _settled(got: list[list[str]]) -> list[int]:
    """The streams' text sizes once they have not changed for 0.4 s (nothing left in transit
    from a frozen replica)."""
    seen: list[list[int]] = []
    while len(seen) < 3 or seen[-1] != seen[-3]:
        if seen:
            time.sleep(0.2)
        seen.append([len("".join(g)) for g in got])
    return seen[-1]


def test_a_router_sent_sigterm_finishes_its_streams_before_it_exits(
    replicas: list[ServeReplica], tmp_path: Path
) -> None:
    """What a rolling update of the router, or its node drained, does to it: SIGTERM. It turns
    not Ready at once (the Service stops sending it requests) and exits 0 only once the
    streams in flight have ended, each complete and equal to an undisturbed run. The replica
    is frozen from just before the SIGTERM until past the drain's linger, so the streams are
    surely in flight then."""
    long = 200
    linger = 2
    replica = replicas[1]
    asks = [("qa", PROMPTS[0]), ("sums", PROMPTS[1]), ("tiny-qwen2", PROMPTS[3])]

    def stream(base_url: str, model: str, prompt: str, into: list[str]) -> None:
        for c in _client(base_url).completions.create(
            model=model,
            prompt=prompt,
            max_tokens=long,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            if c.choices:
                into.append(c.choices[0].text)

    undisturbed: list[list[str]] = [[] for _ in asks]
    for (model, prompt), out in zip(asks, undisturbed, strict=True):
        stream(replica.url, model, prompt, out)
    full = ["".join(u) for u in undisturbed]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cheapspot = Path(sys.executable).parent / "cheapspot"
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log_file:
        argv = [str(cheapspot), "router", "--replica", replica.url, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--drain-linger-seconds", str(linger)]
        argv += ["--drain-seconds", "120"]
        proc = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while _status_of(url + "/readyz") != 200:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the router never turned Ready"
            time.sleep(0.2)
        streams = [functools.partial(stream, url, m, p) for m, p in asks]
        with ThreadPoolExecutor(len(asks)) as pool:
            futures, got = _held_under_way(pool, streams, full, replica, deadline + 240)
            try:
                # The replica is frozen: what the router has in flight now is what the
                # SIGTERM finds.
                busy = sum(_in_flight(url).values())
                print(f"the router's SIGTERM: {busy} requests in flight")
                proc.send_signal(signal.SIGTERM)
                code, doc = http_json("GET", url + "/readyz", timeout=5)
                time.sleep(linger + 1)
                exited = proc.poll()
                ended = [f.done() for f in futures]
            finally:
                replica.thaw()
            for f in futures:
                f.result(timeout=300)
        assert code == 503 and "shutting down" in doc["reason"], (code, doc)
        assert exited is None, "the router exited with streams in flight:\n" + log_path.read_text()
        assert not any(ended), ended
        assert proc.wait(60) == 0, log_path.read_text()
        assert busy == len(asks), f"{busy} requests in flight at the SIGTERM, not {len(asks)}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ["".join(g).encode() for g in got] == [f.encode() for f in full]
    assert "drained in" in log_path.read_text()


def _served_count(replica: ServeReplica) -> float:
    """Requests the replica's vLLM has finished (its /metrics)."""
    with urllib.request.urlopen(replica.url + "/metrics", timeout=30) as resp:
        return parse_metrics(resp.read().decode()).get("vllm:request_success_total", 0.0)


def test_a_stalled_replica_is_left_within_the_bound_and_used_again_once_it_answers(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    """Replica 1 frozen (SIGSTOP: a hung engine, a node gone silent) with two streams in
    flight on it, far longer than the router's stall bound (3 s here): both streams resume on
    replica 0 while it is still frozen and end byte-equal to the undisturbed answers; a new
    request meanwhile goes to replica 0; once thawed, replica 1 takes requests again."""
    long, bound = 120, 3.0
    survivor, victim = replicas
    rt = router_for([_replica(victim)], first_token_seconds=bound, stall_seconds=bound)
    messages = [{"role": "user", "content": PROMPTS[0]}]

    def text_stream(c: Any, into: list[str]) -> None:
        for chunk in c.completions.create(
            model="qa",
            prompt=PROMPTS[2],
            max_tokens=long,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            if chunk.choices:
                into.append(chunk.choices[0].text)

    def chat_stream(c: Any, into: list[str]) -> None:
        for chunk in c.chat.completions.create(
            model="sums",
            messages=messages,
            max_tokens=long,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            if chunk.choices:
                into.append(chunk.choices[0].delta.content or "")

    full: list[str] = []
    for s in (text_stream, chat_stream):
        out: list[str] = []
        s(_client(survivor.url), out)
        full.append("".join(out))

    client = _client(rt.url)
    with ThreadPoolExecutor(2) as pool:
        streams = [functools.partial(s, client) for s in (text_stream, chat_stream)]
        futures, got = _held_under_way(pool, streams, full, victim, time.monotonic() + 300)
        try:
            cut_at = [len("".join(g)) for g in got]
            _, status = http_json("GET", rt.url + "/cheapspot/router", timeout=10)
            in_flight = {r["name"]: r["in_flight"] for r in status["replicas"]}
            rt.set_replicas([_replica(victim), _replica(survivor)])
            frozen = time.monotonic()
            # The streams end while the victim is still frozen: the bound is 3 s; 120 s is
            # a generous margin for the continuation on a busy two-core machine (without the
            # bound, they would wait for the thaw, which comes only after this).
            for f in futures:
                f.result(timeout=120)
            waited = time.monotonic() - frozen
            during = _complete(rt.url, "qa", PROMPTS[1], tokens=4)
            _, status = http_json("GET", rt.url + "/cheapspot/router", timeout=10)
            stalled = {r["name"]: r["stalled"] for r in status["replicas"]}
        finally:
            victim.thaw()
    assert in_flight[victim.name] == 2, in_flight
    assert all(0 < n < len(f) for n, f in zip(cut_at, full, strict=True)), (cut_at, full)
    assert waited < 120
    assert ["".join(g).encode() for g in got] == [f.encode() for f in full]
    assert during["choices"][0]["text"]  # served while the victim was frozen: by replica 0
    assert stalled == {victim.name: True, survivor.name: False}, stalled
    assert rt.router.stats["stalls"] >= 1 and rt.router.stats["failed"] == 0

    # Thawed: it answers its health check, and takes requests again.
    deadline = time.monotonic() + 120
    while rt.router.replicas.stalled:
        assert time.monotonic() < deadline, "the thawed replica was never used again"
        time.sleep(0.2)
    before = _served_count(victim)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: _complete(rt.url, "qa", p, tokens=40), PROMPTS))
    assert _served_count(victim) > before


def test_a_stream_cut_by_a_sigkill_continues_byte_identical(
    replicas: list[ServeReplica], router_for: Callable[..., RouterThread]
) -> None:
    """Runs last: it kills replica 0. Two streams (completions and chat) start on replica 0
    alone; once both are under way, replica 0 is frozen, replica 1 joins, and replica 0 is
    SIGKILLed: both streams are cut part-way, at a point the test knows."""
    long = 120
    victim, survivor = replicas
    rt = router_for([_replica(victim)])
    client = _client(rt.url)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    finish: dict[str, Any] = {}

    def text_stream(c: Any, into: list[str]) -> None:
        for chunk in c.completions.create(
            model="qa",
            prompt=PROMPTS[2],
            max_tokens=long,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            if chunk.choices:
                into.append(chunk.choices[0].text)
                finish["text"] = chunk.choices[0].finish_reason or finish.get("text")

    def chat_stream(c: Any, into: list[str]) -> None:
        for chunk in c.chat.completions.create(
            model="sums",
            messages=messages,
            max_tokens=long,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            if chunk.choices:
                into.append(chunk.choices[0].delta.content or "")
                finish["chat"] = chunk.choices[0].finish_reason or finish.get("chat")

    direct = _client(survivor.url)
    full: list[str] = []
    for s in (text_stream, chat_stream):
        out: list[str] = []
        s(direct, out)
        full.append("".join(out))
    finish.clear()

    with ThreadPoolExecutor(2) as pool:
        streams = [functools.partial(s, client) for s in (text_stream, chat_stream)]
        futures, got = _held_under_way(pool, streams, full, victim, time.monotonic() + 300)
        cut_at = [len("".join(g)) for g in got]
        # Frozen, the victim ends nothing: what the router has in flight on it is what the
        # SIGKILL cuts.
        busy = _in_flight(rt.url).get(victim.name, 0)
        print(f"the SIGKILL: {victim.name} had {busy} requests in flight")
        rt.set_replicas([_replica(victim), _replica(survivor)])
        victim.kill()
        for f in futures:
            f.result(timeout=300)
    assert busy == 2, f"{victim.name} had {busy} requests in flight when it was killed, not 2"
    assert all(0 < n < len(f) for n, f in zip(cut_at, full, strict=True)), (cut_at, full)
    assert rt.router.stats["resumes"] >= 2 and rt.router.stats["failed"] == 0
    assert ["".join(g).encode() for g in got] == [f.encode() for f in full]
    assert finish == {"text": "length", "chat": "length"}
