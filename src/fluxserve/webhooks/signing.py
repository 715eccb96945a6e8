"""Webhook signatures: Standard Webhooks (https://www.standardwebhooks.com/) with one secret per API key,
on every delivery; and, for a vendor-dialect task sent with ``webhook_secret``, that secret as the vendor
hands it back.

The vendor's scheme, as its own material states it (two accounts, neither in its API reference): its
official Python client (the ``bfl`` package's webhook helper) says the secret comes back verbatim in
``X-Webhook-Secret``; its published integration guide says the body is signed with HMAC-SHA256, sent as
``X-BFL-Signature: sha256=<hex>``. A task's delivery carries both, so a receiver written to either check
accepts it; neither replaces the Standard Webhooks headers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import datetime

from standardwebhooks import Webhook


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def signed_headers(secret: str, message_id: str, timestamp: datetime, payload: str) -> dict[str, str]:
    """The three headers a receiver checks with ``Webhook(secret).verify(body, headers)``."""
    signature = Webhook(secret).sign(message_id, timestamp, payload)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


SECRET_HEADER = "X-Webhook-Secret"
SIGNATURE_HEADER = "X-BFL-Signature"


def task_headers(secret: str, payload: str) -> dict[str, str]:
    """The vendor's headers for a task sent with ``webhook_secret``: the secret itself, and
    ``sha256=<hex HMAC-SHA256 of the body's bytes keyed by the secret's UTF-8>``."""
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return {SECRET_HEADER: secret, SIGNATURE_HEADER: f"sha256={digest}"}
