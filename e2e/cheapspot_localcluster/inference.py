"""CheapInferencePools on a cluster, for the e2e scenarios and the demo: apply one from the
example, find its router, drive it with the official ``openai`` client under load.

:class:`Load` is a closed-loop load generator: a few client threads send requests back to
back (streaming and not, the base model and adapters, greedy so answers are comparable) and
record every outcome. A request counts as failed when the client raises, and as truncated
when it ends before ``max_tokens`` tokens (``ignore_eos`` makes every answer run to the
limit): the pool's promise is zero of both, whatever happens to replicas meanwhile.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cheapspot.contract import ANNOTATION_DRAINING, ROUTER_PORT, SERVE_PORT
from cheapspot_localcluster.trainjobs import deep_merge, repo_root
from cheapspot_localcluster.waiting import wait_for

GROUP, VERSION, PLURAL = "cheapspot.dev", "v1alpha1", "cheapinferencepools"
EXAMPLE = Path("crds/examples/inference-pool.yaml")
PROMPTS = ("what colour is the sky", "3 plus 4 is", "say hello", "the cat and the dog")

SMALL_POOL: dict[str, Any] = {
    "replicas": 2,
    "anchor": {"replicas": 1},
    "engine": {
        "maxNumSeqs": 16,
        "maxLoras": 4,
        "maxLoraRank": 8,
        "shutdownTimeoutSeconds": 10,
        "args": ["--dtype", "float32"],
    },
    "resources": {"gpu": 1, "cpu": "1", "memory": "2Gi", "instanceTypes": ["g5.xlarge"]},
    "spot": {"fallbackAfterSeconds": 20},
    "router": {"replicas": 1, "maxQueueSeconds": 120},
}
"""The example shrunk to what 2 CPU cores can run: an anchor and one spot replica."""


def pool_from_example(
    name: str, model_uri: str, adapters: dict[str, str], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``crds/examples/inference-pool.yaml`` pointed at the given model and adapters."""
    body: dict[str, Any] = yaml.safe_load((repo_root() / EXAMPLE).read_text())
    body["metadata"] = {"name": name}
    spec: dict[str, Any] = deep_merge(body["spec"], overrides or SMALL_POOL)
    spec["model"] = {"uri": model_uri, "quantization": "none"}
    spec["adapters"] = [{"name": n, "uri": u} for n, u in adapters.items()]
    body["spec"] = spec
    return body


def publish_adapters(
    bucket_uri: str,
    model_dir: Path,
    workdir: Path,
    names: Sequence[str],
    *,
    first_seed: int = 1,
    prefix: str = "adapters",
) -> dict[str, str]:
    """Random-weight PEFT adapters for ``model_dir`` (seeds ``first_seed``, ``first_seed`` +
    1, ...), published with manifests at ``prefix/NAME/`` below ``bucket_uri``; name -> URI.
    Another seed and prefix make a new version of a name (a different adapter, a new URI)."""
    from cheapspot.store import Store
    from cheapspot_worker.tiny import build_adapter

    store = Store(bucket_uri.rstrip("/") + "/")
    out: dict[str, str] = {}
    for seed, name in enumerate(names, start=first_seed):
        directory = build_adapter(workdir / f"adapter-{name}", model_dir, r=4, seed=seed)
        files = {
            p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix != ".md"
        }
        store.publish(f"{prefix}/{name}/", files)
        out[name] = store.uri(f"{prefix}/{name}/")
    return out


