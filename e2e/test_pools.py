"""CheapInferencePools end to end: the operator, the router and vLLM replicas (the worker's
serve role in the serving environment) as local processes, the ``openai`` client in front.

One pool (the example, shrunk: an on-demand anchor and one spot replica) serves the whole
module, so the machine runs two or three vLLM processes at a time. The promise under test:
zero failed or truncated responses whatever happens to the replicas, every response parsed
by the official client.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cheapspot_localcluster.inference import (
    Load,
    Pools,
    arrivals,
    ask,
    busiest,
    client,
    in_flight,
    pool_from_example,
    publish_adapters,
    router_view,
)
from cheapspot_localcluster.stack import Backend
from cheapspot_localcluster.trainjobs import Materials
from cheapspot_localcluster.waiting import wait_for

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / ".venv-serve" / "bin" / "python").exists()
    and not os.environ.get("CHEAPSPOT_SERVE_VENV"),
    reason="no serving environment (make serve-venv)",
)

ADAPTERS = ("qa", "sums")
LATE_ADAPTER = "late"
START_TIMEOUT_S = 600
LOAD_PAUSE_S = 2.0
"""Each load thread's pause between requests: steady load that leaves the 2 cores room to start
a new replica (back-to-back requests starved one for 9 minutes)."""


@dataclass
class Served:
    backend: Backend
    pools: Pools
    name: str
    base: str
    url: str
    adapter_uris: dict[str, str]


@pytest.fixture(scope="module")
def served(
    backend: Backend, materials: Materials, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    if backend.name != "local":
        pytest.skip("pools on kind need the serving image built (local cluster only for now)")
    workdir = tmp_path_factory.mktemp("pool-adapters")
    bucket = backend.s3.uri(f"pools-{uuid.uuid4().hex[:6]}/")
    uris = publish_adapters(bucket, materials.model_dir, workdir, [*ADAPTERS, LATE_ADAPTER])
    pools = Pools(backend.api_client(), backend.namespace)  # type: ignore[attr-defined]
    name = "serve"
    body = pool_from_example(name, materials.model_uri, {a: uris[a] for a in ADAPTERS})
    pools.apply(body)
    pools.wait_ready(name, 2, START_TIMEOUT_S)
    url = pools.router_url(name)
    base = materials.model_uri.rstrip("/").rsplit("/", 1)[-1]
    yield Served(backend, pools, name, base, url, uris)
    pools.delete(name)


@pytest.fixture(autouse=True)
def restored(backend: Backend) -> Iterator[None]:
    backend.restore()
    yield
    backend.restore()


def _assert_clean(load: Load) -> None:
    assert load.outcomes, "no request was sent"
    assert load.failed == [], [o.error for o in load.failed][:5]
    assert load.truncated == [], [(o.model, o.tokens) for o in load.truncated][:5]


def _spot_replica(s: Served) -> dict[str, Any]:
    nodes = s.backend.spot_nodes()
    return wait_for(
        "a ready spot replica",
        lambda: next(
            (p for p in s.pools.ready_replicas(s.name) if p["spec"].get("nodeName") in nodes),
            None,
        ),
        START_TIMEOUT_S,
    )


def _hit(s: Served, names: list[str], what: str) -> tuple[str, int]:
    """The busiest of ``names`` once the router has requests in flight on it, printed: the
    replica a test then disturbs (``what``), right away, so that the disturbance hits work
    rather than an idle replica."""
    victim, busy = busiest(s.url, names)
    print(f"{what}: {victim} had {busy} requests in flight")
    return victim, busy


def _uids(s: Served) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in s.pools.live_replicas(s.name)}


def test_an_adapter_added_to_a_running_pool_is_served_without_a_restart(served: Served) -> None:
    s = served
    c = client(s.url)
    before = _uids(s)
    unknown = ask(c, LATE_ADAPTER, "say hello", stream=False, max_tokens=4)
    assert not unknown.ok and "NotFoundError" in unknown.error, unknown.error
    adapters = [{"name": a, "uri": s.adapter_uris[a]} for a in (*ADAPTERS, LATE_ADAPTER)]
    s.pools.patch_spec(s.name, {"adapters": adapters})

    def served_everywhere() -> bool:
        models = {m.id for m in c.models.list().data}
        return LATE_ADAPTER in models and all(
            ask(c, LATE_ADAPTER, "say hello", stream=False, max_tokens=4).ok for _ in range(4)
        )

    wait_for("the new adapter served", served_everywhere, 180, poll_s=1)
    for stream in (False, True):
        got = ask(c, LATE_ADAPTER, "3 plus 4 is", stream=stream, max_tokens=8)
        assert got.ok and got.tokens == 8, got.error
    assert _uids(s) == before, "a replica was restarted to load the adapter"
    nope = ask(c, "no-such-adapter", "say hello", stream=False, max_tokens=4)
    assert not nope.ok and "NotFoundError" in nope.error


def test_kubectl_scale_up_and_down_under_load(served: Served) -> None:
    s = served
    load = Load(s.url, [s.base, *ADAPTERS], threads=3, pause_s=LOAD_PAUSE_S).start()
    try:
        load.wait_requests(6)
        s.pools.scale(s.name, 3)
        s.pools.wait_ready(s.name, 3, START_TIMEOUT_S)
        assert s.pools.status(s.name)["replicas"] == 3
        served_before = len(load.outcomes)
        load.wait_requests(served_before + 6)
        s.pools.scale(s.name, 2)
        wait_for(
            "back to 2 replicas",
            lambda: (
                len(s.pools.live_replicas(s.name)) == 2
                and s.pools.status(s.name).get("replicas") == 2
            ),
            120,
        )
        load.wait_requests(len(load.outcomes) + 6)
    finally:
        load.stop()
        s.pools.scale(s.name, 2)  # even after a failure: the next scenario starts from 2
    _assert_clean(load)
    anchor = [
        p
        for p in s.pools.live_replicas(s.name)
        if p["metadata"]["labels"]["cheapspot.dev/replica"] == "0"
    ]
    assert len(anchor) == 1, "the anchor was scaled away"


DRAIN_NOTICE_SECONDS = 15


def test_a_reclaim_with_notice_under_load_loses_nothing(served: Served) -> None:
    s = served
    victim = _spot_replica(s)
    name, node, ip = (
        victim["metadata"]["name"],
        victim["spec"]["nodeName"],
        victim["status"]["podIP"],
    )
    slot = victim["metadata"]["labels"]["cheapspot.dev/replica"]
    load = Load(s.url, [s.base, *ADAPTERS], threads=4, pause_s=LOAD_PAUSE_S).start()
    reclaim: threading.Thread | None = None
    try:
        load.wait_requests(8)
        # The notice lands while the victim serves: a reclaim of an idle replica loses
        # nothing whatever the drain does.
        _, busy = _hit(s, [name], "the reclaim notice")
        noticed = time.monotonic()
        # A longer notice than the other scenarios': on a busy machine the mark may take a few
        # seconds, and the replica must still be up a second after it to be sampled.
        reclaim = threading.Thread(target=s.backend.reclaim, args=(node, DRAIN_NOTICE_SECONDS))
        reclaim.start()

        def replacement() -> dict[str, Any] | None:
            for p in s.pools.live_replicas(s.name):
                labels = p["metadata"]["labels"]
                if labels["cheapspot.dev/replica"] == slot and p["metadata"]["name"] != name:
                    return p
            return None

        wait_for("the replacement pod", replacement, DRAIN_NOTICE_SECONDS, poll_s=0.05)
        created_after = time.monotonic() - noticed
        # The router has seen the mark within a second; from then on nothing new arrives.
        marked = wait_for(
            "the victim marked draining",
            lambda: next(
                (
                    p
                    for p in s.pools.pods(s.name)
                    if p["metadata"]["name"] == name and Pools.draining(p)
                ),
                None,
            ),
            10,
            poll_s=0.05,
        )
        assert marked
        marked_after = time.monotonic() - noticed
        time.sleep(1.0)
        # A replica busy with the load may miss one metrics read; it is gone only if it misses three.
        first = next((n for n in (arrivals(ip) for _ in range(3)) if n is not None), None)
        last = first
        while (n := arrivals(ip)) is not None:
            last = n
            time.sleep(0.2)
        reclaim.join(120)
        s.pools.wait_ready(s.name, 2, START_TIMEOUT_S)
        load.wait_requests(len(load.outcomes) + 8)
    finally:
        load.stop()
        if reclaim is not None:
            reclaim.join(120)
    _assert_clean(load)
    # Made before the break: the replacement exists while the doomed node still serves. How
    # fast is a benchmark's figure (benchmarks/operator_reclaim.py), not a timed assertion.
    assert created_after < DRAIN_NOTICE_SECONDS, (
        f"replacement created {created_after:.2f}s after the notice, "
        f"not within its {DRAIN_NOTICE_SECONDS}s"
    )
    assert first is not None, (
        f"the replica no longer answered a second after it was marked draining "
        f"({marked_after:.2f}s into a {DRAIN_NOTICE_SECONDS}s notice)"
    )
    assert last == first, (
        f"{(last or 0) - first} requests reached the replica after it was marked draining"
    )
    assert s.pools.status(s.name)["preemptions"] >= 1
    assert busy > 0


def test_a_replica_sigkilled_mid_stream_resumes_byte_identical(served: Served) -> None:
    s = served
    c = client(s.url)
    tokens, prompt = 200, "the cat and the dog"
    undisturbed = ask(c, ADAPTERS[0], prompt, stream=False, max_tokens=tokens)
    assert undisturbed.ok, undisturbed.error
    chunks: list[str] = []
    finish: list[str] = []
    errors: list[str] = []

    def stream() -> None:
        for seen in (chunks, finish, errors):
            seen.clear()
        try:
            for chunk in c.completions.create(
                model=ADAPTERS[0],
                prompt=prompt,
                max_tokens=tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                if chunk.choices:
                    chunks.append(chunk.choices[0].text)
                    if chunk.choices[0].finish_reason:
                        finish.append(chunk.choices[0].finish_reason)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    # The stream under way, then the replica the router has it on, frozen (SIGSTOP) so the
    # stream holds where it is, then SIGKILLed. On an idle replica 200 tokens take about a
    # second: a stream that ended (or had all its text) before its replica was frozen is sent
    # again, rather than the test failing on the timing. Text, not chunks, measures progress:
    # vLLM merges the tokens of several steps into one chunk when its server falls behind.
    def text() -> str:
        return "".join(chunks)

    victim, cut_at, busy = None, 0, 0
    for _ in range(5):
        t = threading.Thread(target=stream)
        t.start()
        wait_for(
            "the stream under way",
            lambda t=t: bool(text()) or not t.is_alive(),  # type: ignore[misc]
            60,
            poll_s=0.01,
        )
        while t.is_alive() and victim is None:
            victim = _busy_replica(s)
        if victim is not None:
            pid = _replica_pid(s, victim)
            os.killpg(pid, signal.SIGSTOP)
            cut_at = len(text())
            # Frozen, the replica ends nothing: what the router has in flight on it now is
            # what the SIGKILL cuts.
            busy = in_flight(s.url, victim)
            if t.is_alive() and cut_at < len(undisturbed.text) and busy > 0:
                print(f"the SIGKILL: {victim} had {busy} requests in flight")
                os.killpg(pid, signal.SIGKILL)
                break
            os.killpg(pid, signal.SIGCONT)
            victim = None
        t.join(300)
    assert victim is not None, "no stream was caught under way on a replica in five tries"
    assert busy > 0, f"{victim} had no request in flight when it was SIGKILLed"
    t.join(300)
    assert errors == []
    assert 0 < cut_at < len(undisturbed.text), (cut_at, undisturbed.text)
    assert finish == ["length"]
    assert text().encode() == undisturbed.text.encode()
    s.pools.wait_ready(s.name, 2, START_TIMEOUT_S)


def _busy_replica(s: Served) -> str | None:
    """The replica the router has a request in flight on (its /cheapspot/router status)."""
    busy = [rep["name"] for rep in router_view(s.url, timeout=2) if rep["in_flight"] > 0]
    return busy[0] if len(busy) == 1 else None


def _replica_pid(s: Served, pod: str) -> int:
    """The pod's process group (launcher and vLLM) under the local cluster's pod runner."""
    root = s.backend.cluster.layout.root / "podrunner" / "pods"  # type: ignore[attr-defined]
    pids = sorted(root.glob(f"{s.backend.namespace}_{pod}_*/pid"))  # type: ignore[attr-defined]
    assert pids, f"no process for {pod}"
    return int(pids[-1].read_text())


def _sigkill(s: Served, pod: str) -> None:
    """SIGKILL the pod's whole process group: no notice at all."""
    os.killpg(_replica_pid(s, pod), signal.SIGKILL)


