"""The service's /docs page with no internet: every asset it loads comes from the service itself."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="needs the serve extra")
pytest.importorskip("swagger_ui_bundle", reason="needs swagger-ui-bundle (the serve extra)")

from devtools import devtools_page, find_browser
from test_predict import make_model

from signscale.serving.serve import ServeConfig
from signscale.serving.service import running


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model = make_model(str(tmp_path_factory.mktemp("docs-model") / "model"))
    with running(ServeConfig(model=model, port=0, reload_interval_s=0)) as svc:
        yield svc


def _asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: ?["']([^"']+)["']""", html)


def test_docs_page_loads_nothing_from_another_host(service) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        urls = _asset_urls(page.text)
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
        assert [u for u in urls if "://" in u or u.startswith("//")] == []  # no CDN, no other host
        for u in urls:
            r = c.get(u)
            assert r.status_code == 200, u
        assert "SwaggerUIBundle" in c.get("/docs/assets/swagger-ui-bundle.js").text
        assert "/v1/classify" in c.get("/openapi.json").text


async def _render_docs(browser: str, url: str, profile: Path) -> dict:
    """Open /docs in headless Chromium with every other host unreachable; report what Swagger UI drew."""
    # The resolver rule sends every name but 127.0.0.1 nowhere: a CDN request fails, as it does offline.
    async with devtools_page(browser, profile, "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                     "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1") as (call, _):
        await call("Page.enable")
        await call("Page.navigate", url=url)
        # Swagger UI draws one .opblock per operation once its bundle ran and the spec loaded
        done = await call("Runtime.evaluate", awaitPromise=True, returnByValue=True, expression="""
            new Promise((resolve) => {
              const check = () => {
                const ops = [...document.querySelectorAll('.opblock-summary-path')];
                if (ops.length === 0) return false;
                resolve({paths: ops.map((o) => o.textContent.trim()),
                         title: (document.querySelector('.title') || {}).textContent || ''});
                return true;
              };
              const start = () => { if (!check()) new MutationObserver(check).observe(document.documentElement,
                {childList: true, subtree: true}); };
              if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
              else start();
            })""")
        return done["result"]["value"]


def test_docs_page_renders_in_a_browser_with_no_internet(service, tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH: /docs was not rendered in a browser")
    result = asyncio.run(asyncio.wait_for(_render_docs(browser, service.url + "/docs", tmp_path / "profile"), 120))
    assert "/v1/classify" in result["paths"] and "signscale" in result["title"]
