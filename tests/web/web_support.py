"""What the web tests share besides fixtures: plain HTTP calls to the explorer's API (urllib), and where the
browser is and how it is launched (Debian's chromium, driven by Playwright; never Playwright's own download)."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["Http", "CHROMIUM", "CHROMIUM_ARGS", "browser_missing", "upload_path", "drop_file", "drop_files"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return (f"no browser: {CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium), "
                "as .ci/run does")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no browser driver: the playwright package is missing; pip install -e '.[test]'"
    return None


def upload_path(data: bytes, name: str) -> str:
    """The explorer's upload URL for these bytes: the name and their SHA-256 (the page computes it too)."""
    return f"api/models?name={name}&sha256={hashlib.sha256(data).hexdigest()}"


def drop_file(page, selector: str, name: str, data: bytes) -> None:
    """Drop a file on an element as a real drag and drop does: a ``drop`` event whose DataTransfer holds it."""
    drop_files(page, selector, {name: data})


def drop_files(page, selector: str, files: dict[str, bytes]) -> None:
    """Drop files (name -> bytes) on an element: ``dragover`` then ``drop`` with a DataTransfer holding them."""
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, b64] of files) {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, { type: "application/octet-stream" }));
            }
            return transfer;
        }""", [[name, base64.b64encode(data).decode("ascii")] for name, data in files.items()])
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


class Http:
    """Plain HTTP calls to the explorer's API (urllib): the state-changing ones carry the explorer's header."""

    def __init__(self, base: str, token: str | None = None):
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        sent = {"X-Featureviz": "1", **({"Content-Type": "application/json"} if isinstance(body, dict) else {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        sent.update(headers or {})
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        status, _, raw = self.call(method, path, body, headers)
        return status, json.loads(raw or b"{}")
