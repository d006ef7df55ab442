"""The router's adapter-version decisions: the version wanted of a name, which replicas may
take it, and that a resumed stream never crosses versions."""

from __future__ import annotations

import asyncio
import time

from cheapspot_operator.router import versions
from cheapspot_operator.router.replicas import ReplicaSet
from cheapspot_operator.router.routing import Load, Replica, choose
from cheapspot_operator.router.versions import Pin, Version, VersionReport

V1 = Version("s3://b/qa/v1/", "sha256:aa")
V2 = Version("s3://b/qa/v2/", "sha256:cc")
NOW = 100.0


def report(
    loaded: Version | None, desired: Version | None, generation: int = 1, at: float = NOW
) -> VersionReport:
    return VersionReport(
        at=at,
        generation=generation,
        loaded={} if loaded is None else {"qa": loaded},
        desired={} if desired is None else {"qa": desired},
    )


def test_a_replica_report_is_read_by_name_uri_and_digest() -> None:
    doc = {
        "ready": True,
        "adapters": [{"name": "qa", "uri": V1.uri, "digest": V1.digest}],
        "desired": {"generation": 3, "adapters": [{"name": "qa", "uri": V2.uri, "digest": ""}]},
    }
    got = versions.parse_report(doc, NOW)
    assert got == VersionReport(NOW, 3, {"qa": V1}, {"qa": Version(V2.uri, "")})
    # an answer without versions (an older replica) is no report
    assert versions.parse_report({"adapters": ["qa"]}, NOW) is None


def test_the_wanted_version_is_the_newest_generations() -> None:
    # r0 has been told v2 (generation 2) and still holds v1: v2 is wanted
    reports = [report(V1, V2, generation=2), report(V1, V1, generation=1)]
    assert versions.wanted(reports) == {"qa": V2}
    # lists of the same generation that disagree: no version is wanted (load alone)
    assert versions.wanted([report(V1, V1), report(V2, V2)]) == {}
    assert versions.wanted([]) == {}


def test_a_name_goes_only_to_replicas_holding_its_wanted_version() -> None:
    names = ["r0", "r1", "r2"]
    # the change announced on r0 (swapping after a settle), r1 not told yet, r2 done
    reports = {"r0": report(V1, V2, 2), "r1": report(V1, V1, 1), "r2": report(V2, V2, 2)}
    assert versions.allowed(names, reports, "qa", NOW) == {"r2"}
    # before any replica holds v2: none (the request waits), never the old version
    reports["r2"] = report(V1, V2, 2)
    assert versions.allowed(names, reports, "qa", NOW) == set()
    # names no replica reports (the base model) go anywhere
    assert versions.allowed(names, reports, "tiny-qwen2", NOW) is None
    # a stale report is not routed by: the replica may have swapped since
    reports = {"r0": report(V2, V2, 2), "r1": report(V2, V2, 2, at=NOW - 10)}
    assert versions.allowed(names, reports, "qa", NOW) == {"r0"}
    # no report at all (replicas without a known admin port): routed by load alone
    assert versions.allowed(names, {}, "qa", NOW) is None


def test_a_resume_goes_only_to_a_replica_holding_the_version_it_started_on() -> None:
    names = ["r0", "r1"]
    reports = {"r0": report(V2, V2, 2), "r1": report(V1, V1, 1)}
    # started on v1: r1 still keeps it (it is not the wanted one any more: no matter)
    assert versions.allowed(names, reports, "qa", NOW, Pin(V1)) == {"r1"}
    assert versions.allowed(names, reports, "qa", NOW, Pin(V2)) == {"r0"}
    # r1 still holds v1 but has announced v2: it may swap any moment, no resume there
    reports["r1"] = report(V1, V2, 2)
    assert versions.allowed(names, reports, "qa", NOW, Pin(V1)) == set()
    reports["r1"] = report(V2, V2, 2)
    assert versions.allowed(names, reports, "qa", NOW, Pin(V1)) == set()
    # the base model: no version either side
    assert versions.allowed(names, reports, "tiny-qwen2", NOW, Pin(None)) == {"r0", "r1"}


def test_choose_takes_only_the_allowed_replicas() -> None:
    reps = [Replica(n, f"10.0.0.{i}", ready=True) for i, n in enumerate("ab")]
    load = Load(in_flight={"a": 5, "b": 0})
    assert choose(reps, "qa", load, capacity=8, only={"a"}) == reps[0]
    assert choose(reps, "qa", load, capacity=8, only=set()) is None
    assert choose(reps, "qa", load, capacity=8) == reps[1]


def test_acquire_refuses_a_resume_at_once_when_no_replica_holds_its_version() -> None:
    async def run() -> tuple[Replica | None, float, Replica | None]:
        rs = ReplicaSet()
        await rs.update([Replica("r0", "10.0.0.1", ready=True, admin_port=1)])
        now = time.monotonic()
        rs.reports["r0"] = report(V2, V2, 2, at=now)
        started = time.monotonic()
        refused = await rs.acquire("qa", set(), started + 30, Pin(V1))
        waited = time.monotonic() - started
        return refused, waited, await rs.acquire("qa", set(), started + 30, Pin(V2))

    refused, waited, taken = asyncio.run(run())
    assert refused is None and waited < 1
    assert taken is not None and taken.name == "r0"
