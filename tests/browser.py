"""Headless Chromium (Debian's `chromium`) driven through its DevTools protocol, to look at a
page as a person does: which images decoded and how wide, what the console complained of,
what text shows, and a screenshot. The websocket client is the one Prefect already brings.
Tests that need it skip when chromium is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import stop_process

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--remote-debugging-port=0"]  # fmt: skip
IMAGES = "JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 30), width: i.naturalWidth, height: i.naturalHeight, shown: Math.round(i.getBoundingClientRect().width), complete: i.complete})))"


def chromium() -> str:
    """The browser, installed from Debian's packages the first time a test needs it (as
    root, where apt-get is there); elsewhere the test skips saying how to get it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        import fcntl

        with open(Path(tempfile.gettempdir()) / "promptfleet-chromium-install.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one install, however many test processes ask
            if not shutil.which("chromium"):
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
                subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


@dataclass
class Page:
    text: str
    images: list[dict[str, Any]]
    errors: list[str]
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    screenshot: bytes = b""


class _Session:
    def __init__(self, socket) -> None:
        self.socket, self.next_id, self.session_id = socket, 0, None
        self.errors: list[str] = []
        self.requests: list[str] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session_id and not method.startswith("Target."):
            message["sessionId"] = self.session_id
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def _event(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description") or params["exceptionDetails"]["text"])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry'].get('url', '')}: {params['entry']['text']}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def look(url: str, wait_for: str, width: int = 1400, height: int = 1000, timeout: float = 90.0, screenshot: bool = False) -> Page:
    """Open `url` at `width` px, wait until `wait_for` shows and every image has loaded, and
    tell what the page shows."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="promptfleet-chromium-")
    log = open(f"{profile}.log", "w+")  # a file, not a pipe: chromium's chatter must never block it
    browser = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"], stderr=log)
    try:
        endpoint, deadline = "", time.monotonic() + 60
        while not endpoint:
            if browser.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start listening")
            time.sleep(0.1)
            log.seek(0)
            endpoint = next((line.split(" on ", 1)[1].strip() for line in log if line.startswith("DevTools listening on ")), "")
        with connect(endpoint, max_size=None, open_timeout=30) as socket:
            session = _Session(socket)
            target = session.call("Target.createTarget", url="about:blank")["targetId"]
            session.session_id = session.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                session.call(f"{domain}.enable")
            session.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            session.call("Page.navigate", url=url)
            ready = f"!!document.body && document.body.innerText.includes({json.dumps(wait_for)}) && Array.from(document.images).every(i => i.complete)"
            deadline = time.monotonic() + timeout
            while not session.evaluate(ready):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{url}: {wait_for!r} never showed; the page reads: {session.evaluate('document.body && document.body.innerText')!r:.2000}")
                time.sleep(0.25)
            time.sleep(0.5)  # late console errors
            page = Page(session.evaluate("document.body.innerText"), json.loads(session.evaluate(IMAGES)), session.errors, session.requests)
            if screenshot:
                import base64

                shot = session.call("Page.captureScreenshot", format="png")
                page.screenshot = base64.b64decode(shot["data"])
            return page
    finally:
        stop_process(browser, timeout=10)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
        Path(f"{profile}.log").unlink(missing_ok=True)