def _condition(s: Served, type_: str) -> dict[str, Any] | None:
    return next(
        (c for c in s.pools.status(s.name).get("conditions") or [] if c["type"] == type_), None
    )


def test_spot_off_falls_back_to_on_demand_and_spot_on_returns_under_load(served: Served) -> None:
    s = served
    spot = set(s.backend.spot_nodes())
    load = Load(s.url, [s.base, *ADAPTERS], threads=3, pause_s=LOAD_PAUSE_S).start()
    try:
        load.wait_requests(6)
        on_spot_now = [
            p["metadata"]["name"]
            for p in s.pools.ready_replicas(s.name)
            if p["spec"].get("nodeName") in spot
        ]
        _, busy = _hit(s, on_spot_now, "spot off")
        s.backend.spot_off()  # every spot node gone at once, without notice
        cond = wait_for(
            "SpotUnavailable",
            lambda: (c := _condition(s, "SpotUnavailable")) and c["status"] == "True" and c,
            START_TIMEOUT_S,
        )
        assert cond["reason"] == "FellBackToOnDemand"
        s.pools.wait_ready(s.name, 2, START_TIMEOUT_S)
        on_spot = [p for p in s.pools.live_replicas(s.name) if p["spec"].get("nodeName") in spot]
        assert on_spot == [], "a replica is still placed on a reclaimed spot node"
        load.wait_requests(len(load.outcomes) + 6)

        s.backend.spot_on()
        spot = set(s.backend.spot_nodes())
        wait_for(
            "a ready replica back on spot, the on-demand fallback drained",
            lambda: (
                len(ready := s.pools.ready_replicas(s.name)) == 2
                and sum(p["spec"].get("nodeName") in spot for p in ready) == 1
                and len(s.pools.live_replicas(s.name)) == 2
            ),
            START_TIMEOUT_S,
        )
        wait_for(
            "SpotUnavailable cleared",
            lambda: (c := _condition(s, "SpotUnavailable")) and c["status"] == "False",
            60,
        )
        load.wait_requests(len(load.outcomes) + 6)
    finally:
        load.stop()
    _assert_clean(load)
    assert busy > 0


