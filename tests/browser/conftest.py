"""Browser tests: the REAL ComfyUI frontend (comfyui-frontend-package, from the host's requirements) served by
a REAL ComfyUI server with this pack and the tiny test nodes, driven in headless Chromium by playwright-core.

Without a browser (or without a host) every test here is skipped with one loud line. Screenshots go to
``out/browser/`` (git-ignored) or ZIMAGE_VL_BROWSER_ARTIFACTS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tools.host_harness import HOST_SKIP_REASON, REPO_ROOT, ComfyServer, comfyui_path

from tools.browser_bridge import Browser, skip_reason

HERE = Path(__file__).resolve().parent
ARTIFACTS = Path(os.environ.get("ZIMAGE_VL_BROWSER_ARTIFACTS", REPO_ROOT / "out" / "browser"))
SKIP = HOST_SKIP_REASON or skip_reason()
# first-run dialogs (welcome templates browser, release notes) would cover the canvas; a restored previous
# session would replace the graph a test just loaded
USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.Persist": False,
                 "Comfy.Release.Version": "99.0.0", "Comfy.Release.Status": "skipped"}
# the page is ready once the graph, the settings store and this pack's extension are there
READY_JS = """() => !!(window.app && app.graph && app.canvas && app.extensionManager?.setting
    && (app.extensions || []).some(e => e.name === 'comfyui-zimage-vl'))"""


def pytest_collection_modifyitems(config, items):
    if SKIP is None:
        return
    mark = pytest.mark.skip(reason=SKIP)
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE) and "page" in getattr(item, "fixturenames", ()):
            item.add_marker(mark)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SKIP is not None:
        terminalreporter.write_line("!!! " + SKIP + " !!!", red=True, bold=True)
    elif ARTIFACTS.is_dir():
        terminalreporter.write_line(f"browser screenshots: {ARTIFACTS}")


@pytest.fixture(scope="session")
def browser_server(tmp_path_factory):
    server = ComfyServer(comfyui_path(), tmp_path_factory.mktemp("comfyui_browser"))
    server.prepare()
    settings = server.user_dir / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(USER_SETTINGS))
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture()
def page(browser, browser_server, request):
    """The editor freshly loaded from the server; a screenshot of the end state is kept per test."""
    browser.goto(browser_server.url + "/")
    browser.wait_for(READY_JS, timeout_s=120)
    browser.evaluate("() => { app.graph.clear(); }")
    yield browser
    browser.screenshot(ARTIFACTS / f"{request.node.name}.png")
