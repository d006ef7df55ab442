"""Reclaims, a stalled replica and an adapter rollout under steady load: failed and wrong
answers, latency during reclaims, notice to Ready, the router's stall bounds.

    python benchmarks/serving_reclaims.py [--reclaims 20] [--notice 15] [--threads 4]
                                          [--pause 2] [--steady 60] [--stall 30]
                                          [--rollout | --no-rollout]

Starts a private local cluster whose pods run as local processes, its S3 endpoint and
``cheapspot operator``; publishes a tiny Qwen2-architecture model and two LoRA adapters; applies
the example CheapInferencePool shrunk to an on-demand anchor and one spot replica (vLLM on CPU
in the serving environment, ``make serve-venv``) and drives it through its router with the
official ``openai`` client: ``--threads`` clients, streaming and not, base model and adapters,
each pausing ``--pause`` seconds between requests (steady load that leaves the cores room to
start a replacement). After ``--steady`` seconds of load alone it reclaims the spot replica's
node ``--reclaims`` times, every other one with ``--notice`` seconds of notice and the rest
without, each once the pool is whole again (the cloud gives the node back, as an autoscaler
would).

Each reclaim starts once the router has requests in flight on the victim (its count is
recorded). Per reclaim: the time from the reclaim's start (the interruption taint; without notice, the
machine vanishing) to the replacement replica Ready, and the requests that started while the
pool was short of it.

Between reclaims, once each:

* **a stalled replica** (``--stall`` seconds, 0 skips it): the spot replica's processes frozen
  (SIGSTOP to its process group: a hung engine, a machine gone silent) while the router has
  requests in flight on it, thawed after ``--stall`` seconds. The pool's router bounds are
  lowered to ``--first-token-seconds`` / ``--stall-seconds`` (the CRD's defaults are 60 / 20
  s) to keep the run short. Checked: every request in flight at the freeze or started during
  it took at most the larger bound plus the steady phase's longest request, and the thawed
  replica gets requests again.
* **an adapter rollout** (``--rollout``, on by default): a v2 of ``qa`` (another
  random-weight adapter) published under a new URI and the pool's spec patched to it under
  load; the time until every ready replica reports v2 (its admin ``/cheapspot/status``).

Every request is greedy (temperature 0, ``ignore_eos``, 16 tokens), so each (model, prompt,
stream) has one right answer: the one seen in the steady phase (load alone), and for ``qa``
also v2's, asked of each replica directly once the rollout is done. Any other text is a
wrong answer (a spliced or misrouted one). Then: failed or truncated requests and wrong
answers (target 0 of both), p50/p99 latency in the steady phase against the reclaim windows,
as a table and as JSON. The exit status is 1 when a request failed, an answer was wrong or a
bound was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cheapspot_localcluster.inference import Outcome, Pools
    from cheapspot_localcluster.stack import LocalBackend

POOL = "bench"
ROLLED = "qa"
"""The adapter that gets a v2 under load."""
MAX_TOKENS = 16

Key = tuple[str, str, bool]
"""(model, prompt, stream): one greedy request, one right answer (per adapter version)."""


def key(o: Outcome) -> Key:
    return (o.model, o.prompt, o.stream)


def complete(o: Outcome) -> bool:
    return o.ok and o.tokens >= MAX_TOKENS


def references(outcomes: Sequence[Outcome]) -> tuple[dict[Key, str], int]:
    """Each key's answer in the steady phase (the most common, should there be several), and
    how many steady answers differed from it."""
    seen: dict[Key, Counter[str]] = {}
    for o in outcomes:
        if complete(o):
            seen.setdefault(key(o), Counter())[o.text] += 1
    refs = {k: c.most_common(1)[0][0] for k, c in seen.items()}
    return refs, sum(sum(c.values()) - c[refs[k]] for k, c in seen.items())


def judge(
    outcomes: Sequence[Outcome], v1: Mapping[Key, str], v2: Mapping[Key, str]
) -> dict[str, Any]:
    """Wrong answers: a complete answer whose text is neither its key's steady-phase answer
    nor, for the rolled adapter, v2's answer. Keys with no reference are counted apart."""
    wrong: list[Outcome] = []
    unchecked = 0
    for o in outcomes:
        if not complete(o):
            continue
        if key(o) not in v1:
            unchecked += 1
        elif o.text not in (v1[key(o)], v2.get(key(o), v1[key(o)])):
            wrong.append(o)
    return {
        "wrong": len(wrong),
        "unchecked": unchecked,
        "wrong_examples": [
            {"key": list(key(o)), "text": o.text, "expected": v1[key(o)]} for o in wrong[:3]
        ],
    }


