"""Security headers on every answer, and a page that works under its own Content-Security-Policy (issue 24).

Every answer, page, asset, JSON, error, metrics, redirect, says ``X-Content-Type-Options: nosniff``
and ``X-Frame-Options: DENY``; the page's policy allows only its own scripts, styles and images (plus
``data:`` and ``blob:`` images for the overlays) and no framing. A policy is only as good as the page
that lives with it: the page's HTML has no inline script, style or event handler, and its script
sets no style attribute (the policy would drop it: the top-k bars drew at zero width). The browser
test (tests/test_web.py) fails on any policy violation Chromium reports.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from helpers import encode, random_image

from service.app import create_app
from service.http.answer_headers import PAGE_POLICY
from service.settings import Settings

STATIC = Path(__file__).resolve().parent.parent / "service" / "static"
PNG = encode(random_image(0))


@pytest.fixture
async def client(bundle_dir: Path):
    app = create_app(Settings(model_dir=bundle_dir, engine="null", max_upload_bytes=100_000, log_requests=False))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://camserve") as http,
    ):
        yield http


REQUESTS = [
    ("GET", "/", {}),
    ("GET", "/static/app.js", {}),
    ("GET", "/static/style.css", {}),
    ("GET", "/static", {}),  # a redirect
    ("GET", "/static/nope.js", {}),
    ("GET", "/livez", {}),
    ("GET", "/readyz", {}),
    ("GET", "/health", {}),
    ("GET", "/metrics", {}),
    ("GET", "/openapi.json", {}),
    ("GET", "/docs", {}),
    ("GET", "/nowhere", {}),
    ("DELETE", "/predict", {}),
    ("POST", "/predict", {"files": [("files", ("a.png", PNG, "image/png"))]}),
    ("POST", "/predict", {"content": b"x", "headers": {"content-type": "text/plain"}}),
    ("POST", "/predict", {"content": b"x" * 200_000, "headers": {"content-type": "image/png"}}),  # body_limit.py's 413
    ("POST", "/predict?top_k=99", {"files": [("files", ("a.png", PNG, "image/png"))]}),
    ("GET", "/v2", {}),
    ("GET", "/v2/health/ready", {}),
    ("POST", "/v2/models/test-bundle/infer", {"content": b"{"}),
    ("GET", "/v2/models/nope", {}),
]


async def test_every_answer_says_nosniff_and_refuses_framing(client: httpx.AsyncClient) -> None:
    statuses = set()
    for method, path, options in REQUESTS:
        response = await client.request(method, path, **options)
        statuses.add(response.status_code)
        assert response.headers.get("x-content-type-options") == "nosniff", (method, path, response.status_code)
        assert response.headers.get("x-frame-options") == "DENY", (method, path)
    assert {200, 307, 400, 404, 405, 413, 415, 422} <= statuses  # answers and refusals of every kind were seen


def directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";") if part.strip())}


async def test_the_page_has_a_policy_of_its_own_sources_and_no_framing(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    policy = directives(response.headers["content-security-policy"])
    assert policy == directives(PAGE_POLICY)
    assert policy["default-src"] == ["'self'"] and policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]  # no 'unsafe-inline'
    assert set(policy["img-src"]) == {"'self'", "data:", "blob:"}
    assert policy["frame-ancestors"] == ["'none'"] and policy["object-src"] == ["'none'"]
    api = directives((await client.get("/health")).headers["content-security-policy"])
    assert api == {"default-src": ["'none'"], "frame-ancestors": ["'none'"]}


class InlineFinder(HTMLParser):
    """What a policy without 'unsafe-inline' would block in an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "style":
            self.inline.append("<style> element")
        if tag == "script" and not named.get("src"):
            self.inline.append("<script> without src")
        for name, value in attrs:
            if name == "style":
                self.inline.append(f"style attribute on <{tag}>")
            if name.startswith("on"):
                self.inline.append(f"{name} handler on <{tag}>")
            if name in ("href", "src", "action") and (value or "").strip().lower().startswith("javascript:"):
                self.inline.append(f"javascript: URL on <{tag}>")
        if tag in ("script", "link") and re.match(r"^(https?:)?//", named.get("src") or named.get("href") or ""):
            self.inline.append(f"<{tag}> from another origin")


async def test_the_page_has_nothing_inline_that_its_policy_would_block(client: httpx.AsyncClient) -> None:
    finder = InlineFinder()
    finder.feed((await client.get("/")).text)
    assert finder.inline == []
    # Find something in the finder's own test page, so that it can fail.
    probe = InlineFinder()
    probe.feed('<p style="x" onclick="y"><script>1</script><style></style><a href="javascript:z">')
    assert len(probe.inline) == 5


def test_the_script_sets_no_style_attribute_and_writes_no_html() -> None:
    """Under ``style-src 'self'`` a style attribute set from script is dropped (CSSOM ``style.x`` is not);
    HTML written from script would bring its own inline attributes."""
    script = (STATIC / "app.js").read_text()
    blocked = [
        r"setAttribute\(\s*[\"']style[\"']",
        r"\.innerHTML\s*=",
        r"\.outerHTML\s*=",
        r"insertAdjacentHTML",
        r"document\.write",
        r"\beval\(",
        r"new Function\(",
    ]
    found = [pattern for pattern in blocked if re.search(pattern, script)]
    assert found == []
