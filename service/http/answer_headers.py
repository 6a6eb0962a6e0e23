"""What every answer's headers say to a browser, and redirects that name no host.

* Security headers (OWASP's secure headers for an API and a page): ``X-Content-Type-Options: nosniff``
  and a framing refusal on every answer, and on the web page a Content-Security-Policy that allows
  only its own scripts, styles and images. Encoded once: every answer gets one of three lists.
* Relative redirects: Starlette builds a redirect's ``Location`` absolute from the request's ``Host``
  header (``GET /static`` -> ``http://<Host>/static/``), which reflects whatever a client sent; a
  relative one means the same to every browser and reflects nothing (:func:`relative_location`).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

# The page loads only its own script and stylesheet, and draws overlays from data: URLs and blobs.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# JSON, PNG and metrics answers are never documents to render: nothing may load or frame them.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
# FastAPI's /docs and /redoc pages run inline scripts of their own: framing refused, nothing else changed.
DOCS_PATHS = ("/docs", "/redoc")
BASE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"))
PAGE_HEADERS = (*BASE_HEADERS, (b"content-security-policy", PAGE_POLICY.encode()))
API_HEADERS = (*BASE_HEADERS, (b"content-security-policy", API_POLICY.encode()))

Headers = tuple[tuple[bytes, bytes], ...]


def security_headers(path: str) -> Headers:
    """The page's policy on ``/``; FastAPI's docs and the static files get only nosniff and DENY; the API all."""
    if path == "/":
        return PAGE_HEADERS
    if path.startswith(DOCS_PATHS) or path.startswith("/static/"):
        return BASE_HEADERS
    return API_HEADERS


def relative_redirect(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A redirect's headers with its ``Location`` made relative."""
    return [(key, relative_location(value) if key.lower() == b"location" else value) for key, value in headers]


def relative_location(location: bytes) -> bytes:
    """This app redirects only within itself: keep the path, query and fragment, drop scheme and host.

    Leading slashes (and backslashes, which browsers read as slashes) collapse to one:
    ``//evil.example/`` would be a link to another host."""
    parts = urlsplit(location.decode("latin-1"))
    if not parts.scheme and not parts.netloc and not parts.path.startswith(("//", "/\\")):
        return location
    path = "/" + parts.path.lstrip("/\\")
    return urlunsplit(("", "", path, parts.query, parts.fragment)).encode("latin-1")
