"""Who may use a pool, as pure decisions and manifests: the URI allowlist per namespace, the
router's API keys, the replicas' admin token and NetworkPolicy."""

from __future__ import annotations

from pathlib import Path

import pytest

from cheapspot.contract import ADMIN_PORT, ADMIN_TOKEN_ENV, SERVE_PORT
from cheapspot_operator.api.common import CapacityType
from cheapspot_operator.cluster.placement import get_profile
from cheapspot_operator.cluster.pods import Placement
from cheapspot_operator.inferencepool.manifests import (
    API_KEYS_ENV,
    PoolInfo,
    build_admin_secret,
    build_network_policy,
    build_replica_pod,
    build_router_deployment,
)
from cheapspot_operator.inferencepool.tokens import derive_token
from cheapspot_operator.planning.uris import refused_uris, under
from cheapspot_operator.router import keyfile, keys
from cheapspot_operator.runtime.config import OperatorConfig
from cheapspot_operator.testing.pool import make_pool

pytestmark = pytest.mark.unit

# -- the URI allowlist ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "prefix", "inside"),
    [
        ("s3://b/team-a/qa/", "s3://b/team-a/", True),
        ("s3://b/team-a/qa/", "s3://b/team-a", True),
        ("s3://b/team-ab/qa/", "s3://b/team-a", False),  # a prefix ends at a "/"
        ("s3://b/team-a", "s3://b/team-a", True),
        ("hf://org/model", "hf://", True),
        ("file:///data/team-a/../team-b/x", "file:///data/team-a/", False),
        ("s3://b/team-a/./x", "s3://b/team-a/", False),
        ("s3://other/team-a/", "s3://b/team-a/", False),
    ],
)
def test_a_uri_lies_under_a_prefix_only_within_its_path(
    uri: str, prefix: str, inside: bool
) -> None:
    assert under(uri, prefix) is inside


ALLOWED = {"*": ["s3://models/{namespace}/", "hf://"], "research": ["s3://lab/"]}


def test_no_allowlist_sets_no_limit() -> None:
    assert refused_uris("a", {"spec.model.uri": "s3://anything/x/"}, {}) == ""


def test_each_namespace_gets_its_own_prefixes_and_the_star_entry_the_rest() -> None:
    mine = {"spec.model.uri": "hf://org/m", "spec.adapters[qa].uri": "s3://models/team-a/qa/"}
    assert refused_uris("team-a", mine, ALLOWED) == ""
    assert refused_uris("research", {"spec.model.uri": "s3://lab/m/"}, ALLOWED) == ""
    # research's own entry replaces the star entry
    assert "hf://x" in refused_uris("research", {"spec.model.uri": "hf://x"}, ALLOWED)


def test_another_namespaces_adapter_is_refused_naming_the_field_and_the_prefixes() -> None:
    why = refused_uris(
        "team-a",
        {"spec.model.uri": "hf://org/m", "spec.adapters[qa].uri": "s3://models/team-b/qa/"},
        ALLOWED,
    )
    assert why.startswith("spec.adapters[qa].uri s3://models/team-b/qa/: outside")
    assert "s3://models/team-a/, hf://" in why and "allowedUriPrefixes" in why
    assert "spec.model.uri" not in why


def test_a_namespace_without_prefixes_may_use_none() -> None:
    why = refused_uris("x", {"spec.model.uri": "s3://lab/m/"}, {"research": ["s3://lab/"]})
    assert "namespace x may use no storage URI" in why


# -- API keys -------------------------------------------------------------------------------

KEYS = """
keys:
  - name: support
    key: sk-support-0123456789
    models: [qa]
  - name: admin
    key: sk-admin-0123456789ab
"""


