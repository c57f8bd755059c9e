"""The editor's JavaScript block-weight parser/formatter (web/block_weights_core.js) agrees with the node's
(vl_core/schedule.py) on the same strings: same weights, same refusals, same canonical form. Runs the module
in node (no browser); skipped loudly without node."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.block_weights_format import format_block_weights
from vl_core.schedule import parse_block_weights, preset_blocks

CORE = Path(__file__).resolve().parents[2] / "web" / "block_weights_core.js"
SPECS = ["all", "early", "middle", "late", "EARLY:0.5", "all:0.5, 27:0", "0-9:1.0, 10-19:0.5, 27:0", "3", "3:2.5",
         "0 - 4 : 0.25; 5-5:-1", " late:0.3 ,, early ", "1e-3", "2:1e-3", "2:.5", "2:5.", "2:+0.5", "2:1_0",
         "all:0.0", "0-29:0.05", "29", "30", "9-3", "-1", "foo", "2:x", "2:inf", "2:nan", "", "  ", "1-2-3",
         "2:0.5:1", "early middle"]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node not installed: the editor's JS parser was NOT checked")

RUNNER = """
import * as core from %s;
const cases = JSON.parse(process.argv[1]);
const out = cases.map(([op, arg, n]) => {
  try {
    if (op === "parse") return { ok: core.parseBlockWeights(arg, n) };
    if (op === "format") return { ok: core.formatBlockWeights(arg) };
    return { ok: core.presetBlocks(arg, n) };
  } catch (e) { return { error: e.message }; }
});
console.log(JSON.stringify(out));
"""


def run_js(cases):
    src = RUNNER % json.dumps(CORE.as_uri())
    r = subprocess.run([NODE, "--input-type=module", "-e", src, json.dumps(cases)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def python(spec, n):
    try:
        return {"ok": parse_block_weights(spec, n)}
    except ValueError as e:
        return {"error": str(e)}


@pytest.mark.parametrize("n", [30, 12, 2])
def test_js_parser_reads_every_string_like_the_node(n):
    got = run_js([["parse", s, n] for s in SPECS])
    for spec, js in zip(SPECS, got):
        py = python(spec, n)
        assert ("ok" in js) == ("ok" in py), (spec, n, js, py)
        if "ok" in py:
            assert js["ok"] == py["ok"], (spec, n)


def test_js_presets_split_thirds_like_the_node():
    cases = [["preset", name, n] for n in (1, 2, 3, 7, 12, 30, 31) for name in ("all", "early", "middle", "late")]
    for (_, name, n), js in zip(cases, run_js(cases)):
        assert js["ok"] == preset_blocks(name, n), (name, n)


def test_js_canonical_string_is_the_nodes_and_round_trips():
    rng = random.Random(0)
    lists = [[rng.choice([0.0, 0.05, 0.25, 0.5, 0.35, 1.0, 2.5, -0.5]) for _ in range(n)]
             for n in (30, 30, 30, 12, 2, 1) for _ in range(5)]
    lists += [[1.0] * 30, [0.0] * 30]
    for weights, js in zip(lists, run_js([["format", w, 0] for w in lists])):
        spec = js["ok"]
        assert parse_block_weights(spec, len(weights)) == weights
        if any(weights):
            assert spec == format_block_weights(weights)
        else:
            assert spec == "all:0.0"  # the node's formatter gives "", which the node refuses as empty
