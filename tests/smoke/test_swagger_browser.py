"""The Swagger UI page in real headless Chromium: operations listed, no CSP violation, nothing off-host."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlsplit

import pytest

from tests.support.servers import Server, log_on_failure

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium (apt-get install chromium)"
    ),
]


def test_swagger_ui_in_chromium(server: Server) -> None:
    from playwright.sync_api import sync_playwright

    base, log = server.base_url, server.log
    requests: list[str] = []
    console: list[str] = []
    with log_on_failure(log), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.add_init_script(
                "window.__csp = [];"
                "document.addEventListener('securitypolicyviolation',"
                " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            response = page.goto(f"{base}/schema/swagger", wait_until="networkidle")
            assert response is not None
            assert response.status == 200
            csp = response.headers["content-security-policy"]
            assert "script-src 'self'" in csp
            assert "unsafe-inline" not in csp
            page.wait_for_selector(".opblock", timeout=15_000)
            operations = page.locator(".opblock").count()
            assert operations >= 12, operations
            summaries = page.locator(".opblock-summary-path").all_inner_texts()
            assert any("/v1/job-results/{job_id}" in text for text in summaries), summaries
            violations = page.evaluate("window.__csp")
        finally:
            browser.close()
    assert violations == [], violations
    assert not [line for line in console if "Content Security Policy" in line], console
    base_host = urlsplit(base).netloc
    off_host = [
        url for url in requests if urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc != base_host
    ]
    assert off_host == [], off_host
