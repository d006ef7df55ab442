"""The replica's admin port takes changes only from the operator: every request but a GET
(or HEAD) must carry ``Authorization: Bearer <token>``, the pool's admin token
(:data:`~cheapspot.contract.ADMIN_TOKEN_ENV`, from the Secret the operator made for the pool).

GETs stay open: the kubelet's readiness probe (``/cheapspot/ready``) cannot carry a secret
without putting it in the pod spec, and the status says nothing a replica's neighbour could
use to change what it serves. Without a token configured (a replica started by hand) the
port takes any request, and says so once at start.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cheapspot.contract import ADMIN_TOKEN_ENV

log = logging.getLogger("cheapspot_worker.serving")

OPEN_METHODS = frozenset({"GET", "HEAD"})


def authorized(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` (compared in constant
    time, so the answer's timing says nothing about how much of a guess was right)."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def admin_auth(token: str) -> Any:
    """An aiohttp middleware that refuses (401) a changing request without ``token``; ``""``:
    every request passes."""
    from aiohttp import web

    if not token:
        log.warning("no admin token (%s unset): the admin port takes any request", ADMIN_TOKEN_ENV)

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        changes = request.method not in OPEN_METHODS
        if token and changes and not authorized(request.headers.get("Authorization", ""), token):
            return web.json_response(
                {"error": "a change on the admin port needs the pool's admin token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="cheapspot-admin"'},
            )
        return await handler(request)

    return check