def test_keys_authenticate_and_limit_models() -> None:
    ring = keys.parse_keys(KEYS)
    missing = keys.authenticate(ring, "")
    assert isinstance(missing, keys.Denied) and missing.status == 401
    assert missing.error()["error"]["code"] == "missing_api_key"
    wrong = keys.authenticate(ring, "Bearer sk-support-0123456789x")
    assert isinstance(wrong, keys.Denied) and wrong.status == 401
    assert isinstance(keys.authenticate(ring, "Basic sk-support-0123456789"), keys.Denied)
    support = keys.authenticate(ring, "Bearer sk-support-0123456789")
    assert isinstance(support, keys.ApiKey) and support.name == "support"
    assert keys.authorize(support, "qa") is None
    denied = keys.authorize(support, "sums")
    assert denied is not None and denied.status == 403
    assert denied.error()["error"] == {
        "message": "The API key 'support' may not use the model 'sums'.",
        "type": "permission_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    admin = keys.authenticate(ring, "bearer  sk-admin-0123456789ab ")
    assert isinstance(admin, keys.ApiKey) and keys.authorize(admin, "sums") is None
    # a key never shows in a log line
    assert "sk-support" not in repr(support) and "sk-support" not in str(support)


def test_the_model_list_shows_only_what_a_key_may_use() -> None:
    ring = keys.parse_keys(KEYS)
    support = keys.authenticate(ring, "Bearer sk-support-0123456789")
    assert isinstance(support, keys.ApiKey)
    doc = {"object": "list", "data": [{"id": "base"}, {"id": "qa"}, {"id": "sums"}]}
    assert keys.visible_models(doc, support)["data"] == [{"id": "qa"}]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("keys: [{name: a, key: short}]", "keys.0.key"),
        ("keys: [{name: a, key: sk-0123456789abcdef, model: [x]}]", "keys.0.model"),
        (
            "keys: [{name: a, key: sk-0123456789abcdef}, {name: a, key: sk-0123456789abcdeg}]",
            "name must be unique",
        ),
        (
            "keys: [{name: a, key: sk-0123456789abcdef}, {name: b, key: sk-0123456789abcdef}]",
            "share a key",
        ),
        ("keys: [", "not YAML"),
        ("[]", "(top)"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_field_and_never_the_key(
    text: str, says: str
) -> None:
    with pytest.raises(ValueError, match="pool-keys") as err:
        keys.parse_keys(text, "pool-keys")
    assert says in str(err.value)
    assert "sk-0123456789abcdef" not in str(err.value)


# -- manifests ------------------------------------------------------------------------------

POOL = PoolInfo("team-a", "qa", "uid-1", make_pool())
CONFIG = OperatorConfig()


def _placement(capacity: CapacityType = CapacityType.SPOT) -> Placement:
    return Placement(profile=get_profile("local"), capacity=capacity)


def test_replicas_take_their_admin_token_from_the_pools_secret() -> None:
    pod = build_replica_pod(POOL, 0, 0, _placement(), CONFIG.worker, serving=CONFIG.serving)
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env[ADMIN_TOKEN_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "qa-admin", "key": "token"}
    }
    secret = build_admin_secret(POOL, "t0ken")
    assert secret["metadata"]["name"] == "qa-admin"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert secret["stringData"] == {"token": "t0ken"}


def test_the_admin_token_is_stable_per_pool_and_new_for_a_new_pool() -> None:
    key = b"k" * 32
    again = PoolInfo("team-a", "qa", "uid-1", POOL.spec)
    remade = PoolInfo("team-a", "qa", "uid-2", POOL.spec)
    assert derive_token(key, POOL) == derive_token(key, again)
    assert derive_token(key, POOL) != derive_token(key, remade)
    assert derive_token(key, POOL) != derive_token(b"j" * 32, POOL)


def test_the_network_policy_admits_the_pools_routers_and_the_operator_only() -> None:
    policy = build_network_policy(POOL, "cheapspot", {"app.kubernetes.io/name": "cheapspot"})
    spec = policy["spec"]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert spec["podSelector"]["matchLabels"] == {
        "cheapspot.dev/pool": "qa",
        "cheapspot.dev/pool-role": "replica",
    }
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    routers, operator = rule["from"]
    assert routers == {
        "podSelector": {
            "matchLabels": {"cheapspot.dev/pool": "qa", "cheapspot.dev/pool-role": "router"}
        }
    }
    assert operator["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "cheapspot"}
    }
    assert {p["port"] for p in rule["ports"]} == {SERVE_PORT, ADMIN_PORT}
    anywhere = build_network_policy(POOL, "", {"app": "op"})
    assert anywhere["spec"]["ingress"][0]["from"][1]["namespaceSelector"] == {}


def test_the_router_mounts_the_pools_api_keys_only_when_it_has_them() -> None:
    def router(pool: PoolInfo) -> dict[str, object]:
        return build_router_deployment(
            pool, 1, _placement(CapacityType.ON_DEMAND), CONFIG.worker, CONFIG.serving
        )

    plain = router(POOL)["spec"]["template"]["spec"]  # type: ignore[index]
    assert "api-keys" not in {v["name"] for v in plain["volumes"]}
    keyed = PoolInfo(
        "team-a",
        "qa",
        "uid-1",
        make_pool(router={"apiKeys": {"secretName": "qa-keys", "key": "clients.yaml"}}),
    )
    built = router(keyed)
    spec = built["spec"]["template"]["spec"]  # type: ignore[index]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"] == {
        "secretName": "qa-keys",
        "items": [{"key": "clients.yaml", "path": "keys.yaml"}],
    }
    container = spec["containers"][0]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[API_KEYS_ENV] == mount["mountPath"] + "/keys.yaml" and mount["readOnly"]
    # naming another Secret rolls the routers out (the template's hash changes)
    assert built["metadata"]["annotations"] != router(POOL)["metadata"]["annotations"]  # type: ignore[index]


def test_the_keys_file_is_read_again_when_it_changes_and_a_bad_edit_keeps_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keyfile, "KEYS_CHECK_SECONDS", 0.0)
    path = tmp_path / "keys.yaml"
    path.write_text("keys: [{name: a, key: sk-a-0123456789abcdef}]\n")
    watched = keyfile.KeyFile(str(path))
    assert isinstance(
        keys.authenticate(watched.current(), "Bearer sk-a-0123456789abcdef"), keys.ApiKey
    )
    # a different size too: a coarse file clock cannot hide the change
    path.write_text("keys: [{name: bb, key: sk-b-0123456789abcdef}]\n")
    ring = watched.current()
    assert isinstance(keys.authenticate(ring, "Bearer sk-b-0123456789abcdef"), keys.ApiKey)
    assert isinstance(keys.authenticate(ring, "Bearer sk-a-0123456789abcdef"), keys.Denied)
    path.write_text("keys: [{name: c, key: short}]\n")  # refused: b's key stays
    assert isinstance(
        keys.authenticate(watched.current(), "Bearer sk-b-0123456789abcdef"), keys.ApiKey
    )
    path.unlink()  # a Secret's file swapped out: the keys before stay
    assert len(watched.current()) == 1
    path.write_text("keys: [{name: c, key: short}]\n")
    with pytest.raises(ValueError, match=r"keys\.0\.key"):
        keyfile.KeyFile(str(path))  # at start a bad file is an error, not an open router
