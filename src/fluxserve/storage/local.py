"""Blobs as files under one root folder, written atomically so a reader never sees half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fluxserve.errors import BlobNotFound
from fluxserve.storage.base import BlobInfo, check_key


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        """Keys are relative POSIX paths (:func:`check_key`); a symlink out of the root is refused too."""
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid blob key {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        for attempt in (1, 2):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                break
            except FileNotFoundError:  # a sweep removed the folder as it emptied; make it again
                if attempt == 2:
                    raise
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

    def _info(self, path: Path) -> BlobInfo | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return BlobInfo(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime)

    def _remove(self, path: Path) -> BlobInfo | None:
        info = self._info(path)
        if info is None or not path.is_file():
            return None
        try:
            path.unlink()
        except FileNotFoundError:  # removed meanwhile by another sweep
            return None
        return info

    def _prune_folders(self, folder: Path) -> None:
        """Remove folders left empty, up to (not including) the root; a folder in use stays."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                return
            folder = folder.parent

    def delete(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        removed = self._remove(path)
        self._prune_folders(path.parent)
        return removed

    def _folder(self, prefix: str) -> Path:
        """The folder of a prefix; ``""`` is the root."""
        return self._path(prefix.rstrip("/")) if prefix else self.root

    def _files(self, prefix: str) -> list[Path]:
        folder = self._folder(prefix)
        if not folder.is_dir():
            return []
        return sorted(
            path for path in folder.rglob("*") if path.is_file() and not path.name.startswith(".tmp-")
        )

    def delete_prefix(self, prefix: str) -> list[BlobInfo]:
        removed = [info for path in self._files(prefix) if (info := self._remove(path)) is not None]
        folder = self._folder(prefix)
        if folder.is_dir():
            for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    self._prune_folders(path)
        self._prune_folders(folder)
        return removed

    def list(self, prefix: str) -> list[BlobInfo]:
        return [info for path in self._files(prefix) if (info := self._info(path)) is not None]

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def direct_url(self, key: str, expires_in: float) -> str | None:
        """Files on disk are served by the ``/files`` route only."""
        return None
