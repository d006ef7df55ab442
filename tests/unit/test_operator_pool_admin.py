"""The replicas' admin client: reports parsed, adapter pushes in the background, one at a time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cheapspot.contract import ADMIN_PORT
from cheapspot_operator.inferencepool.admin import AdminClient
from cheapspot_operator.testing.pool import make_replica

IP = "127.0.9.9"  # a loopback address of its own: nothing else listens there


class FakeReplica(BaseHTTPRequestHandler):
    puts: list[Any] = []
    delay = 1.0
    get_delay = 0.0

    def do_GET(self) -> None:
        time.sleep(FakeReplica.get_delay)
        body = json.dumps(
            {
                "ready": True,
                "adapters": [{"name": "qa", "uri": "s3://a/qa/", "digest": "sha256:ab"}],
                "desired": {"generation": 4, "adapters": []},
                "running": 2,
                "waiting": None,
                "errors": {"sums": "MANIFEST.json not found"},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        FakeReplica.puts.append(json.loads(self.rfile.read(length)))
        time.sleep(FakeReplica.delay)  # fetching and loading takes a while
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def replica() -> Iterator[None]:
    try:
        server = ThreadingHTTPServer((IP, ADMIN_PORT), FakeReplica)
    except OSError as exc:
        pytest.skip(f"cannot listen on {IP}:{ADMIN_PORT}: {exc}")
    FakeReplica.puts = []
    FakeReplica.get_delay = 0.0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield
    server.shutdown()
    server.server_close()


def test_reports_are_read_and_unknown_load_is_not_idle(replica: None) -> None:
    rp = make_replica(1)
    rp = type(rp)(pod=rp.pod, ready=True, ip=IP)
    (report,) = AdminClient().reports([rp], wait_s=5).values()
    assert report.ready and report.adapters == {"qa": "s3://a/qa/"} and report.generation == 4
    assert report.in_flight is None  # waiting unknown: never taken for idle
    assert "MANIFEST.json not found" in report.message


def test_an_adapter_push_does_not_hold_up_reconciling_and_is_not_repeated(replica: None) -> None:
    rp = make_replica(1)
    rp = type(rp)(pod=rp.pod, ready=True, ip=IP)
    admin = AdminClient()
    adapters = [{"name": "qa", "uri": "s3://a/qa/"}]
    started = time.monotonic()
    admin.push_adapters(rp, adapters, 7)
    admin.push_adapters(rp, adapters, 7)  # the next pass, while the first push still loads
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while admin.pushing and time.monotonic() < deadline:
        time.sleep(0.05)
    assert FakeReplica.puts == [{"generation": 7, "adapters": adapters}]


def test_a_slow_replica_does_not_hold_up_a_pass_and_its_answer_counts_for_the_next(
    replica: None,
) -> None:
    rp = make_replica(1)
    rp = type(rp)(pod=rp.pod, ready=True, ip=IP)
    admin = AdminClient()
    FakeReplica.get_delay = 0.6  # a replica busy serving
    started = time.monotonic()
    assert admin.reports([rp], wait_s=0.1) == {}
    assert time.monotonic() - started < 0.5
    time.sleep(0.8)
    (report,) = admin.reports([rp], wait_s=0.1).values()
    assert report.adapters == {"qa": "s3://a/qa/"}
    # Stops answering (gone): its old report is not used.
    FakeReplica.get_delay = 0.0
    gone = type(rp)(pod=rp.pod, ready=True, ip="127.0.9.10")
    admin.reports([gone], wait_s=2)
    assert admin.reports([gone], wait_s=2) == {}
