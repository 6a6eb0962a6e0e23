"""Schemathesis against the service's own OpenAPI schema (issue 7), in process over ASGI.

For every operation in ``/openapi.json``, Schemathesis generates requests from the schema, valid
ones and deliberately invalid ones (wrong types, out-of-range values, missing fields), and sends
them to the app with its lifespan running (model loaded and warm). Every answer must be free of
5xx, carry a documented status and content type, and match the documented response schema.

The app requires an API key, and every generated request carries it: Schemathesis' ``ignored_auth``
check then sends each request to a protected operation again without it, and expects the 401 the
schema's security requirement promises.

One built-in check is left out: ``positive_data_acceptance`` expects a 2xx for any body the schema
allows, but ``format: binary`` cannot say "an image", so random bytes are rightly refused with 400.

Schemathesis' own pytest loader (``from_fixture``) does not run under pytest 9, so each operation
is a plain parametrized test driving ``operation.as_strategy()`` with Hypothesis.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from camcore.bundle import Bundle, load_bundle
from service.app import create_app
from service.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

# Thirty generated requests to each of some twenty operations, each on an app of its own: a minute or so.
pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 30
API_KEY = "schema-test-key"


def service_settings(model_dir: Path) -> Settings:
    return Settings(
        model_dir=model_dir,
        precision="fp32",
        max_batch_size=4,  # a short start-up (warm-up) for the app each test makes
        trace=False,  # and no TorchScript trace: the answers' shapes are what is checked here
        max_files=4,
        max_upload_bytes=256 * 1024,
        max_image_pixels=1_000_000,
        log_requests=False,
        api_key=SecretStr(API_KEY),
    )


# The operations come from the app itself (no model needed for the schema): a new endpoint is covered.
OPERATIONS = [
    (method.upper(), path)
    for path, item in create_app(service_settings(Path("unused"))).openapi()["paths"].items()
    for method in item
]


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture
def api_schema(bundle_dir: Path, bundle: Bundle):
    """A fresh app per test: Schemathesis ends an app's lifespan after each test, and a lifespan runs once."""
    app = create_app(service_settings(bundle_dir), bundle=bundle)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_honours_the_schema(api_schema, method: str, path: str) -> None:
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def conforms(case) -> None:
        case.call_and_validate(headers={"X-API-Key": API_KEY}, excluded_checks=[positive_data_acceptance])

    conforms()
