"""Property-based fuzzing of the REST API from its own OpenAPI document (schemathesis): generated
requests, valid and invalid, sent to a real server never get a 5xx, and responses match the
documented status codes, content types and schemas.

The operations are collected from the app's document at import time (schemathesis' lazy fixture
loader does not work with pytest 9); a test checks that the live /openapi.json is that document.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from server_process import ServiceProcess
from service.settings import Settings
from service_support import small_index

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_photos):
    index_dir = small_index(tmp_path_factory, real_photos, "fuzz")
    env = {"NETVLAD_INDEX_DIR": index_dir, "NETVLAD_API_KEY": KEY, "NETVLAD_DEVICE": "cpu",
           "NETVLAD_MAX_UPLOAD_BYTES": 2_000_000, "NETVLAD_MAX_PIXELS": 4_000_000}
    process = ServiceProcess(env, log=tmp_path_factory.mktemp("fuzz-log") / "server.log").start()
    yield process
    process.stop()


DOCUMENT = create_app(Settings(_env_file=None)).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_server_publishes_this_document(server):
    assert httpx.get(server.url + "/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_no_server_error(case, server):
    case.call_and_validate(
        base_url=server.url,
        headers={"X-API-Key": KEY},  # so writes run instead of stopping at 401
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        timeout=60,
    )
