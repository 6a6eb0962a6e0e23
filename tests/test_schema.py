"""Schemathesis against the service's own OpenAPI schema (issue 7), in process over ASGI.

For every operation in ``/openapi.json``, Schemathesis generates requests from the schema, valid
ones and deliberately invalid ones (wrong types, out-of-range values, missing fields), and sends
them to the app with its lifespan running (model loaded and warm). Every answer must be free of
5xx, carry a documented status and content type, and match the documented response schema.

The app requires an API key, and every generated request carries it: Schemathesis' ``ignored_auth``
check then sends each request to a protected operation again without it, and expects the 401 the
schema's security requirement promises.

Every built-in check runs, ``positive_data_acceptance`` too (a 2xx for any request the schema calls
valid): what JSON Schema cannot say (a file is an image, a tensor's shape counts its data, format=png
takes one file) reaches Schemathesis through ``tests/schemathesis_hooks.py``, and a 413 for a request
over a count limit through ``schemathesis.toml``, both found from the repository root, where the CLI
run against a server reads them too (README, "The API schema, checked").

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

ROOT = Path(__file__).resolve().parent.parent

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
def api_schema(bundle_dir: Path, bundle: Bundle, monkeypatch: pytest.MonkeyPatch):
    """A fresh app per test: Schemathesis ends an app's lifespan after each test, and a lifespan runs once.
    Loaded from the repository root, so that Schemathesis finds its configuration and the hooks."""
    monkeypatch.chdir(ROOT)
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
        case.call_and_validate(headers={"X-API-Key": API_KEY})

    conforms()


def test_the_documented_example_is_answered(api_schema) -> None:
    """The infer example in the document is a request the service answers 200 (no placeholder)."""
    operation = api_schema["/v2/models/{name}/infer"]["POST"]
    example = operation.definition.raw["requestBody"]["content"]["application/json"]["example"]
    case = operation.Case(path_parameters={"name": "test-bundle"}, body=example, media_type="application/json")
    response = case.call(headers={"X-API-Key": API_KEY})
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [1, 10] and outputs["label"]["shape"] == [1]


def test_the_document_says_what_this_bundle_and_these_settings_accept(api_schema) -> None:
    raw = api_schema.raw_schema
    for path in ("/predict", "/gradcam"):
        files = raw["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert files["required"] == ["files"]
        assert files["properties"]["files"]["minItems"] == 1 and files["properties"]["files"]["maxItems"] == 4
    gradcam = {p["name"]: p["schema"] for p in raw["paths"]["/gradcam"]["post"]["parameters"]}
    assert gradcam["layer"]["enum"] == ["prep", "layer1", "layer2", "layer3"]
    assert "cat" in gradcam["target"]["enum"] and "9" in gradcam["target"]["enum"]
    infer = raw["paths"]["/v2/models/{name}/infer"]["post"]
    assert {p["name"]: p["schema"] for p in infer["parameters"]}["name"]["enum"] == ["test-bundle"]
    inputs = infer["requestBody"]["content"]["application/json"]["schema"]["properties"]["inputs"]
    assert inputs["maxItems"] == 1 and [t["properties"]["name"]["enum"] for t in inputs["items"]["oneOf"]] == [
        ["image"],
        ["pixels"],
    ]
