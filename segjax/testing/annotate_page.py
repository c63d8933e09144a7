"""The annotation server as a subprocess and a headless browser on its page.

Shared by tests/annotate and benchmarks/annotate.py. The browser is the
distribution's Chromium with its matching chromedriver (`apt-get install chromium
chromium-driver`), driven by Selenium; nothing is downloaded.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class AnnotateServer:
    """`python -m segjax.annotate IMAGE_DIR --checkpoint CKPT --out OUT ...` on a free
    port of 127.0.0.1; `.url`, `.call(method, path, body)`, `.kill()` (SIGKILL)."""

    def __init__(self, image_dir, checkpoint, out, *extra: str, start_timeout: float = 300):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segjax.annotate", str(image_dir), "--checkpoint", str(checkpoint),
             "--out", str(out), "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        lines = []
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on (http://\S+)/", line)
            if m:
                self.url = m.group(1)
                return
        self.kill()
        raise RuntimeError("the annotation server did not start:\n" + "".join(lines))

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 300,
             headers: dict | None = None):
        """(HTTP status, parsed JSON or the raw bytes) of one request (JSON content type
        unless `headers` say otherwise)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, payload, ctype = e.code, e.read(), e.headers.get("content-type", "")
        except urllib.error.URLError as e:
            if not (data and isinstance(e.reason, (BrokenPipeError, ConnectionResetError))):
                raise
            # The server answered (413) and closed while the body was still being sent:
            # ask again with the headers only (same declared length) to read that answer.
            status, payload, ctype = self._headers_only(method, path, len(data), req.header_items(), timeout)
        return status, (json.loads(payload) if "json" in ctype else payload)

    def _headers_only(self, method: str, path: str, length: int, headers, timeout: float):
        """(status, body, content type) of a request whose body is declared but never sent."""
        parts = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.putrequest(method, path)
            for k, v in headers:
                if k.lower() not in ("content-length", "host"):  # putrequest sends Host itself
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            r = conn.getresponse()
            return r.status, r.read(), r.getheader("content-type", "")
        finally:
            conn.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean-up code runs in the server
            self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables, or None where they are not installed."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chrome, driver) if chrome and driver else None


def headless_chromium(downloads: str | os.PathLike | None = None, size: tuple[int, int] = (1100, 700)):
    """A Selenium WebDriver on the distribution's headless Chromium (device scale 1)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError("headless Chromium + chromedriver are not installed "
                           "(apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    if downloads is not None:
        opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                               "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(paths[1]), options=opts)


def wait_for(drv, script: str, want, timeout: float = 120):
    """Polls `script` (JavaScript returning a value) until it returns `want`."""
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        got = drv.execute_script(script)
        if got == want:
            return got
        time.sleep(0.02)
    msg = drv.execute_script("const m = document.getElementById('message'); return m && m.textContent")
    raise AssertionError(f"{script!r} is {got!r}, waited for {want!r}; page message: {msg!r}")


def image_point(drv, x: float, y: float) -> tuple[int, int]:
    """Viewport coordinates of original-image pixel (x, y) on the page's canvas."""
    left, top, scale = drv.execute_script(
        "const r = document.getElementById('canvas').getBoundingClientRect();"
        "return [r.left, r.top, window.segjax.state.scale];")
    return round(left + x * scale), round(top + y * scale)


def click(drv, x: float, y: float, right: bool = False) -> None:
    """A left (or right) click at original-image pixel (x, y)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.mouse_button import MouseButton

    vx, vy = image_point(drv, x, y)
    ab = ActionBuilder(drv)
    ab.pointer_action.move_to_location(vx, vy).click(button=MouseButton.RIGHT if right else MouseButton.LEFT)
    ab.perform()


def drag(drv, x0: float, y0: float, x1: float, y1: float) -> None:
    """A mouse drag between two original-image pixels (a box prompt)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    (a, b), (c, d) = image_point(drv, x0, y0), image_point(drv, x1, y1)
    ab = ActionBuilder(drv)
    ab.pointer_action.move_to_location(a, b).pointer_down().move_to_location((a + c) // 2, (b + d) // 2) \
        .move_to_location(c, d).pointer_up()
    ab.perform()


def keys(drv, *text: str, ctrl: bool = False, shift: bool = False) -> None:
    """Key presses on the page (with Ctrl / Shift held)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    chain = ActionChains(drv)
    mods = ([Keys.CONTROL] if ctrl else []) + ([Keys.SHIFT] if shift else [])
    for m in mods:
        chain.key_down(m)
    chain.send_keys(*text)
    for m in mods:
        chain.key_up(m)
    chain.perform()
