"""The replicas' admin endpoints, as the pool's reconciler uses them.

* **Replica reports**: every running replica's admin endpoint (``GET /cheapspot/status`` on
  :data:`ADMIN_PORT`, pod IP) is read in parallel with a short timeout; a replica that does
  not answer simply has no report (the planner then waits for its deadline).
* **Adapters**: ``PUT /cheapspot/adapters`` with ``{"generation": N, "adapters": [{"name",
  "uri"}, ...]}`` (N: the pool's generation) on
  the admin port, in the background (one at a time per replica; the replica answers once it
  fetched and loaded what is new); it loads and unloads through vLLM's runtime adapter API.
  The push carries the pool's admin token (``Authorization: Bearer``): the replica takes
  changes from nobody else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import urllib3

from cheapspot.contract import ADMIN_PORT
from cheapspot_operator.inferencepool.observed import ReplicaPod, ReplicaReport
from cheapspot_operator.runtime import metrics

log = logging.getLogger("cheapspot.operator.pools")

ADMIN_TIMEOUT = urllib3.Timeout(connect=0.5, read=1.0)
"""A replica that cannot answer this fast is treated as silent for this pass."""
PUSH_TIMEOUT = urllib3.Timeout(connect=1.0, read=300.0)
"""An adapter push returns once the replica fetched and loaded what is new."""
REPORT_WAIT_S = 0.25
"""How long a reconcile waits for fresh reports; slower answers count for the next pass, so
a busy replica never delays the reaction to a reclaim notice."""
REPORT_MAX_AGE_S = 10.0
"""A report older than this is not used (the replica stopped answering)."""


class AdminClient:
    """The replicas' admin endpoints over HTTP (pod IP, :data:`ADMIN_PORT`)."""

    def __init__(self) -> None:
        self.http = urllib3.PoolManager(timeout=ADMIN_TIMEOUT, retries=False)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="replica-status")
        self.pushers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adapter-push")
        self.pushing: set[str] = set()
        self.lock = threading.Lock()
        self.asking: dict[str, Future[None]] = {}
        self.latest: dict[str, tuple[float, ReplicaReport]] = {}

    def _url(self, rp: ReplicaPod, path: str) -> str:
        return f"http://{rp.ip}:{ADMIN_PORT}{path}"

    def report(self, rp: ReplicaPod) -> ReplicaReport | None:
        try:
            response = self.http.request("GET", self._url(rp, "/cheapspot/status"))
            data = json.loads(response.data or b"{}")
        except (urllib3.exceptions.HTTPError, ValueError, OSError):
            return None
        if not isinstance(data, dict):
            return None
        return ReplicaReport.from_json(data)

    def reports(
        self, replicas: Sequence[ReplicaPod], wait_s: float = REPORT_WAIT_S
    ) -> Mapping[str, ReplicaReport]:
        """The newest report of each running replica: asked now, waited for ``wait_s`` at
        most; an answer still on its way is used by the next pass."""
        asked = [rp for rp in replicas if rp.ip and rp.live and rp.pod.phase == "Running"]
        pending = []
        with self.lock:
            for rp in asked:
                future = self.asking.get(rp.name)
                if future is None or future.done():
                    future = self.pool.submit(self._refresh, rp)
                    self.asking[rp.name] = future
                pending.append(future)
        wait(pending, timeout=wait_s)
        now = time.monotonic()
        with self.lock:
            names = {rp.name for rp in asked}
            for gone in [n for n in self.latest if n not in names]:
                if now - self.latest[gone][0] > REPORT_MAX_AGE_S:
                    del self.latest[gone]
                    self.asking.pop(gone, None)
            return {
                rp.name: got[1]
                for rp in asked
                if (got := self.latest.get(rp.name)) and now - got[0] <= REPORT_MAX_AGE_S
            }

    def _refresh(self, rp: ReplicaPod) -> None:
        report = self.report(rp)
        with self.lock:
            if report is None:
                self.latest.pop(rp.name, None)  # not answering: no stale report stands in
            else:
                self.latest[rp.name] = (time.monotonic(), report)

    def push_adapters(
        self,
        rp: ReplicaPod,
        adapters: Sequence[Mapping[str, str]],
        generation: int = 0,
        token: str = "",
    ) -> None:
        """Start pushing the adapter list to ``rp`` in the background (the replica fetches
        and loads new adapters before it answers, which can take a while); a push already
        under way for the same pod is not repeated. Reconciliation never waits for it: the
        replica's next report says whether it took. ``token``: the pool's admin token, which
        the replica asks of every change."""
        with self.lock:
            if rp.name in self.pushing:
                return
            self.pushing.add(rp.name)
        self.pushers.submit(self._push, rp, list(adapters), generation, token)

    def _push(
        self, rp: ReplicaPod, adapters: list[Mapping[str, str]], generation: int, token: str
    ) -> None:
        body = json.dumps({"generation": generation, "adapters": adapters}).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = self.http.request(
                "PUT",
                self._url(rp, "/cheapspot/adapters"),
                body=body,
                headers=headers,
                timeout=PUSH_TIMEOUT,
            )
            ok = response.status < 300
            metrics.ADAPTER_SYNCS.labels(result="ok" if ok else "error").inc()
            if not ok:
                log.warning(
                    "PUT adapters on %s: HTTP %d: %s",
                    rp.name,
                    response.status,
                    response.data[:300].decode(errors="replace"),
                )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            metrics.ADAPTER_SYNCS.labels(result="error").inc()
            log.warning("cannot push adapters to %s: %s", rp.name, exc)
        finally:
            with self.lock:
                self.pushing.discard(rp.name)
