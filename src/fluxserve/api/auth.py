"""Key authentication for every surface: ``TT-API-KEY`` (reseller), ``x-key`` (vendor) and
``Authorization: Bearer`` (OpenAI images; Replicate's takes ``Token`` too); one key works in each, with one
balance. A missing or unknown key raises ``errors.KeyRefused``, which the request's surface words
(``surfaces/``).

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
from fluxserve.errors import KeyRefused
from fluxserve.surfaces.base import Surface
from fluxserve.surfaces.openai import OPENAI
from fluxserve.surfaces.replicate import REPLICATE
from fluxserve.surfaces.reseller import RESELLER
from fluxserve.surfaces.vendor import VENDOR

TT_API_KEY = APIKeyHeader(
    name="TT-API-KEY", scheme_name="TT-API-KEY", description="Your API key.", auto_error=False
)
X_KEY = APIKeyHeader(name="x-key", scheme_name="x-key", description="Your API key.", auto_error=False)
BEARER = HTTPBearer(scheme_name="Bearer", description="Your API key as the bearer token.", auto_error=False)
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


async def authenticated(request: Request, keys: KeyStore, surface: Surface, token: str | None) -> ApiKey:
    """The live key for ``token``, else the surface's refusal (401, the vendor's 403)."""
    key = await verify(request.scope, keys, token) if token else None
    if key is None:
        raise KeyRefused(missing=not token, status_code=surface.auth_status)
    return key


async def reseller_key(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    tt_api_key: Annotated[str | None, Security(TT_API_KEY)] = None,
) -> ApiKey:
    return await authenticated(request, services.keys, RESELLER, tt_api_key)


async def vendor_key(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    x_key: Annotated[str | None, Security(X_KEY)] = None,
) -> ApiKey:
    """The vendor answers 403 ``Not authenticated`` for a missing or wrong key; so do we."""
    return await authenticated(request, services.keys, VENDOR, x_key)


async def bearer_key(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> ApiKey:
    """The OpenAI API answers 401 ``invalid_api_key`` for a missing or wrong key; so do we."""
    token = credentials.credentials if credentials is not None else None
    return await authenticated(request, services.keys, OPENAI, token)


async def replicate_key(request: Request, services: Annotated[Services, Depends(get_services)]) -> ApiKey:
    """``Authorization: Bearer <key>`` or ``Token <key>``, as Replicate takes them; 401 otherwise."""
    return await authenticated(request, services.keys, REPLICATE, REPLICATE.read_key(request.headers))
