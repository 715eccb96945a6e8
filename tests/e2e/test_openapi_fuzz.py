"""Schemathesis against a real loopback server's ``/openapi.json``: every route of the reseller dialect
(its own format too), the vendor's and the OpenAI images API, with a key that has credits so that the
requests reach the handlers. No response may be a server error or break the schema the document states
(its status codes, bodies, content types and headers). Bounded: a few examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.conftest import ServerProcess

# The dialects' routes; not the event streams (they stay open), files, ops or the docs.
DIALECT_PATHS = r"^/(bfl/v1/|flux/(generate|edits|fetch|cancel)$|v1/(?!events))"


@schemathesis.check
def no_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Schemathesis's own check, but for the OpenAI routes' documented 504: this server runs no jobs, so
    their bounded wait always ends in it."""
    if response.status_code == 504 and case.path.startswith("/v1/images/"):
        return True
    return checks.not_a_server_error(ctx, response, case)


CHECKS = [
    no_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[ServerProcess, str]]:
    """API only (no job ever runs): no active-job limit in the way, and the OpenAI routes wait 0.1 s."""
    env = {"FLUXSERVE_MAX_ACTIVE_JOBS": "1000000", "FLUXSERVE_OPENAI_WAIT_SECONDS": "0.1"}
    process = ServerProcess(tmp_path_factory.mktemp("fuzz"), models_dir, env)
    key = process.create_key("fuzz", "100000000")["key"]
    process.start("--no-workers")
    yield process, key
    process.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed: tuple[ServerProcess, str]) -> schemathesis.BaseSchema:
    server, key = fuzzed
    loaded = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    # A key with credits in every dialect's header, so that requests reach the handlers.
    loaded.config.update(headers={"TT-API-KEY": key, "x-key": key, "Authorization": f"Bearer {key}"})
    loaded.config.phases.update(phases=["examples", "fuzzing"])
    loaded.config.generation.update(max_examples=MAX_EXAMPLES, no_shrink=True, deterministic=True)
    return loaded


MAX_EXAMPLES = 5
schema = schemathesis.pytest.from_fixture("api_schema").include(path_regex=DIALECT_PATHS)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_response_breaks_the_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=30)
