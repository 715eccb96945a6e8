"""Blobs in an S3-compatible bucket (AWS S3, MinIO, Garage, Ceph, R2...), through obstore.

``FLUXSERVE_STORAGE_URL=s3://bucket/prefix?endpoint=URL&region=R&urls=presigned|signed``:

- ``endpoint``: the S3 API's base URL, for a server other than AWS; an ``http://`` one is allowed
  (``AWS_ALLOW_HTTP`` need not be set as well).
- ``region``: the bucket's region (default ``AWS_REGION``/``AWS_DEFAULT_REGION``, else ``us-east-1``).
- ``urls``: how clients download results. ``presigned`` (default): ``imageUrl`` is a presigned GET URL of
  the bucket, valid for ``FLUXSERVE_URL_TTL_SECONDS`` (at most 7 days, S3's limit), so the images never
  pass through fluxserve. ``signed``: ``imageUrl`` is fluxserve's own signed ``/files`` route, which reads
  the object; the bucket then stays private and the endpoint need not be reachable by clients.

Credentials come from the standard ``AWS_*`` environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, web identity and container credentials), never from the
URL: the storage URL is logged and passed to worker processes, a secret in it would leak.

obstore (Python bindings of the Rust ``object_store`` crate that DataFusion and others use) because it has
no dependency of its own, releases the GIL during requests, signs URLs itself and needs no boto3/botocore
(tens of megabytes and seconds of import in every API and worker process).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, urlsplit

import obstore
from obstore.store import S3Store

from fluxserve.errors import BlobNotFound
from fluxserve.storage.base import BlobInfo, check_key

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ClientConfig, S3Config

UrlMode = Literal["presigned", "signed"]
URL_MODES: tuple[UrlMode, ...] = ("presigned", "signed")
MAX_PRESIGN = timedelta(days=7)  # SigV4 refuses a presigned URL that lives longer
QUERY = ("endpoint", "region", "urls")


class S3BlobStore:
    def __init__(self, store: S3Store, urls: UrlMode = "presigned") -> None:
        self.store = store
        self.urls = urls

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        """Parse ``s3://bucket/prefix?endpoint=&region=&urls=``; a mistake is named, never ignored."""
        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(QUERY))
        if unknown:
            raise ValueError(f"FLUXSERVE_STORAGE_URL: unknown option(s) {', '.join(unknown)} (use {QUERY})")
        options = {name: values[-1] for name, values in query.items()}
        if not parts.netloc:
            raise ValueError("FLUXSERVE_STORAGE_URL: no bucket (s3://bucket/prefix)")
        urls = options.get("urls", "presigned")
        if urls not in URL_MODES:
            raise ValueError(f"FLUXSERVE_STORAGE_URL: urls must be presigned or signed, not {urls!r}")
        config: S3Config = {}
        client: ClientConfig = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=60)}
        if endpoint := options.get("endpoint"):
            if urlsplit(endpoint).scheme not in ("http", "https"):
                raise ValueError(f"FLUXSERVE_STORAGE_URL: endpoint must be an http(s) URL, not {endpoint!r}")
            config["endpoint"] = endpoint
            client["allow_http"] = endpoint.startswith("http://")
        if region := options.get("region"):
            config["region"] = region
        store = S3Store(
            parts.netloc,
            prefix=parts.path.strip("/") or None,
            config=config,
            client_options=client,
            # A failing endpoint answers a readiness probe or a request in seconds, not minutes.
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=20)},
        )
        return cls(store, urls)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        obstore.put(self.store, check_key(key), data, attributes={"Content-Type": content_type})

    def get(self, key: str) -> bytes:
        try:
            return bytes(obstore.get(self.store, check_key(key)).bytes())
        except (FileNotFoundError, ValueError) as error:
            raise BlobNotFound(key) from error

    @staticmethod
    def _info(meta: ObjectMeta) -> BlobInfo:
        return BlobInfo(meta["path"], meta["size"], meta["last_modified"].timestamp())

    def _head(self, key: str) -> BlobInfo | None:
        try:
            return self._info(obstore.head(self.store, check_key(key)))
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> BlobInfo | None:
        info = self._head(key)
        if info is not None:
            obstore.delete(self.store, info.key)  # deleting a missing object is not an error in S3
        return info

    def _listing(self, prefix: str) -> Iterator[BlobInfo]:
        for batch in obstore.list(self.store, check_key(prefix.rstrip("/")) if prefix else None):
            yield from (self._info(meta) for meta in batch)

    def delete_prefix(self, prefix: str) -> list[BlobInfo]:
        removed = self.list(prefix)
        if removed:
            obstore.delete(self.store, [info.key for info in removed])  # bulk deletes, 1000 a request
        return removed

    def list(self, prefix: str) -> list[BlobInfo]:
        return sorted(self._listing(prefix), key=lambda info: info.key)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def direct_url(self, key: str, expires_in: float) -> str | None:
        if self.urls == "signed":
            return None
        life = min(timedelta(seconds=expires_in), MAX_PRESIGN)
        return obstore.sign(self.store, "GET", check_key(key), life)
