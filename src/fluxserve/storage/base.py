"""The blob store interface: where input uploads and result images live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob: its key, its size in bytes and when it was last written (unix time)."""

    key: str
    size: int
    modified: float


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes:
        """Raises BlobNotFound."""
        ...

    def delete(self, key: str) -> BlobInfo | None:
        """Remove one blob and say what was removed; None when it was not there (not an error)."""
        ...

    def delete_prefix(self, prefix: str) -> list[BlobInfo]:
        """Remove every blob under a folder (``inputs/<job_id>/``); a missing folder removes nothing."""
        ...

    def list(self, prefix: str) -> list[BlobInfo]:
        """Every blob under a folder (``inputs/``), in key order; a missing folder lists nothing."""
        ...

    def exists(self, key: str) -> bool: ...
