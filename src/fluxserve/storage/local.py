"""Blobs as files under one root folder, written atomically so a reader never sees half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from fluxserve.errors import BlobNotFound


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        """Keys are relative POSIX paths; anything that could leave the root is refused."""
        parts = PurePosixPath(key).parts
        if not key or "\\" in key or "\x00" in key or key.startswith("/") or ".." in parts or "." in parts:
            raise ValueError(f"invalid blob key {key!r}")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid blob key {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, ValueError) as error:
            raise BlobNotFound(key) from error

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()
