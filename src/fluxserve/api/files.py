"""Result files behind signed, expiring URLs: the only way out of the blob store for clients."""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from fluxserve.api.deps import Services, get_services
from fluxserve.errors import BlobNotFound, Refused

router = APIRouter(tags=["files"])


@router.get("/files/{key:path}", summary="Download a result through its signed URL")
def download(
    key: str,
    services: Annotated[Services, Depends(get_services)],
    expires: Annotated[str, Query()] = "",
    signature: Annotated[str, Query()] = "",
) -> Response:
    if not services.signer.verify(key, expires, signature):
        raise Refused(403, "signature: invalid or expired; fetch the job again for a fresh imageUrl")
    try:
        data = services.blobs.get(key)
    except BlobNotFound as error:
        raise Refused(404, "file: no longer stored (past the retention period)") from error
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})
