"""The pool's API keys, read and checked as pure functions: who may send a request, and which
models (the base model's names and the adapters) each key may use.

The keys come from a YAML document (the pool's ``spec.router.apiKeys`` Secret, mounted into
the router pods)::

    keys:
      - name: support-team          # for the logs; never the key itself
        key: sk-...                 # the bearer token clients send (16 characters at least)
        models: [support-bot]       # the names it may use; absent: every model of the pool

A request without ``Authorization: Bearer <key>`` or with an unknown key is refused with 401;
one for a model its key may not use with 403; both in OpenAI's error shape. Keys are looked up
by their SHA-256, so no comparison runs over the key itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MIN_KEY_LENGTH = 16


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=253, description="For the logs.")]
    key: Annotated[
        str,
        Field(
            min_length=MIN_KEY_LENGTH,
            max_length=4096,
            pattern=r"^[!-~]+$",
            description="The bearer token (printable ASCII, no spaces).",
        ),
    ]
    models: Annotated[
        tuple[str, ...] | None,
        Field(description="The model names this key may use; absent: every one."),
    ] = None

    def __repr__(self) -> str:  # never the key in a log line or a traceback
        return f"ApiKey(name={self.name!r}, models={self.models!r})"

    __str__ = __repr__


class KeysDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[ApiKey]

    @model_validator(mode="after")
    def _unique(self) -> KeysDocument:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"keys[].name must be unique: {sorted(names)}")
        if len({k.key for k in self.keys}) != len(self.keys):
            raise ValueError("keys[].key must be unique (two entries share a key)")
        return self


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """The keys by their SHA-256."""

    by_digest: Mapping[str, ApiKey]

    def __len__(self) -> int:
        return len(self.by_digest)


def parse_keys(text: str, source: str = "the keys file") -> KeyRing:
    """The keys of a YAML document; ValueError naming ``source`` and the field otherwise."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not YAML: {exc}") from exc
    try:
        doc = KeysDocument.model_validate(raw)
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise ValueError(f"{source}: {where}") from None
    return KeyRing({_digest(k.key): k for k in doc.keys})


@dataclass(frozen=True)
class Denied:
    """A request refused for who sent it: 401 (no or an unknown key) or 403 (a model its
    key may not use)."""

    status: int
    message: str
    code: str
    param: str | None = None

    def error(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status == 401 else "permission_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        }


def authenticate(ring: KeyRing, authorization: str) -> ApiKey | Denied:
    """The key an ``Authorization`` header value carries, or 401."""
    scheme, _, given = authorization.strip().partition(" ")
    if not authorization or scheme.lower() != "bearer" or not given.strip():
        return Denied(
            401,
            "You didn't provide an API key. This endpoint needs one of the pool's keys in "
            "an Authorization header: 'Authorization: Bearer YOUR_KEY'.",
            "missing_api_key",
        )
    key = ring.by_digest.get(_digest(given.strip()))
    if key is None:
        return Denied(401, "Incorrect API key provided.", "invalid_api_key")
    return key


def authorize(key: ApiKey, model: str) -> Denied | None:
    """None if ``key`` may use ``model``, else 403 naming the model."""
    if key.models is None or model in key.models:
        return None
    return Denied(
        403,
        f"The API key {key.name!r} may not use the model {model!r}.",
        "model_not_allowed",
        "model",
    )


def visible_models(doc: Any, key: ApiKey) -> Any:
    """A ``/v1/models`` answer with only the models ``key`` may use."""
    if key.models is None or not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return doc
    allowed = set(key.models)
    return {
        **doc,
        "data": [m for m in doc["data"] if isinstance(m, dict) and m.get("id") in allowed],
    }
