"""The interactive docs (/docs Swagger UI, /redoc ReDoc) work on a network without CDN access: their
pages reference only this server's URLs, whose assets come from the installed fastapi-offline
package, and a real browser that can reach nothing but this server renders the operations."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from app.main import DOCS_STATIC_URL
from tests.conftest import BASE_URL
from tests.server_support import running_server

CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


class _References(HTMLParser):
    """Every URL a page makes the browser fetch: src and href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)


def _referenced(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


@pytest.fixture
async def http(app_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return app_client


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (
            "/docs",
            {
                f"{DOCS_STATIC_URL}/swagger-ui.css",
                f"{DOCS_STATIC_URL}/swagger-ui-bundle.js",
                f"{DOCS_STATIC_URL}/favicon.png",
            },
        ),
        (
            "/redoc",
            {f"{DOCS_STATIC_URL}/redoc.standalone.js", f"{DOCS_STATIC_URL}/favicon.png", "/openapi.json"},
        ),
    ],
)
async def test_docs_pages_reference_only_local_assets(
    http: httpx.AsyncClient, page: str, expected: set[str]
) -> None:
    response = await http.get(page, headers={"accept": "text/html"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    # No CDN (nor any other absolute URL, nor a protocol-relative one) anywhere in the page.
    assert "http://" not in html and "https://" not in html
    urls = set(_referenced(html))
    if page == "/docs":
        # Swagger UI takes the OpenAPI document's URL from its script.
        assert "url: '/openapi.json'" in html
        urls.add("/openapi.json")
    assert expected <= urls, urls
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    for url in urls:
        asset = await http.get(urljoin(BASE_URL, url))
        assert asset.status_code == 200, url
        suffix = Path(url).suffix
        assert asset.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], (url, asset.headers)
        assert len(asset.content) > 100, url


async def test_swagger_oauth2_redirect_page_is_served(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert "'/docs/oauth2-redirect'" in page.text
    redirect = await http.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200
    assert redirect.headers["content-type"].startswith("text/html")
    assert "http://" not in redirect.text and "https://" not in redirect.text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_swagger_ui_renders_operations_in_a_browser_without_network(
    database_url: str, tmp_path: Path
) -> None:
    """Headless Chromium loads /docs from a real server with every other host unresolvable:
    Swagger UI renders the API's operations from the local assets alone."""
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with running_server(database_url, tmp_path, env={"CARECOORD_LOG_LEVEL": "info"}) as server:
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium'}",
                # The network is otherwise unavailable: no host name resolves but this server's.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--proxy-server=127.0.0.1:9",  # and anything by address goes nowhere
                "--proxy-bypass-list=127.0.0.1",
                "--virtual-time-budget=20000",
                "--dump-dom",
                f"{server.base}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        ).stdout
        log = server.log()
    # Swagger UI rendered the document: one block per operation, FHIR interactions among them.
    assert dom.count('class="opblock opblock-') > 100, dom[:2000]
    assert 'data-path="/fhir/Patient/{id}"' in dom
    assert 'data-path="/auth/token"' in dom
    # The browser fetched the page, its assets and the OpenAPI document from this server.
    for path in (
        "/docs",
        "/docs/static/swagger-ui-bundle.js",
        "/docs/static/swagger-ui.css",
        "/openapi.json",
    ):
        assert f'"path": "{path}", "status": 200' in log, path
