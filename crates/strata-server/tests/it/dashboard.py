"""Drives the dashboard in headless Chromium (Playwright's Python package, the Debian
chromium): the page loads, shows the volume, then its I/O after a qemu-io write; saves
a screenshot. Or, for a node whose API needs its token: the page asks for it, then
shows the cluster. Run by tests/it/dashboard.rs:

    dashboard.py URL VOLUME NBD_URI SCREENSHOT HEALTH
    dashboard.py --token URL TOKEN HEALTH

HEALTH is the health pill the node's state calls for: "healthy", or "disk nearly full"
when the machine running the test has little disk left (the node says so, rightly).
"""

import subprocess
import sys
import time

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


def token(url, secret, expected):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#token-form:not([hidden])", timeout=15_000)
        assert page.inner_text("#health") == "token needed", page.inner_text("#health")
        page.fill("#token", secret)
        page.click("#token-form button")
        page.wait_for_function(
            "want => document.querySelector('#health').innerText === want",
            arg=expected, timeout=15_000)
        assert page.is_hidden("#token-form")
        print("the page asked for the token, then showed:", page.inner_text("#health"))
        browser.close()


def main():
    if sys.argv[1] == "--token":
        return token(sys.argv[2], sys.argv[3], sys.argv[4])
    url, volume, uri, screenshot, expected = sys.argv[1:6]
    row = f'tr[data-volume="{volume}"]'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("requestfailed", lambda r: errors.append("request failed: " + r.url))
        requests = []
        page.on("request", lambda r: requests.append(r.url))

        page.goto(url)
        page.wait_for_selector(row, timeout=15_000)
        health = page.inner_text("#health")
        assert health == expected, f"health pill: {health!r}, expected {expected!r}"
        assert page.inner_text("#c-leader") == "node 1", page.inner_text("#c-leader")
        assert "1 up" in page.inner_text("#c-nodes")
        before = page.inner_text(f"{row} td.io-write .io-total")
        assert before == "0 B · 0 ops", f"written before the write: {before!r}"
        print("the page shows", volume, "with no I/O", flush=True)

        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", "-c", "flush", uri],
            check=True,
            capture_output=True,
        )
        # The total appears at the next refresh; the rate shows for one interval (2 s).
        total, rate_seen, deadline = "", None, time.monotonic() + 15
        while time.monotonic() < deadline:
            total = page.inner_text(f"{row} td.io-write .io-total")
            rate = page.inner_text(f"{row} td.io-write .io-rate")
            if rate not in ("0 B/s", "–") and rate_seen is None:
                rate_seen = rate
                page.screenshot(path=screenshot, full_page=True)
            if total.startswith("4.00 MiB") and rate_seen:
                break
            time.sleep(0.2)
        if not rate_seen:
            page.screenshot(path=screenshot, full_page=True)
        assert total.startswith("4.00 MiB"), f"written total: {total!r}"
        assert rate_seen, "no write rate was shown"
        print("the page shows the write:", total, "at", rate_seen, flush=True)

        here = url.rstrip("/")
        bad = [u for u in requests if not u.startswith(here) and not u.startswith("data:")]
        assert not bad, f"the page fetched from elsewhere: {bad}"
        assert not errors, f"errors in the page: {errors}"
        browser.close()


if __name__ == "__main__":
    main()