def by_version(
    outcomes: Sequence[Outcome], v1: Mapping[Key, str], v2: Mapping[Key, str], done: float
) -> dict[str, int]:
    """The rolled adapter's complete answers by the version that gave them, before and after
    every replica reported v2 (an answer both versions give counts as ``either``)."""
    counts: Counter[str] = Counter()
    for o in outcomes:
        if o.model != ROLLED or not complete(o) or key(o) not in v1:
            continue
        old, new = o.text == v1[key(o)], o.text == v2.get(key(o))
        version = "either" if old and new else "v1" if old else "v2" if new else "other"
        counts[f"{version}_{'after' if o.started >= done else 'before'}"] += 1
    return dict(sorted(counts.items()))


def replica_pid(backend: LocalBackend, pod: str) -> int:
    """The pod's process group (launcher and vLLM) under the local cluster's pod runner."""
    root = backend.cluster.layout.root / "podrunner" / "pods"
    pids = sorted(root.glob(f"{backend.namespace}_{pod}_*/pid"), key=lambda p: p.stat().st_mtime)
    if not pids:
        raise RuntimeError(f"no process for pod {pod}")
    return int(pids[-1].read_text())


def stall(
    backend: LocalBackend, pools: Pools, url: str, hold_s: float, timeout_s: float
) -> dict[str, Any]:
    """Freeze the spot replica while the router has requests in flight on it, for ``hold_s``;
    thaw it and wait until the router sends it requests again."""
    from cheapspot_localcluster.inference import arrivals, busiest, in_flight, router_view
    from cheapspot_localcluster.waiting import wait_for

    spot = set(backend.spot_nodes())
    name = next(
        p["metadata"]["name"]
        for p in pools.ready_replicas(POOL)
        if p["spec"].get("nodeName") in spot
    )
    pid = replica_pid(backend, name)
    for _ in range(20):
        busiest(url, [name], timeout_s)
        os.killpg(pid, signal.SIGSTOP)
        frozen = time.monotonic()
        # Frozen, the replica ends nothing: what the router has on it now is what stalls.
        busy = in_flight(url, name)
        if busy > 0:
            break
        os.killpg(pid, signal.SIGCONT)
    else:
        raise RuntimeError(f"{name} never had a request in flight when frozen")
    try:
        time.sleep(hold_s)
    finally:
        os.killpg(pid, signal.SIGCONT)
    thawed = time.monotonic()
    # Used again: the router no longer counts it stalled, and then its vLLM gets requests it
    # did not have (the router's in-flight count right after the thaw still holds requests
    # sent to it before the router gave up on it, so it proves nothing).
    ip = next(p["status"]["podIP"] for p in pools.pods(POOL) if p["metadata"]["name"] == name)
    try:
        wait_for(
            f"{name} not stalled",
            lambda: not any(r["name"] == name and r.get("stalled") for r in router_view(url)),
            timeout_s,
        )
        time.sleep(2)  # what it had from before the thaw reaches its vLLM's counts
        before = arrivals(ip) or 0
        wait_for(f"{name} used again", lambda: (arrivals(ip) or 0) > before, timeout_s)
        again: float | None = round(time.monotonic() - thawed, 1)
    except TimeoutError:
        again = None
    print(
        f"stall: {name} frozen {hold_s:g}s with {busy} requests in flight; "
        + (f"used again {again}s after the thaw" if again is not None else "never used again")
    )
    return {
        "replica": name,
        "frozen_s": round(thawed - frozen, 1),
        "in_flight_at_freeze": busy,
        "used_again_after_s": again,
        "frozen_at": frozen,
        "thawed_at": thawed,
    }


def admin_status(pod: Mapping[str, Any]) -> dict[str, Any]:
    from cheapspot.contract import ADMIN_PORT

    ip = pod["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:{ADMIN_PORT}/cheapspot/status", timeout=5) as r:
        got: dict[str, Any] = json.loads(r.read())
    return got


