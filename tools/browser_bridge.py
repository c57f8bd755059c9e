"""Drive the system Chromium from pytest through playwright-core (npm) and a line-JSON bridge (tools/pw_bridge.mjs).

Where things come from (``.ci/run`` installs them when missing):
  Chromium        ZIMAGE_VL_CHROMIUM, else ``chromium`` / ``chromium-browser`` on PATH (Debian: apt-get install chromium)
  node            on PATH
  playwright-core ZIMAGE_VL_NODE_DIR (default ~/.cache/comfyui-zimage-vl/node)/node_modules/playwright-core
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
NODE_DIR = Path(os.environ.get("ZIMAGE_VL_NODE_DIR", Path.home() / ".cache" / "comfyui-zimage-vl" / "node"))
PLAYWRIGHT_CORE = NODE_DIR / "node_modules" / "playwright-core" / "index.mjs"


def chromium_path() -> str | None:
    env = os.environ.get("ZIMAGE_VL_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    missing = []
    if chromium_path() is None:
        missing.append("Chromium (apt-get install chromium, or set ZIMAGE_VL_CHROMIUM)")
    if shutil.which("node") is None:
        missing.append("node")
    if not PLAYWRIGHT_CORE.is_file():
        missing.append(f"playwright-core (npm i --prefix {NODE_DIR} playwright-core)")
    if missing:
        return "browser tests SKIPPED, nothing was checked in a real browser: missing " + ", ".join(missing) + \
               " (.ci/run installs them)"
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium page. ``evaluate(src, arg)`` runs the JS function source ``src`` on ``arg``."""

    def __init__(self):
        env = {**os.environ, "PLAYWRIGHT_CORE": PLAYWRIGHT_CORE.as_uri(), "CHROMIUM": chromium_path()}
        self.proc = subprocess.Popen(["node", str(HERE / "pw_bridge.mjs")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._id = 0

    def _call(self, op: str, **args):
        self._id += 1
        self.proc.stdin.write(json.dumps({"id": self._id, "op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BrowserError(f"browser bridge died during {op}: {self.proc.stderr.read()[-3000:]}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise BrowserError(f"{op} failed: {reply['error']}\n--- page console (tail) ---\n" + "\n".join(self.logs()[-12:]))
        return reply["result"]

    def goto(self, url: str):
        return self._call("goto", url=url)

    def evaluate(self, src: str, arg=None):
        return self._call("evaluate", src=src, arg=arg)

    def wait_for(self, src: str, arg=None, timeout_s: float = 30):
        return self._call("waitFor", src=src, arg=arg, timeout=int(timeout_s * 1000))

    def drag(self, points: list[tuple[float, float]], steps: int = 4):
        """Press at the first point, move through the others, release at the last."""
        seq = [{"op": "move", "x": points[0][0], "y": points[0][1]}, {"op": "down"}]
        seq += [{"op": "move", "x": x, "y": y, "steps": steps} for x, y in points[1:]]
        seq.append({"op": "up"})
        return self._call("mouse", steps=seq)

    def click(self, selector: str):
        return self._call("click", selector=selector)

    def press(self, key: str):
        return self._call("press", key=key)

    def type_text(self, text: str):
        return self._call("type", text=text)

    def move(self, x: float, y: float):
        return self._call("mouse", steps=[{"op": "move", "x": x, "y": y}])

    def dblclick(self, x: float, y: float):
        return self._call("dblclick", x=x, y=y)

    def box(self, selector: str) -> dict | None:
        return self._call("box", selector=selector)

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        """A PNG of the page (or of ``clip`` = {x, y, width, height} in CSS px)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call("screenshot", path=str(path), clip=clip)
        return path

    def viewport(self, width: int, height: int):
        return self._call("viewport", width=width, height=height)

    def logs(self) -> list[str]:
        try:
            self.proc.stdin.write(json.dumps({"id": -1, "op": "logs"}) + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline()).get("result") or []
        except Exception:
            return []

    def close(self):
        if self.proc.poll() is None:
            try:
                self._call("close")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