class Pools:
    """CheapInferencePools of one namespace, and their pods, through the official client."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.core: Any = client.CoreV1Api(api_client)

    def apply(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, copy.deepcopy(body)
        )

    def get(self, name: str) -> dict[str, Any]:
        got: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return got

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def scale(self, name: str, replicas: int) -> None:
        """Through the scale subresource, as ``kubectl scale`` and an HPA do."""
        self.custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"replicas": replicas}}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def pods(self, name: str, role: str = "replica") -> list[dict[str, Any]]:
        raw = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=f"cheapspot.dev/pool={name},cheapspot.dev/pool-role={role}",
        )
        items: list[dict[str, Any]] = self.api_client.sanitize_for_serialization(raw)["items"]
        return items

    def live_replicas(self, name: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods(name)
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]

    @staticmethod
    def is_ready(pod: dict[str, Any]) -> bool:
        return any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (pod.get("status") or {}).get("conditions") or []
        )

    @staticmethod
    def draining(pod: dict[str, Any]) -> bool:
        return ANNOTATION_DRAINING in ((pod.get("metadata") or {}).get("annotations") or {})

    def ready_replicas(self, name: str) -> list[dict[str, Any]]:
        return [p for p in self.live_replicas(name) if self.is_ready(p) and not self.draining(p)]

    def wait_ready(self, name: str, replicas: int, timeout_s: float = 600) -> dict[str, Any]:
        """Until ``replicas`` replicas are Ready (and the pool says so)."""

        def ready() -> dict[str, Any] | None:
            st = self.status(name)
            ok = (
                len(self.ready_replicas(name)) >= replicas
                and st.get("readyReplicas", 0) >= replicas
            )
            conds = {c["type"]: c["status"] for c in st.get("conditions") or []}
            return st if ok and conds.get("Ready") == "True" else None

        try:
            return wait_for(f"pool {name}: {replicas} replicas ready", ready, timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} ({self.describe(name)})") from None

    def describe(self, name: str) -> str:
        """One line on where the pool stands: its status and its pods' readiness."""
        st = self.status(name)
        ready: dict[str, Any] = next(
            (c for c in st.get("conditions") or [] if c["type"] == "Ready"), {}
        )
        pods = [
            f"{p['metadata']['name']}:{(p.get('status') or {}).get('phase')}"
            + (":ready" if self.is_ready(p) else ":not-ready")
            + (":draining" if self.draining(p) else "")
            for role in ("replica", "router")
            for p in self.pods(name, role=role)
        ]
        return (
            f"status readyReplicas={st.get('readyReplicas', 0)}/{st.get('replicas', 0)}, "
            f"Ready={ready.get('status')} {ready.get('reason')}: {ready.get('message')}; "
            f"pods {' '.join(pods)}"
        )

    def router_url(self, name: str, timeout_s: float = 120) -> str:
        """The OpenAI base URL of a ready router pod (the local cluster has no Service VIPs;
        in a cloud cluster clients use ``status.endpoint``)."""

        def url() -> str | None:
            for pod in self.pods(name, role="router"):
                ip = (pod.get("status") or {}).get("podIP")
                if ip and self.is_ready(pod) and not pod["metadata"].get("deletionTimestamp"):
                    return f"http://{ip}:{ROUTER_PORT}/v1"
            return None

        found = wait_for(f"pool {name}: a ready router", url, timeout_s)
        wait_for(f"router of {name} answering", lambda: _answers(found), 60)
        return found


