"""What rendering a job needs besides its row, given by the caller (the routers' services do)."""

from __future__ import annotations

from typing import Protocol


class Links(Protocol):
    def result_url(self, key: str | None) -> str | None:
        """A URL the client can download the result at (signed, or the blob store's own), None for none."""
        ...

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs are ahead of this one, None when it is not queued."""
        ...