def rollout(
    pools: Pools,
    adapters: Mapping[str, str],
    v2_uri: str,
    keys: Sequence[Key],
    timeout_s: float,
) -> tuple[dict[str, Any], dict[Key, str]]:
    """Point the pool's ``qa`` at ``v2_uri``; wait until every ready replica reports it; then
    v2's answer for each of ``keys``, asked of each replica directly (they must agree)."""
    from cheapspot.contract import SERVE_PORT
    from cheapspot_localcluster.inference import ask, client
    from cheapspot_localcluster.waiting import wait_for

    def on_v2(pod: Mapping[str, Any]) -> bool:
        try:
            loaded = admin_status(pod).get("adapters") or []
        except OSError:
            return False
        return any(
            a.get("name") == ROLLED and a.get("uri", "").rstrip("/") == v2_uri.rstrip("/")
            for a in loaded
        )

    def all_on_v2() -> list[dict[str, Any]] | None:
        pods = pools.ready_replicas(POOL)
        return pods if len(pods) >= 2 and all(on_v2(p) for p in pods) else None

    began = time.monotonic()
    pools.patch_spec(
        POOL,
        {
            "adapters": [
                {"name": n, "uri": v2_uri if n == ROLLED else u} for n, u in adapters.items()
            ]
        },
    )
    pods = wait_for(f"every replica on {ROLLED} v2", all_on_v2, timeout_s, poll_s=0.5)
    done = time.monotonic()
    answers: dict[Key, set[str]] = {}
    for pod in pods:
        c = client(f"http://{pod['status']['podIP']}:{SERVE_PORT}/v1")
        for k in keys:
            o = ask(c, ROLLED, k[1], stream=k[2], max_tokens=MAX_TOKENS)
            if not complete(o):
                raise RuntimeError(f"v2 reference {k} from {pod['metadata']['name']}: {o.error}")
            answers.setdefault(k, set()).add(o.text)
    split = {k: sorted(t) for k, t in answers.items() if len(t) > 1}
    if split:
        raise RuntimeError(f"replicas on v2 disagree: {split}")
    print(f"rollout: every replica on {ROLLED} v2 after {done - began:.1f}s")
    return (
        {"to_all_on_v2_s": round(done - began, 1), "replicas": len(pods), "done_at": done},
        {k: next(iter(t)) for k, t in answers.items()},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reclaims", type=int, default=20)
    parser.add_argument("--notice", type=float, default=15.0, help="notice, seconds")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--pause", type=float, default=2.0, help="each client's pause, seconds")
    parser.add_argument("--steady", type=float, default=60.0, help="load alone first, seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="per replacement, seconds")
    parser.add_argument("--stall", type=float, default=30.0, help="freeze, seconds (0: none)")
    parser.add_argument("--first-token-seconds", type=float, default=10.0)
    parser.add_argument("--stall-seconds", type=float, default=5.0)
    parser.add_argument("--rollout", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    from cheapspot_localcluster.demo import quiet_libraries
    from cheapspot_localcluster.inference import (
        SMALL_POOL,
        Load,
        Pools,
        busiest,
        pool_from_example,
        publish_adapters,
    )
    from cheapspot_localcluster.stack import LocalBackend, private_cluster
    from cheapspot_localcluster.trainjobs import deep_merge, publish_materials
    from cheapspot_localcluster.waiting import wait_for

    quiet_libraries()
    workdir = Path(tempfile.mkdtemp(prefix="cheapspot-bench-"))
    cluster = private_cluster(workdir / "cluster")
    rows: list[dict[str, Any]] = []
    stalled: dict[str, Any] = {}
    rolled: dict[str, Any] = {}
    v2: dict[Key, str] = {}
    router = {
        "firstTokenSeconds": args.first_token_seconds,
        "stallSeconds": args.stall_seconds,
    }
    cluster.start(progress=print)
    load: Load | None = None
    backend: LocalBackend | None = None
    try:
        os.environ.update(cluster.s3.env())
        materials = publish_materials(cluster.s3.uri(""), workdir)
        adapters = publish_adapters(
            cluster.s3.uri("pool/"), materials.model_dir, workdir, ["qa", "sums"]
        )
        backend = LocalBackend(cluster, cluster.s3, "bench", workdir / "op", notice_s=15)
        backend.install()
        pools = Pools(cluster.api_client(), backend.namespace)
        overrides = deep_merge(SMALL_POOL, {"router": router})
        pools.apply(pool_from_example(POOL, materials.model_uri, adapters, overrides))
        started = time.monotonic()
        pools.wait_ready(POOL, 2, args.timeout)
        print(f"pool ready (anchor + 1 spot replica) in {time.monotonic() - started:.0f}s")
        url = pools.router_url(POOL)
        base = materials.model_uri.rstrip("/").rsplit("/", 1)[-1]
        load = Load(
            url, [base, *adapters], threads=args.threads, pause_s=args.pause, max_tokens=MAX_TOKENS
        ).start()
        time.sleep(args.steady)
        steady_end = time.monotonic()
        # The stall after the first reclaim, the rollout after the second (or at the end).
        stall_at, rollout_at = min(1, args.reclaims), min(2, args.reclaims)

        for i in range(args.reclaims + 1):
            if i == stall_at and args.stall > 0:
                stalled = stall(backend, pools, url, args.stall, args.timeout)
            if i == rollout_at and args.rollout:
                v2_uri = publish_adapters(
                    cluster.s3.uri("pool/"),
                    materials.model_dir,
                    workdir / "v2",
                    [ROLLED],
                    first_seed=len(adapters) + 1,
                    prefix="adapters-v2",
                )[ROLLED]
                keys = sorted(k for k in {key(o) for o in load.outcomes} if k[0] == ROLLED)
                rolled, v2 = rollout(pools, adapters, v2_uri, keys, args.timeout)
            if i == args.reclaims:
                if i == rollout_at and args.rollout:
                    time.sleep(args.steady)  # answers after the rollout, with no reclaim after it
                break
            notice = args.notice if i % 2 == 0 else 0.0
            spot = set(backend.spot_nodes())
            victim = wait_for(
                "a ready spot replica",
                lambda spot=spot: next(  # type: ignore[misc]
                    (p for p in pools.ready_replicas(POOL) if p["spec"].get("nodeName") in spot),
                    None,
                ),
                args.timeout,
            )
            name, node = victim["metadata"]["name"], victim["spec"]["nodeName"]
            slot = victim["metadata"]["labels"]["cheapspot.dev/replica"]
            # The reclaim starts while the victim serves (fails the run otherwise): a reclaim
            # of an idle replica measures nothing of what the router does with its work.
            _, busy = busiest(url, [name], args.timeout)
            began = time.monotonic()
            reclaim = threading.Thread(target=backend.reclaim, args=(node, notice), daemon=True)
            reclaim.start()

            def replacement_ready(slot: str = slot, name: str = name) -> dict[str, Any] | None:
                for p in pools.ready_replicas(POOL):
                    labels = p["metadata"]["labels"]
                    if labels["cheapspot.dev/replica"] == slot and p["metadata"]["name"] != name:
                        return p
                return None

            wait_for(f"the replacement of {name}", replacement_ready, args.timeout, poll_s=0.2)
            ready_after = time.monotonic() - began
            reclaim.join(300)
            cluster.create_nodes()  # the cloud gives the machine back
            rows.append(
                {
                    "reclaim": i + 1,
                    "notice_s": notice,
                    "replica": name,
                    "victim_in_flight": busy,
                    "to_replacement_ready_s": round(ready_after, 1),
                    "began": began,
                    "ended": time.monotonic(),
                }
            )
            lost = len(load.failed) + len(load.truncated)
            print(
                f"reclaim {i + 1}/{args.reclaims} ({notice:g}s notice): {name} "
                f"({busy} requests in flight) replaced, "
                f"Ready after {ready_after:.1f}s; {len(load.outcomes)} requests, {lost} failed"
            )
        outcomes = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        if backend is not None:
            backend.operator.stop()
        cluster.stop()
    return report(
        outcomes,
        rows=rows,
        stalled=stalled,
        rolled=rolled,
        v2=v2,
        steady_end=steady_end,
        router=router,
    )


def report(
    outcomes: Sequence[Outcome],
    *,
    rows: list[dict[str, Any]],
    stalled: dict[str, Any],
    rolled: dict[str, Any],
    v2: Mapping[Key, str],
    steady_end: float,
    router: Mapping[str, float],
) -> int:
    """The table and the JSON; 1 when a request failed, an answer was wrong or a bound was
    missed."""
    from cheapspot_localcluster.inference import latency_ms

    def during(o: Outcome) -> bool:
        return any(r["began"] <= o.started <= r["ended"] for r in rows)

    steady = [o for o in outcomes if o.started < steady_end]
    reclaiming = [o for o in outcomes if during(o)]
    failed = [o for o in outcomes if not complete(o)]
    v1, steady_disagree = references(steady)
    verdict = judge(outcomes, v1, v2)
    s50, s99 = latency_ms(steady)
    r50, r99 = latency_ms(reclaiming)
    summary: dict[str, Any] = {
        "requests": len(outcomes),
        "failed": len(failed),
        "errors": sorted({o.error for o in failed})[:5],
        **verdict,
        "steady_keys": len(v1),
        "steady_answers_off_reference": steady_disagree,
        "reclaims": len(rows),
        "steady_requests": len(steady),
        "steady_p50_ms": s50,
        "steady_p99_ms": s99,
        "reclaim_requests": len(reclaiming),
        "reclaim_p50_ms": r50,
        "reclaim_p99_ms": r99,
        "router_bounds_s": dict(router),
    }
    bounds_met = True
    if stalled:
        t0, t1 = stalled.pop("frozen_at"), stalled.pop("thawed_at")
        hit = [o for o in outcomes if o.started <= t1 and o.started + o.seconds >= t0]
        normal = max((o.seconds for o in steady if o.ok), default=0.0)
        bound = max(router.values()) + normal
        # The router's bounds are a stream's (a plain completion is silent until whole, so
        # it has none): a plain request on the frozen replica waits for the thaw.
        longest = max((o.seconds for o in hit if o.stream), default=0.0)
        stalled.update(
            requests=len(hit),
            longest_request_s=round(longest, 1),
            longest_any_request_s=round(max((o.seconds for o in hit), default=0.0), 1),
            bound_s=round(bound, 1),
            within_bound=longest <= bound,
        )
        bounds_met = longest <= bound and stalled["used_again_after_s"] is not None
    if rolled:
        done = rolled.pop("done_at")
        rolled["answers"] = by_version(outcomes, v1, v2, done)
        rolled["keys_where_v2_differs"] = sum(1 for k, t in v2.items() if v1.get(k) != t)
        rolled["keys"] = len(v2)
    summary["stall"] = stalled
    summary["rollout"] = rolled
    print(f"{'reclaim':>7} {'notice':>6} {'in flight':>9} {'to Ready':>9}")
    for r in rows:
        print(
            f"{r['reclaim']:>7} {r['notice_s']:>5g}s {r['victim_in_flight']:>9} "
            f"{r['to_replacement_ready_s']:>8.1f}s"
        )
    for kind, pick in (("with_notice", True), ("without_notice", False)):
        secs = [r["to_replacement_ready_s"] for r in rows if (r["notice_s"] > 0) == pick]
        if secs:
            summary[f"{kind}_to_ready_median_s"] = round(statistics.median(secs), 1)
            summary[f"{kind}_to_ready_max_s"] = round(max(secs), 1)
    if stalled:
        print(
            f"stall: {stalled['in_flight_at_freeze']} in flight at the freeze "
            f"({stalled['frozen_s']:g}s; router bounds first token "
            f"{router['firstTokenSeconds']:g}s, stall {router['stallSeconds']:g}s); "
            f"{stalled['requests']} requests in flight or started meanwhile, longest stream "
            f"{stalled['longest_request_s']:g}s (bound {stalled['bound_s']:g}s: the larger "
            f"bound + the steady phase's longest), longest of all "
            f"{stalled['longest_any_request_s']:g}s; used again "
            + (
                f"{stalled['used_again_after_s']:g}s after the thaw"
                if stalled["used_again_after_s"] is not None
                else "NEVER"
            )
        )
    if rolled:
        print(
            f"rollout: every replica on {ROLLED} v2 after {rolled['to_all_on_v2_s']:g}s; "
            f"answers by version {rolled['answers']} (v2 differs from v1 on "
            f"{rolled['keys_where_v2_differs']}/{rolled['keys']} keys)"
        )
    print(
        f"{summary['requests']} requests, {summary['failed']} failed, {summary['wrong']} wrong "
        f"({summary['unchecked']} unchecked); p50/p99 steady "
        f"{s50:.0f}/{s99:.0f} ms, during reclaims {r50:.0f}/{r99:.0f} ms"
    )
    for r in rows:
        del r["began"], r["ended"]
    print(json.dumps({"rows": rows, "summary": summary, "at": time.strftime("%Y-%m-%d")}))
    return 0 if not failed and not verdict["wrong"] and bounds_met else 1


if __name__ == "__main__":
    sys.exit(main())