def test_an_operator_killed_during_a_drain_under_load_loses_nothing(served: Served) -> None:
    s = served
    victim = _spot_replica(s)
    name, node = victim["metadata"]["name"], victim["spec"]["nodeName"]
    slot = victim["metadata"]["labels"]["cheapspot.dev/replica"]
    load = Load(s.url, [s.base, *ADAPTERS], threads=3, pause_s=LOAD_PAUSE_S).start()
    reclaim: threading.Thread | None = None
    try:
        load.wait_requests(6)
        _, busy = _hit(s, [name], "the reclaim notice")
        reclaim = _drain(s, node, name)
        s.backend.kill_operator()
        time.sleep(1)
        s.backend.start_operator()
        reclaim.join(180)
        s.pools.wait_ready(s.name, 2, START_TIMEOUT_S)
        load.wait_requests(len(load.outcomes) + 6)
    finally:
        load.stop()
        if reclaim is not None:
            reclaim.join(180)
    _assert_clean(load)
    _assert_one_replacement(s, slot, name)
    assert busy > 0


def test_a_router_killed_during_a_drain_costs_only_its_own_outage(served: Served) -> None:
    """The router SIGKILLed while a replica drains. Its pod's container is restarted in place
    (as kubelet does: the same pod and IP) and turns Ready once it has listed the replica
    pods; the drain goes on with one replacement, the restarted router never sends to the
    draining replica, and every request started once it is back succeeds. What fails is what
    the dead router held or was sent while it was down: with one router replica that outage
    is the cost, which router.replicas >= 2 behind the Service avoids."""
    s = served
    victim = _spot_replica(s)
    name, node = victim["metadata"]["name"], victim["spec"]["nodeName"]
    slot = victim["metadata"]["labels"]["cheapspot.dev/replica"]
    (router,) = [
        p for p in s.pools.pods(s.name, role="router") if not p["metadata"].get("deletionTimestamp")
    ]
    router_name, router_ip = router["metadata"]["name"], router["status"]["podIP"]
    preempted = s.pools.status(s.name).get("preemptions", 0)
    load = Load(s.url, [s.base, *ADAPTERS], threads=3, pause_s=LOAD_PAUSE_S).start()
    reclaim: threading.Thread | None = None
    try:
        load.wait_requests(6)
        _, busy = _hit(s, [name], "the reclaim notice")
        reclaim = _drain(s, node, name)
        killed = time.monotonic()
        _sigkill(s, router_name)

        def back() -> dict[str, Any] | None:
            for p in s.pools.pods(s.name, role="router"):
                statuses = p["status"].get("containerStatuses") or [{}]
                if Pools.is_ready(p) and statuses[0].get("restartCount", 0) >= 1:
                    return p
            return None

        again = wait_for("the router restarted and Ready", back, 120)
        returned = time.monotonic()
        assert (again["metadata"]["name"], again["status"]["podIP"]) == (router_name, router_ip)
        seen = router_view(s.url)
        assert all(r["draining"] for r in seen if r["name"] == name), seen
        reclaim.join(180)
        s.pools.wait_ready(s.name, 2, START_TIMEOUT_S)
        load.wait_requests(len(load.outcomes) + 8)
    finally:
        load.stop()
        if reclaim is not None:
            reclaim.join(180)
    assert s.pools.status(s.name)["preemptions"] == preempted + 1
    _assert_one_replacement(s, slot, name)
    bad = load.failed + load.truncated
    outside = [o for o in bad if not (o.started <= returned and o.started + o.seconds >= killed)]
    assert outside == [], [(o.model, o.error) for o in outside][:5]
    after = [o for o in load.outcomes if o.started > returned]
    assert len(after) >= 8 and all(o.ok for o in after)
    assert busy > 0


def _drain(s: Served, node: str, name: str) -> threading.Thread:
    """Reclaim ``node`` with notice in a thread; returns once its replica ``name`` is marked
    draining."""
    reclaim = threading.Thread(target=s.backend.reclaim, args=(node, DRAIN_NOTICE_SECONDS))
    reclaim.start()
    wait_for(
        "the victim marked draining",
        lambda: any(
            p["metadata"]["name"] == name and Pools.draining(p) for p in s.pools.pods(s.name)
        ),
        DRAIN_NOTICE_SECONDS,
        poll_s=0.05,
    )
    return reclaim


def _assert_one_replacement(s: Served, slot: str, name: str) -> None:
    slot_pods = [
        p["metadata"]["name"]
        for p in s.pools.pods(s.name)
        if p["metadata"]["labels"]["cheapspot.dev/replica"] == slot
    ]
    assert len(slot_pods) == 1 and slot_pods != [name], (
        f"slot {slot} after the drain: {slot_pods} (one replacement expected)"
    )
