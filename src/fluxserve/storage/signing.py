"""Signed, expiring result URLs: ``/files/<key>?expires=<unix>&signature=<sig>``."""

from __future__ import annotations

import time
from urllib.parse import quote

from itsdangerous import BadSignature, Signer

from fluxserve.core.numbers import ascii_int


class UrlSigner:
    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._signer = Signer(secret, salt="fluxserve.files")
        self.ttl_seconds = ttl_seconds

    def _signature(self, key: str, expires: str) -> str:
        return self._signer.get_signature(f"{key}\n{expires}").decode()

    def sign(self, key: str, now: float | None = None) -> str:
        expires = str(int((now if now is not None else time.time()) + self.ttl_seconds))
        return f"/files/{quote(key)}?expires={expires}&signature={self._signature(key, expires)}"

    def verify(self, key: str, expires: str, signature: str) -> bool:
        deadline = ascii_int(expires, 12)  # unix seconds: 12 digits last until the year 33658
        if deadline is None or deadline < time.time():
            return False
        try:
            return self._signer.verify_signature(f"{key}\n{expires}", signature)
        except BadSignature:
            return False
