"""A budget on the real control plane: the job is suspended at its limit, its pods go, and
raising the limit brings it back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Harness, jobs_path, make_harness, wait_for


@pytest.fixture
def h(local_cluster: Any, s3_endpoint: Any, tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(local_cluster, s3_endpoint, tmp_path)


def test_a_budget_suspends_a_running_job_and_raising_it_resumes(h: Harness) -> None:
    # Each pod pays its share of its node (a GPU of the node's GPUs, the anchor's CPUs): a
    # few cents an hour at table prices. The verdict adds 5 minutes of the running pods'
    # rate to what was spent, so $0.001 is reached as soon as the pods run.
    h.apply("bud", shards=2, budget={"limitUSD": 0.001})
    wait_for(
        "suspended by its budget",
        lambda: h.status("bud").get("phase") == "Suspended",
        timeout_s=180,
    )
    cond = h.condition("bud", "WithinBudget") or {}
    assert (cond["status"], cond["reason"]) == ("False", "BudgetExceeded")
    suspended = h.condition("bud", "Suspended") or {}
    assert (suspended["status"], suspended["reason"]) == ("True", "BudgetExceeded")
    h.wait_event("bud", "BudgetExceeded")
    h.wait_event("bud", "Suspended")
    wait_for("no pods left", lambda: h.live_pods("bud") == [], timeout_s=60)
    assert h.status("bud")["budget"]["exceededAtLimitUSD"] == 0.001

    h.api.merge_patch(jobs_path(h.namespace, "bud"), {"spec": {"budget": {"limitUSD": 50}}})
    wait_for("running again", lambda: h.running_on_nodes("bud", 3), timeout_s=90)
    h.wait_event("bud", "Resumed")
    cond = h.condition("bud", "WithinBudget") or {}
    assert cond["status"] == "True"
