"""The blob store interface: where input uploads and result images live."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import tenacity

log = logging.getLogger("fluxserve.storage")

# How long a finished job's image waits for a failing store: an outage or restart of S3 takes seconds to
# minutes, and the image (minutes of compute) is worth the wait; the job's heartbeat goes on meanwhile.
PUT_RETRY_SECONDS = 120.0


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob: its key, its size in bytes and when it was last written (unix time)."""

    key: str
    size: int
    modified: float


def check_key(key: str) -> str:
    """Keys are relative POSIX paths (``results/<id>.png``) in every store: anything that could name a
    place outside the store's root or prefix, or two keys the same object (absolute, empty, ``.`` or ``..``
    segments, backslashes, NUL), is refused."""
    if "\\" in key or "\x00" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid blob key {key!r}")
    return key


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
        """Every blob under a folder (``inputs/``; ``""`` for all), in key order; a missing folder lists
        nothing."""
        ...

    def exists(self, key: str) -> bool: ...

    def direct_url(self, key: str, expires_in: float) -> str | None:
        """A URL at which a client downloads the blob straight from the store for ``expires_in`` seconds
        (an S3 presigned URL), or None: the client goes through fluxserve's signed ``/files`` route."""
        ...


def put_patiently(
    blobs: BlobStore, key: str, data: bytes, content_type: str, within: float = PUT_RETRY_SECONDS
) -> None:
    """``blobs.put``, tried again with backoff (0.5 s doubling to 5 s) until it succeeds or ``within``
    seconds have passed, then its last error is raised. A refused key (ValueError) is not tried again."""

    def report(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        extra = {"key": key, "attempt": state.attempt_number, "error": repr(error)[:300]}
        log.warning("storage write failed; retrying", extra=extra)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(within),
        wait=tenacity.wait_exponential(multiplier=0.5, max=5),
        retry=tenacity.retry_if_not_exception_type(ValueError),
        before_sleep=report,
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            blobs.put(key, data, content_type)
