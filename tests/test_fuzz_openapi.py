"""The OpenAPI document at /openapi.json describes the routes truly, and fuzzing them from it
finds no 5xx and no hang.

- The document is valid OpenAPI, lists every route the app serves, and each range it declares
  is the one the parser enforces (the bound is accepted, just beyond it is refused).
- schemathesis generates requests for every operation from the document, valid ones and ones
  that violate it (derandomized, 25 examples per operation: about 150 requests in all; 30 s per
  request, 60 s for the whole run): no answer is a 5xx,
  every status and content type is one the document declares, every JSON answer matches its
  declared schema, and every schema-violating body is refused.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
)
from starlette.routing import Route

from lightserve.httpserver.app import build_app
from lightserve.httpserver.errors import ApiError
from lightserve.httpserver.manager import HttpServerManager
from lightserve.httpserver.openapi import SAMPLING_RANGES, openapi_document
from lightserve.httpserver.tgi_params import parse_tgi_request, tgi_sampling_params
from lightserve.server_args import ServerArgs
from lightserve.utils.run_paths import RunPaths
from tests.server_harness import ServerProcess
from tests.test_server_e2e import wait_pool_free

# Small budgets keep every generated request short: at most 63 new tokens, 8 by default.
FLAGS = ("--data_type", "float32", "--max_total_token_num", "8000", "--max_req_total_len", "64",
         "--max_new_tokens_default", "8", "--log_level", "warning")
ARGS = ServerArgs(max_req_total_len=64, max_total_token_num=8000)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with ServerProcess(tiny_served_model, *FLAGS) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    # Hypothesis-driven fuzzing only, valid and schema-violating bodies: the coverage phase's
    # exhaustive boundary combinations would be well over a thousand requests.
    loaded.config.phases.coverage.enabled = False
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


# ---- the document ----------------------------------------------------------------------------


def test_document_lists_every_route_the_app_serves(tiny_served_model) -> None:
    from transformers import AutoTokenizer

    args = ServerArgs(model_dir=str(tiny_served_model), max_total_token_num=1000, api_key="k")
    paths = RunPaths.create()
    try:
        app = build_app(HttpServerManager(args, paths, AutoTokenizer.from_pretrained(tiny_served_model)), args)
    finally:
        paths.remove()
    doc = openapi_document(args, "m", vocab_size=100)
    served = {(r.path.replace("{model:path}", "{model}"), m.lower()) for r in app.routes if isinstance(r, Route)
              for m in r.methods if m != "HEAD"}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served
    # With --api_key every operation but /health needs the bearer token.
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/health"]["get"]["security"] == []
    assert all("401" in op["responses"]
               for path, ops in doc["paths"].items() if path != "/health" for op in ops.values())


def _bounds(constraints: dict[str, Any], step: float) -> list[tuple[float, bool]]:
    """(value, accepted) pairs at and just beyond each bound."""
    cases = []
    for key, value in constraints.items():
        inward = {"minimum": (value, value - step), "maximum": (value, value + step),
                  "exclusiveMinimum": (value + step, value), "exclusiveMaximum": (value - step, value)}[key]
        cases += [(inward[0], True), (inward[1], False)]
    return cases


@pytest.mark.parametrize("name", sorted(SAMPLING_RANGES))
def test_each_declared_sampling_range_is_the_enforced_one(name: str) -> None:
    step = 1 if name in ("seed", "top_k") else 1e-6  # integer fields step by one
    for value, accepted in _bounds(SAMPLING_RANGES[name], step):
        body = json.dumps({"inputs": "x", "parameters": {name: value, "do_sample": True}}).encode()
        req = parse_tgi_request(body, ARGS)
        if accepted:
            tgi_sampling_params(req.parameters, 1, ARGS)
        else:
            with pytest.raises(ApiError):
                tgi_sampling_params(req.parameters, 1, ARGS)


def test_document_is_served_and_names_the_limits(server, tiny_served_model) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    params = doc["components"]["schemas"]["TGIParameters"]["properties"]
    assert params["max_new_tokens"]["anyOf"][0]["maximum"] == 63  # max_req_total_len 64, one prompt token
    assert doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == [tiny_served_model.name]


# ---- fuzzing ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_5xx_and_answers_match_the_document(case, server) -> None:
    case.call_and_validate(checks=CHECKS, timeout=30)


def test_after_fuzzing_the_pool_is_free(server) -> None:
    wait_pool_free(server.url)
    assert httpx.post(server.url + "/generate", json={"inputs": "Hello"}, timeout=30).status_code == 200
