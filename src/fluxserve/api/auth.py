"""Key authentication for both dialects: ``TT-API-KEY`` (reseller) and ``x-key`` (vendor)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import ApiError


def reseller_key(
    services: Annotated[Services, Depends(get_services)],
    tt_api_key: Annotated[str | None, Header(alias="TT-API-KEY")] = None,
) -> ApiKey:
    if not tt_api_key:
        raise ApiError(401, "TT-API-KEY header is missing; send your API key in it")
    key = services.keys.authenticate(tt_api_key)
    if key is None:
        raise ApiError(401, "TT-API-KEY is not a valid API key")
    return key
