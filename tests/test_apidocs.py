"""The service's /docs page with no internet: every asset it loads comes from the service itself."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="needs the serve extra")
pytest.importorskip("swagger_ui_bundle", reason="needs swagger-ui-bundle (the serve extra)")

from test_predict import make_model

from signscale.serve import ServeConfig, running


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


def _browser() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


async def _render_docs(browser: str, url: str, profile: Path) -> dict:
    """Open /docs in headless Chromium with every other host unreachable; report what Swagger UI drew."""
    aiohttp = pytest.importorskip("aiohttp", reason="the browser test talks to Chromium with aiohttp's websockets")
    # The resolver rule sends every name but 127.0.0.1 nowhere: a CDN request fails, as it does offline.
    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1", f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        ws_url = None
        while ws_url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            if not line:
                raise AssertionError("chromium exited before opening its DevTools port")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = m.group(1) if m else None
        port = re.search(r":(\d+)/", ws_url).group(1)
        async with aiohttp.ClientSession() as s:
            targets = await (await s.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1_000_000))

                async def call(method: str, **params) -> dict:
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    while True:
                        msg = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
                        if msg.get("id") == i:
                            assert "error" not in msg, msg
                            return msg["result"]

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
    finally:
        proc.kill()
        await proc.wait()


def test_docs_page_renders_in_a_browser_with_no_internet(service, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH: /docs was not rendered in a browser")
    result = asyncio.run(asyncio.wait_for(_render_docs(browser, service.url + "/docs", tmp_path / "profile"), 120))
    assert "/v1/classify" in result["paths"] and "signscale" in result["title"]
