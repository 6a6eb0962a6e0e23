"""The optional API key (``CAMSERVE_API_KEY``): checking it, and showing it in the OpenAPI document.

The key is checked by a plain function, :func:`authorize`, that the endpoints' one dependency calls,
not by FastAPI's ``Security`` dependencies: those add two dependency nodes to every request
(``APIKeyHeader``, ``HTTPBearer``), and FastAPI's dependency solving was the largest part of a
single-image ``/predict``'s front that camserve controls (bench/results/bounds.md, section 4). The
schemes stay FastAPI's for the documentation: :func:`document_security` lists them in the OpenAPI
document and marks every operation whose dependencies check the key, so ``/docs``' Authorize button
sends it as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.datastructures import Headers

from service.fronts.gate import key_accepted

if TYPE_CHECKING:
    from service.state import ServiceState

API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="the key in CAMSERVE_API_KEY, when the service has one"
)
BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, the same key as X-API-Key")
SCHEMES = (API_KEY_HEADER, BEARER)

Dependency = TypeVar("Dependency", bound=Callable[..., Any])


def header_bytes(value: str) -> bytes:
    """The bytes a client sent in a header: starlette decodes header values as latin-1, so encoding
    back as latin-1 is lossless, and a UTF-8 key arrives as its UTF-8 bytes."""
    return value.encode("latin-1")


class _Latin1Headers:
    """Raw ASGI headers (lower-cased names, the first of each) read as Starlette's ``Headers.get`` reads them."""

    def __init__(self, raw: Mapping[bytes, bytes]) -> None:
        self._raw = raw

    def get(self, name: str) -> str | None:
        value = self._raw.get(name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")


def key_in_raw_headers(raw: Mapping[bytes, bytes]) -> bytes:
    """:func:`supplied_key`'s bytes from raw ASGI headers (the front's direct routes)."""
    return header_bytes(supplied_key(_Latin1Headers(raw)))


def supplied_key(headers: Headers | _Latin1Headers) -> str:
    """``X-API-Key: <key>``, else ``Authorization: Bearer <key>`` (the scheme in any case), as
    FastAPI's ``APIKeyHeader`` and ``HTTPBearer`` read them; empty when neither is there."""
    key = headers.get(API_KEY_HEADER.model.name)
    if key:
        return key
    scheme, _, credentials = (headers.get("authorization") or "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def authorize(state: ServiceState, headers: Headers) -> None:
    """Nothing when no key is set or the right one was sent (compared as bytes, in constant time); 401."""
    if not key_accepted(state, header_bytes(supplied_key(headers))):
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})


def checks_key(dependency: Dependency) -> Dependency:
    """Marks a dependency that calls :func:`authorize`, so the OpenAPI document says its routes take the key."""
    dependency.checks_api_key = True  # type: ignore[attr-defined]
    return dependency


def _checks_key(dependant: Dependant) -> bool:
    return any(getattr(d.call, "checks_api_key", False) or _checks_key(d) for d in dependant.dependencies)


def document_security(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    """The OpenAPI document lists both schemes, and each operation of ``routers`` that checks the key
    names them (either one will do), as FastAPI writes it for ``Security`` dependencies."""
    build = app.openapi
    routes = [route for router in routers for route in router.routes if isinstance(route, APIRoute)]

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI's, built once and cached on the app
        schemes = {s.scheme_name: jsonable_encoder(s.model, by_alias=True, exclude_none=True) for s in SCHEMES}
        schema.setdefault("components", {})["securitySchemes"] = schemes
        requirement = [{name: []} for name in schemes]
        for route in routes:
            if route.include_in_schema and _checks_key(route.dependant):
                operations = schema["paths"].get(route.path_format, {})
                for method in route.methods:
                    if method.lower() in operations:
                        operations[method.lower()]["security"] = requirement
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
