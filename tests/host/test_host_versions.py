"""The pack on a host that lacks what it needs: one log line, no nodes, the host keeps working.

Each case loads the pack with the host's own loader (``nodes.load_custom_node``) in a fresh interpreter.
An older ComfyUI cannot be had offline, so the old API is simulated the way 0.3.64 differs: its
``io.Combo.Input`` has no ``advanced`` keyword (the reported import crash).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tools.host_harness import REPO_ROOT, comfyui_path

LOADER = textwrap.dedent("""
    import asyncio, json, logging, sys
    host, pack, simulate_old = sys.argv[1], sys.argv[2], sys.argv[3] == "old"
    sys.path.insert(0, host)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.name, record.levelname, record.getMessage()))
    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.INFO)
    import nodes
    from comfy_api.latest import io
    if simulate_old:
        real = io.Combo.Input.__init__
        def old_init(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None, extra_dict=None, raw_link=None):
            real(self, id, options, display_name, optional, tooltip, lazy, default, control_after_generate,
                 upload, image_folder, remote, socketless, extra_dict, raw_link)
        io.Combo.Input.__init__ = old_init
    ok = asyncio.run(nodes.load_custom_node(pack, module_parent="custom_nodes"))
    mine = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("ZImageVL_"))
    print(json.dumps({"ok": ok, "nodes": mine, "core": "KSampler" in nodes.NODE_CLASS_MAPPINGS,
                      "records": [r for r in records if r[1] in ("WARNING", "ERROR")]}))
""")


def _load(mode: str) -> dict:
    host = comfyui_path()
    if host is None:
        pytest.skip("no ComfyUI host")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(host), str(REPO_ROOT), mode], cwd=str(host),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_supported_host_registers_every_node():
    result = _load("current")
    assert result["ok"] and result["core"]
    assert "ZImageVL_DiTInjection" in result["nodes"] and "ZImageVL_Encode" in result["nodes"], result
    assert not [r for r in result["records"] if "zimage" in r[2].lower()], result["records"]


def test_host_without_the_needed_api_gets_one_line_and_no_nodes():
    result = _load("old")
    assert result["nodes"] == [], result
    assert result["core"], "the rest of the host must keep working"
    ours = [r for r in result["records"] if "comfyui-zimage-vl" in r[2] or r[0] == "comfyui-zimage-vl"]
    assert len(ours) == 1, result["records"]
    assert ours[0][0] == "comfyui-zimage-vl" and ">= 0.29.0" in ours[0][2] and "advanced" in ours[0][2]
    assert not [r for r in result["records"] if "Traceback" in r[2] or "Error while calling" in r[2]]
