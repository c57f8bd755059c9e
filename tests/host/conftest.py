"""Host tests: the REAL ComfyUI server, started once per session on loopback.

The server comes from ``COMFYUI_PATH`` (default ``$HOME/ComfyUI`` when it exists) and runs with
the interpreter running pytest, ``--cpu``, a free port and throw-away base/input/output/user/temp
directories.  Its ``custom_nodes`` folder holds two symlinks: ``comfyui-zimage-vl`` (this repo)
and ``zimage_vl_tiny_nodes`` (tools/tiny_nodes, the tiny model builders shared with the demo).

Without a host every test under tests/host is skipped with one loud line; the rest of the suite
still runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.host_harness import HOST_SKIP_REASON, ComfyServer, comfyui_path

HOST_TESTS_DIR = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- pytest hooks

def pytest_collection_modifyitems(config, items):
    if HOST_SKIP_REASON is None:
        return
    # only the tests that need the server; the workflow-file checks run everywhere
    marker = pytest.mark.skip(reason=HOST_SKIP_REASON)
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()) and Path(str(item.fspath)).resolve().is_relative_to(HOST_TESTS_DIR):
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if HOST_SKIP_REASON is not None:
        terminalreporter.write_line("!!! " + HOST_SKIP_REASON + " !!!", red=True, bold=True)


_ACTIVE_SERVER: "ComfyServer | None" = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _ACTIVE_SERVER is not None and "comfy_server" in getattr(item, "fixturenames", ()):
        rep.sections.append(("ComfyUI server log (tail)", _ACTIVE_SERVER.log_tail(120)))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    global _ACTIVE_SERVER
    root = comfyui_path()
    if root is None:
        pytest.skip(HOST_SKIP_REASON or "no ComfyUI host")
    server = ComfyServer(root, tmp_path_factory.mktemp("comfyui_host"))
    server.prepare()
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    _ACTIVE_SERVER = server
    try:
        yield server
    finally:
        _ACTIVE_SERVER = None
        server.stop()
        if os.environ.get("ZIMAGE_VL_HOST_KEEP_LOG"):
            print(f"\nComfyUI server log kept at {server.log_path}")
