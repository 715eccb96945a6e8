"""The machine-readable contract, in process: ``/openapi.json`` states ranges as JSON Schema keywords,
every status code a route returns and the keys as security schemes; fetch takes the job id in every
form the reseller documents; a 405 says which methods the path has."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.settings import Settings


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Services]]:
    application = create_app(Settings(data_dir=tmp_path_factory.mktemp("contract"), workers=0))
    with TestClient(application) as client:
        yield client, application.state.services


@pytest.fixture(scope="module")
def openapi(app: tuple[TestClient, Services]) -> dict[str, Any]:
    response = app[0].get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


@pytest.fixture(scope="module")
def key(app: tuple[TestClient, Services]) -> dict[str, str]:
    return {"TT-API-KEY": app[1].keys.create("contract", Decimal(1000)).key}


def _keywords(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            yield name
            yield from _keywords(value)
    elif isinstance(node, list):
        for value in node:
            yield from _keywords(value)


def test_ranges_are_json_schema_keywords(openapi: dict[str, Any]) -> None:
    keywords = set(_keywords(openapi["components"]["schemas"]))
    assert not keywords & {"ge", "le", "gt", "lt", "multiple_of"}
    width = openapi["components"]["schemas"]["FluxDevRequest"]["properties"]["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (256, 1440, 32)
    prompt = openapi["components"]["schemas"]["FluxDevRequest"]["properties"]["prompt"]
    assert prompt["minLength"] == 1 and prompt["maxLength"] == 20_000
    hook = openapi["components"]["schemas"]["FluxDevRequest"]["properties"]["webhook_url"]
    assert {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083} in [
        {
            name: value
            for name, value in branch.items()
            if name in ("type", "format", "minLength", "maxLength")
        }
        for branch in hook["anyOf"]
    ]


def test_every_reseller_status_code_is_declared_in_its_shape(openapi: dict[str, Any]) -> None:
    submit = openapi["paths"]["/bfl/v1/flux-dev"]["post"]["responses"]
    assert {"200", "400", "401", "402", "429"} <= set(submit)
    assert submit["402"]["content"]["application/json"]["schema"]["$ref"].endswith("/ResellerErrorBody")
    assert "HTTPValidationError" not in json.dumps(submit)  # no 422 in FastAPI's shape
    for method in ("get", "post"):
        assert {"200", "400", "401", "404"} <= set(openapi["paths"]["/flux/fetch"][method]["responses"])
    assert {"200", "400", "401", "402", "429"} <= set(openapi["paths"]["/flux/generate"]["post"]["responses"])
    images = openapi["paths"]["/v1/images/generations"]["post"]["responses"]
    assert {"200", "400", "401", "402", "404", "429", "504"} <= set(images)
    assert images["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorBody")


def test_keys_are_security_schemes(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]
    assert schemes["TT-API-KEY"] == {
        "type": "apiKey",
        "in": "header",
        "name": "TT-API-KEY",
        "description": "Your API key.",
    }
    assert schemes["x-key"]["name"] == "x-key" and schemes["Bearer"]["scheme"].lower() == "bearer"
    assert openapi["paths"]["/bfl/v1/flux-dev"]["post"]["security"] == [{"TT-API-KEY": []}]
    assert openapi["paths"]["/v1/flux-dev"]["post"]["security"] == [{"x-key": []}]
    assert openapi["paths"]["/v1/images/edits"]["post"]["security"] == [{"Bearer": []}]


def _job(app: tuple[TestClient, Services], key: dict[str, str]) -> str:
    response = app[0].post("/bfl/v1/flux-dev", json={"prompt": "a cat"}, headers=key)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["jobId"] == data["job_id"]  # the spec's name and the newer docs' name
    return str(data["jobId"])


@pytest.mark.parametrize(
    "request_args",
    [
        {"method": "GET", "params": {"jobId": "{id}"}},
        {"method": "GET", "params": {"job_id": "{id}"}},
        {"method": "POST", "params": {"jobId": "{id}"}},  # no body at all
        {"method": "POST", "json": {"jobId": "{id}", "extra": 1}},
        {"method": "POST", "json": {"job_id": "{id}"}},
        {"method": "POST", "data": {"jobId": "{id}"}},
        {"method": "POST", "files": {"job_id": (None, "{id}")}},  # a multipart form
        {"method": "GET", "json": {"jobId": "{id}"}},  # a body on GET, as some clients send
    ],
)
def test_fetch_takes_the_job_id_from_query_json_or_form(
    app: tuple[TestClient, Services], key: dict[str, str], request_args: dict[str, Any]
) -> None:
    job_id = _job(app, key)
    filled = json.loads(json.dumps(request_args).replace("{id}", job_id))
    if "files" in filled:
        filled["files"] = {name: tuple(value) for name, value in filled["files"].items()}
    response = app[0].request(url="/flux/fetch", headers=key, **filled)
    assert response.status_code == 200, response.text
    assert response.json()["jobId"] == job_id


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"method": "POST"}, "jobId: is required"),
        ({"method": "GET"}, "jobId: is required"),
        (
            {"method": "POST", "content": b"[1]", "headers": {"content-type": "application/json"}},
            "body: must be",
        ),
        (
            {"method": "POST", "content": b"{nope", "headers": {"content-type": "application/json"}},
            "body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        ({"method": "POST", "json": {"jobId": 42}}, "jobId: must be a string"),
        ({"method": "POST", "json": {"jobId": "x" * 101}}, "jobId: must be a string of 1 to 100"),
    ],
)
def test_fetch_refusals_name_the_job_id(
    app: tuple[TestClient, Services], key: dict[str, str], request_args: dict[str, Any], message: str
) -> None:
    headers = {**key, **request_args.pop("headers", {})}
    response = app[0].request(url="/flux/fetch", headers=headers, **request_args)
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith(message)


def test_cancel_takes_a_form_body_too(app: tuple[TestClient, Services], key: dict[str, str]) -> None:
    job_id = _job(app, key)
    response = app[0].post("/flux/cancel", data={"jobId": job_id}, headers=key)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "FAILED"  # canceled


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/flux/fetch", "GET, HEAD, POST"),
        ("/bfl/v1/flux-dev", "POST"),
        ("/v1/images/generations", "POST"),
        ("/v1/flux-dev", "POST"),
    ],
)
def test_405_names_every_method_of_the_path(app: tuple[TestClient, Services], path: str, allow: str) -> None:
    response = app[0].request("DELETE", path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow


def test_405_keeps_each_dialects_error_shape(app: tuple[TestClient, Services]) -> None:
    client = app[0]
    assert client.put("/flux/fetch").json()["status"] == "FAILED"
    assert "detail" in client.put("/v1/flux-dev").json()
    assert client.put("/v1/images/edits").json()["error"]["type"] == "invalid_request_error"


def test_null_for_a_route_specific_range_is_its_default(
    app: tuple[TestClient, Services], key: dict[str, str]
) -> None:
    """Found by the fuzzer: ``"guidance": null`` on flex (its own 1.5..10 range) was a 500."""
    response = app[0].post("/bfl/v1/flux-2-flex", json={"prompt": "x", "guidance": None}, headers=key)
    assert response.status_code == 200, response.text
    job = app[1].jobs.get(response.json()["data"]["jobId"])
    assert job is not None and job.params["guidance"] == 5.0


@pytest.mark.parametrize(
    ("path", "header", "body", "defaulted"),
    [
        ("/bfl/v1/flux-dev", "TT-API-KEY", {}, ["steps", "guidance"]),
        ("/bfl/v1/flux-dev", "TT-API-KEY", {"steps": None, "guidance": 3}, ["steps"]),
        ("/v1/flux-dev", "x-key", {"steps": "12"}, ["guidance"]),
        ("/bfl/v1/flux-kontext-pro", "TT-API-KEY", {"steps": 12}, []),  # a route without them
    ],
)
def test_a_job_records_which_settings_it_left_to_the_routes_default(
    app: tuple[TestClient, Services],
    key: dict[str, str],
    path: str,
    header: str,
    body: dict[str, Any],
    defaulted: list[str],
) -> None:
    """Absent or null, steps and guidance are left to the route's documented default, which a catalog
    entry's own setting replaces (the bundled model runs its 20 steps); sent, they are kept."""
    response = app[0].post(path, json={"prompt": "x", **body}, headers={header: key["TT-API-KEY"]})
    assert response.status_code == 200, response.text
    payload = response.json()
    job = app[1].jobs.get(payload["data"]["jobId"] if "data" in payload else payload["id"])
    assert job is not None and job.params["defaulted"] == defaulted