def _answers(base_url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/models", timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def router_view(base_url: str, timeout: float = 5) -> list[dict[str, Any]]:
    """The replicas as the pool's router sees them (its ``/cheapspot/router`` status): each
    one's ``name`` (the pod's), ``url``, ``ready``, ``draining`` and ``in_flight``."""
    import json
    import urllib.request

    root = base_url.removesuffix("/").removesuffix("/v1")
    with urllib.request.urlopen(root + "/cheapspot/router", timeout=timeout) as r:
        replicas: list[dict[str, Any]] = json.loads(r.read())["replicas"]
    return replicas


def in_flight(base_url: str, name: str) -> int:
    """Requests the router has in flight on replica ``name`` now (0 if it does not know it)."""
    return next((r["in_flight"] for r in router_view(base_url) if r["name"] == name), 0)


def busiest(base_url: str, names: Sequence[str], timeout_s: float = 120) -> tuple[str, int]:
    """The one of ``names`` (replica pods) with the most requests in flight through the router,
    with that count, once one has any: what a test disturbs next, so that the disturbance
    hits work. It polls the router's status page fast (requests under light load last a
    fraction of a second), and the caller disturbs right after, so little can end between."""

    def look() -> tuple[str, int] | None:
        loads = [(r["in_flight"], r["name"]) for r in router_view(base_url) if r["name"] in names]
        top = max(loads, default=(0, ""))
        return (top[1], top[0]) if top[0] > 0 else None

    found: tuple[str, int] = wait_for(
        f"a request in flight on one of {', '.join(names)}", look, timeout_s, poll_s=0.02
    )
    return found


def client(base_url: str, timeout: float = 300) -> Any:
    """The official client, retries off: every failure the pool lets through shows."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)


@dataclass
class Outcome:
    model: str
    prompt: str
    stream: bool
    ok: bool
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    error: str = ""
    started: float = 0.0


def ask(
    c: Any, model: str, prompt: str, *, stream: bool, max_tokens: int, chat: bool = False
) -> Outcome:
    """One greedy request through the client; its text, token count and time."""
    started = time.monotonic()
    out = Outcome(model, prompt, stream, ok=False, started=started)
    extra = {"ignore_eos": True}
    try:
        if chat:
            messages = [{"role": "user", "content": prompt}]
            if stream:
                parts, tokens = [], 0
                for chunk in c.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    extra_body=extra,
                ):
                    if chunk.choices:
                        parts.append(chunk.choices[0].delta.content or "")
                        tokens += 1 if chunk.choices[0].delta.content else 0
                out.text = "".join(parts)
                out.tokens = tokens
            else:
                r = c.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body=extra,
                )
                out.text = r.choices[0].message.content or ""
                out.tokens = r.usage.completion_tokens if r.usage else 0
        elif stream:
            parts = []
            finish = None
            for chunk in c.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body=extra,
            ):
                if chunk.choices:
                    parts.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
            out.text = "".join(parts)
            out.tokens = max_tokens if finish == "length" else 0
        else:
            r = c.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
            )
            out.text = r.choices[0].text
            out.tokens = r.usage.completion_tokens if r.usage else 0
        out.ok = True
    except Exception as exc:  # what the user would see
        out.error = f"{type(exc).__name__}: {exc}"
    out.seconds = time.monotonic() - started
    return out


@dataclass
class Load:
    """Closed-loop load: ``threads`` clients, each sending its next request ``pause_s`` after
    the last one's answer, until :meth:`stop`.

    A pause leaves CPU to the rest of a shared machine: replicas serving back-to-back
    requests on 2 cores starve a new replica's start for many minutes, where on a cluster it
    would start on a machine of its own."""

    base_url: str
    models: Sequence[str]
    threads: int = 4
    max_tokens: int = 16
    pause_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def _run(self, worker: int) -> None:
        c = client(self.base_url)
        n = worker
        while not self._stop.is_set():
            model = self.models[n % len(self.models)]
            prompt = PROMPTS[n % len(PROMPTS)]
            outcome = ask(c, model, prompt, stream=n % 2 == 0, max_tokens=self.max_tokens)
            with self._lock:
                self.outcomes.append(outcome)
            n += self.threads
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def stop(self, timeout_s: float = 300) -> list[Outcome]:
        self._stop.set()
        for t in self._workers:
            t.join(timeout_s)
        return list(self.outcomes)

    def wait_requests(self, n: int, timeout_s: float = 300) -> None:
        wait_for(f"{n} requests done", lambda: len(self.outcomes) >= n, timeout_s)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def truncated(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok and o.tokens < self.max_tokens]


def latency_ms(outcomes: Sequence[Outcome]) -> tuple[float, float]:
    """(p50, p99) of the successful requests' latency, milliseconds."""
    times = sorted(o.seconds * 1000 for o in outcomes if o.ok)
    if not times:
        return 0.0, 0.0
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return round(statistics.median(times), 1), round(p99, 1)


def arrivals(pod_ip: str) -> int | None:
    """Requests that have reached a replica's vLLM so far (finished, whatever the reason, plus
    running and waiting), from its Prometheus ``/metrics``; None when it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{pod_ip}:{SERVE_PORT}/metrics", timeout=2) as resp:
            text = resp.read().decode(errors="replace")
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in (
            "vllm:request_success_total",
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)
