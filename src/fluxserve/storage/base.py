"""The blob store interface: where input uploads and result images live."""

from __future__ import annotations

from typing import Protocol


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """Raises BlobNotFound."""
        ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...
