"""Replicate's files API: ``POST /v1/files`` (multipart ``content``; the ``replicate`` clients upload a local
file input there and pass its ``urls.get``), ``GET /v1/files``, ``GET /v1/files/{id}``, ``DELETE
/v1/files/{id}``. A file belongs to the key that uploaded it and lives in the blob store beside a small JSON
record of its name, type, size, checksum and metadata; a prediction input naming its ``urls.get`` is read
from the store, never fetched over the network.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile
from fastapi.responses import JSONResponse

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import replicate_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import replicate_responses as documented
from fluxserve.errors import BlobNotFound, InvalidFields, Refused

router = APIRouter(prefix="/v1", tags=["replicate"])
Key = Annotated[ApiKey, Depends(replicate_key)]
Deps = Annotated[Services, Depends(get_services)]
FILES = "replicate-files/"  # a key's files are stored under replicate-files/<key id>/<file id>
ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _prefix(key_id: str) -> str:
    return f"{FILES}{key_id}/"


def _record(services: Services, key: ApiKey, file_id: str) -> dict[str, Any] | None:
    """The file's record, None when this key has no such file."""
    if not file_id.isalnum():
        return None
    try:
        return dict(json.loads(services.blobs.get(f"{_prefix(key.id)}{file_id}.json")))
    except BlobNotFound:
        return None


def own_file(value: str, key: ApiKey, services: Services) -> bytes | bool | None:
    """For an input naming a file of this server (``<base>/v1/files/<id>``): its bytes, or False when
    this key has no such file; None for any other value."""
    prefix = f"{services.base_url}/v1/files/"
    if not value.startswith(prefix):
        return None
    file_id = value.removeprefix(prefix).split("/", 1)[0]
    if _record(services, key, file_id) is None:
        return False
    try:
        return services.blobs.get(f"{_prefix(key.id)}{file_id}")
    except BlobNotFound:
        return False


def _shown(record: dict[str, Any], services: Services) -> dict[str, Any]:
    url = f"{services.base_url}/v1/files/{record['id']}"
    return {**record, "urls": {"get": url}}


@router.post(
    "/files",
    summary="Upload a file to use as a prediction input (Replicate)",
    status_code=201,
    responses=documented(402, 413),
)
async def upload(
    key: Key,
    services: Deps,
    content: Annotated[UploadFile, File(description="The file.")],
    metadata: Annotated[str | None, Form(max_length=10_000, description="JSON object.")] = None,
) -> JSONResponse:
    limit = services.submitter.max_input_bytes
    if content.size is not None and content.size > limit:
        raise InvalidFields([("content", "too_large", f"{content.size} bytes; at most {limit} are accepted")])
    data = await content.read()
    try:
        extra = json.loads(metadata) if metadata else {}
    except json.JSONDecodeError:
        extra = None
    if not isinstance(extra, dict):
        raise InvalidFields([("metadata", "invalid", "must be a JSON object")])
    file_id = "".join(secrets.choice(ID_CHARS) for _ in range(24))
    digest = hashlib.sha256(data).hexdigest()
    record = {
        "id": file_id,
        "name": content.filename or "file",
        "content_type": content.content_type or "application/octet-stream",
        "size": len(data),
        "etag": digest[:32],
        "checksums": {"sha256": digest},
        "metadata": extra,
        "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "expires_at": None,
    }
    blob = f"{_prefix(key.id)}{file_id}"
    services.blobs.put(blob, data, str(record["content_type"]))
    services.blobs.put(f"{blob}.json", json.dumps(record).encode(), "application/json")
    return JSONResponse(_shown(record, services), status_code=201)


@router.get("/files", summary="The key's files (Replicate)", responses=documented())
def listing(key: Key, services: Deps) -> dict[str, Any]:
    names = [info.key for info in services.blobs.list(_prefix(key.id)) if info.key.endswith(".json")]
    records = [json.loads(services.blobs.get(name)) for name in names]
    records.sort(key=lambda record: record["created_at"], reverse=True)
    return {"previous": None, "next": None, "results": [_shown(record, services) for record in records]}


@router.get("/files/{file_id}", summary="A file's record (Replicate)", responses=documented(404))
def get(file_id: str, key: Key, services: Deps) -> JSONResponse:
    record = _record(services, key, file_id)
    if record is None:
        raise Refused(404, f"File {file_id[:100]} not found for this key")
    return JSONResponse(_shown(record, services))


@router.delete(
    "/files/{file_id}", summary="Delete a file (Replicate)", status_code=204, responses=documented(404)
)
def delete(file_id: str, key: Key, services: Deps) -> Response:
    if _record(services, key, file_id) is None:
        raise Refused(404, f"File {file_id[:100]} not found for this key")
    services.blobs.delete(f"{_prefix(key.id)}{file_id}")
    services.blobs.delete(f"{_prefix(key.id)}{file_id}.json")
    return Response(status_code=204)
