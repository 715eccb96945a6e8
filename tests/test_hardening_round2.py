"""Issue 20's second hardening round, in process (the app without workers on a real SQLite database):
numbers a client sends, security headers on HTML pages, words in refusals."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from fluxserve.api.deps import Services
from fluxserve.api.events import EventId
from fluxserve.app import create_app
from fluxserve.core.numbers import ascii_int
from fluxserve.settings import Settings
from fluxserve.storage.signing import UrlSigner

HOSTILE_NUMBERS = ["²", "1²", "٣", "1" * 13, "1" * 5000, "", " 1", "1 ", "+1", "-1", "0x1", "1_0", "1.0"]
IDS = [text if len(text) < 20 else f"{len(text)} digits" for text in HOSTILE_NUMBERS]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Services]]:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("round2"), workers=0))
    with TestClient(app) as client:
        yield client, app.state.services


@pytest.fixture
def client(app_client: tuple[TestClient, Services]) -> TestClient:
    return app_client[0]


@pytest.fixture
def key(app_client: tuple[TestClient, Services]) -> str:
    services = app_client[1]
    return services.keys.create(f"k{services.keys.count()}", Decimal(100)).key


@pytest.mark.parametrize("text", HOSTILE_NUMBERS, ids=IDS)
def test_only_short_ascii_digit_strings_are_numbers(text: str) -> None:
    assert ascii_int(text, 12) is None
    assert EventId.parse(f"1.1.{text}") is None or text != text.strip()  # the header may have spaces
    assert not UrlSigner("secret", 60).verify("a.png", text, "sig")


def test_numbers_within_their_length_are_read() -> None:
    assert ascii_int("007", 3) == 7 and ascii_int("1" * 12, 12) == int("1" * 12)
    assert EventId.parse(" 1.2.3 ") == EventId(1, 2, 3)


@pytest.mark.parametrize(
    "expires", ["²", "٣٣٣٣٣٣٣٣٣٣", "9" * 5000], ids=["superscript", "arabic", "5000 digits"]
)
def test_a_hostile_expires_is_a_403_not_a_500(client: TestClient, expires: str) -> None:
    response = client.get("/files/results/x.png", params={"expires": expires, "signature": "x"})
    assert response.status_code == 403 and "signature" in response.text


@pytest.mark.parametrize("ratio", ["١٦:٩", "16:٩"])
def test_an_aspect_ratio_in_other_digits_is_refused_naming_the_field(
    client: TestClient, key: str, ratio: str
) -> None:
    response = client.post(
        "/bfl/v1/flux-kontext-pro", json={"prompt": "p", "aspect_ratio": ratio}, headers={"TT-API-KEY": key}
    )
    assert response.status_code in (400, 422) and "aspect_ratio" in response.text
