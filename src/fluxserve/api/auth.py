"""Key authentication for every dialect: ``TT-API-KEY`` (reseller), ``x-key`` (vendor) and
``Authorization: Bearer`` (OpenAI images); one key works in each, with one balance.

Each header is a security scheme, so ``/openapi.json`` says how every route is authenticated.

A key is verified once per request: :func:`verify` keeps its answer in the ASGI scope's state, where the
guard (``api/limits.py``, which checks a submit's key before its body) leaves it for the route. The
dependencies are async so that a key the cache knows costs no thread-pool hop.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from fluxserve.accounts.keys import ApiKey, KeyStore
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import ApiError, OpenAIError
from fluxserve.api.replicate_errors import TITLES, ReplicateError

TT_API_KEY = APIKeyHeader(
    name="TT-API-KEY", scheme_name="TT-API-KEY", description="Your API key.", auto_error=False
)
X_KEY = APIKeyHeader(name="x-key", scheme_name="x-key", description="Your API key.", auto_error=False)
BEARER = HTTPBearer(scheme_name="Bearer", description="Your API key as the bearer token.", auto_error=False)
NO_BEARER = "You didn't provide an API key: send it as 'Authorization: Bearer <key>'"
BAD_BEARER = "Incorrect API key provided"
_VERIFIED = "fluxserve.verified_key"  # the scope state's (token, key or None) of this request


async def verify(scope: MutableMapping[str, Any], keys: KeyStore, token: str) -> ApiKey | None:
    """The live key for ``token``, verified once per request: the answer is kept in the scope's state.
    A key the cache holds is answered on the event loop; otherwise the database is asked in a thread."""
    state = scope.setdefault("state", {})
    known = state.get(_VERIFIED)
    if known is not None and known[0] == token:
        return known[1]  # type: ignore[no-any-return]
    key = keys.cached(token)
    if key is None:
        key = await anyio.to_thread.run_sync(keys.authenticate, token)
    state[_VERIFIED] = (token, key)
    return key


async def reseller_key(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    tt_api_key: Annotated[str | None, Security(TT_API_KEY)] = None,
) -> ApiKey:
    if not tt_api_key:
        raise ApiError(401, "TT-API-KEY header is missing; send your API key in it")
    key = await verify(request.scope, services.keys, tt_api_key)
    if key is None:
        raise ApiError(401, "TT-API-KEY is not a valid API key")
    return key


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def replicate_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` or ``Token <token>`` (Replicate takes both)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() not in ("bearer", "token"):
        return None
    return token.strip() or None


async def bearer_key(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> ApiKey:
    """The OpenAI API answers 401 ``invalid_api_key`` for a missing or wrong key; so do we."""
    if credentials is None or not credentials.credentials:
        raise OpenAIError(401, NO_BEARER, code="invalid_api_key")
    key = await verify(request.scope, services.keys, credentials.credentials)
    if key is None:
        raise OpenAIError(401, BAD_BEARER, code="invalid_api_key")
    return key


async def replicate_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> ApiKey:
    """``Authorization: Bearer <key>`` or ``Token <key>``; 401 for a missing or wrong one, as Replicate."""
    token = replicate_token(request.headers.get("authorization"))
    if token is None:
        raise ReplicateError(
            401, TITLES[401], "You did not pass an authentication token (Authorization: Bearer <key>)"
        )
    key = await verify(request.scope, services.keys, token)
    if key is None:
        raise ReplicateError(401, TITLES[401], "You did not pass a valid authentication token")
    return key
