"""Standard Webhooks signatures (https://www.standardwebhooks.com/), one secret per API key."""

from __future__ import annotations

import base64
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
