"""The sweep runner (python -m tools.sweep, a real subprocess) against two REAL ComfyUI servers on tiny models:
the session server (A) and a second one started here (B). A 3×3 grid (blend alpha × seeds) with metric nodes.

- B is SIGKILLed mid-sweep and restarted on its port → every cell exactly once, CSV/grid/plots complete,
  the cell B lost ran again, and B took work again after its restart;
- the runner is SIGKILLed and resumed → no cell finished before the kill is submitted again (counted in both
  servers' /history by the job key the runner puts in extra_data).
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tools.host_harness as harness
from tools.sweep import GridError, SweepSpec, grid, run_sweep
from tools.host_harness import (REPO_ROOT, ComfyServer, add_node, comfyui_path, load_api_workflow, node_of, set_image,
                                set_inputs, swap_loaders_for_tiny)

ALPHAS = "0,0.5,1"
SEEDS = "11,12,13"
CELLS = 9
WAIT_S = float(os.environ.get("ZIMAGE_VL_HOST_PROMPT_TIMEOUT", "240"))


class _ServerB(ComfyServer):
    def _make_tiny_hf_folder(self):  # the sweep uses the native tiny VL model only
        self.tiny_hf_error = "not made for the sweep server"


def _kill(server: ComfyServer) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)  # the whole session it was started in (start_new_session)
    server.proc.wait(timeout=30)
    server.stop()


def _restart_on_same_port(server: ComfyServer, monkeypatch) -> None:
    port = server.port
    with monkeypatch.context() as m:
        m.setattr(harness, "_free_port", lambda: port)
        server.start()


def _workflow(server_a: ComfyServer, server_b: ComfyServer) -> dict:
    p = swap_loaders_for_tiny(load_api_workflow("VL Style Reference"), seed=0)
    image = server_a.stage_ref_image("test_scene.png", size=64)
    assert server_b.stage_ref_image("test_scene.png", size=64) == image  # LoadImage's combo must hold on both
    set_image(p, image)
    set_inputs(p, "EmptySD3LatentImage", width=64, height=64, batch_size=1)
    set_inputs(p, "KSampler", steps=1)
    decoded = [node_of(p, "VAEDecode"), 0]
    add_node(p, "ZImageVL_ColourSimilarity", {"image": decoded, "reference": [node_of(p, "LoadImage"), 0], "bins": 32},
             title="Colour")
    add_node(p, "ZImageVL_ArtifactScore", {"image": decoded, "period": 16}, title="Grid")
    return p


@pytest.fixture(scope="module")
def two_servers(comfy_server, tmp_path_factory):
    root = comfyui_path()
    b = _ServerB(root, tmp_path_factory.mktemp("comfyui_sweep_b"))
    b.prepare()
    try:
        b.start()
        workflow = _workflow(comfy_server, b)
        # build the tiny models once per server, both at once: cells then cost one sampling each
        warmups = [threading.Thread(target=s.submit, args=(workflow,)) for s in (comfy_server, b)]
        for t in warmups:
            t.start()
        for t in warmups:
            t.join()
        assert all(s.get_json("/history") for s in (comfy_server, b)), "a warm-up prompt did not run"
        yield comfy_server, b, workflow
    finally:
        b.stop()


def _runner(out: Path, workflow_path: Path, servers, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tools.sweep", str(workflow_path), "--grid", f'"VL Embedding Blend".alpha={ALPHAS}',
           "--seeds", SEEDS, "--out", str(out), *extra]
    for s in servers:
        cmd += ["--server", s.url]
    log = open(out.parent / f"{out.name}_runner_{len(list(out.parent.glob(out.name + '_runner_*')))}.log", "wb")
    return subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _runner_logs(proc: subprocess.Popen) -> str:
    out = Path(proc.args[proc.args.index("--out") + 1])
    logs = [p.read_text(errors="replace")[-4000:] for p in sorted(out.parent.glob(out.name + "_runner_*"))]
    sweep_log = out / "sweep.log"
    return "\n".join(logs) + ("\n--- sweep.log ---\n" + sweep_log.read_text()[-4000:] if sweep_log.is_file() else "")


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.endswith("}")]


def _wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the runner exited ({proc.returncode}) before {what}:\n{_runner_logs(proc)}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(proc: subprocess.Popen, out: Path) -> None:
    try:
        rc = proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, f"runner exit {rc}\n{_runner_logs(proc)}"


def _check_outputs_complete(out: Path) -> list[dict]:
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == CELLS and len(set(keys)) == CELLS, f"results.jsonl keys: {keys}"
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert {(r["params"]["VL Embedding Blend.alpha"], r["seed"]) for r in rows} == \
        {(a, s) for a in (0.0, 0.5, 1.0) for s in (11, 12, 13)}
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["key"] for r in table) == sorted(keys)
    for r in table:
        for col in ("Colour.intersection", "Colour.emd", "Grid.artifact_db"):
            assert r[col] not in ("", None), (col, r)
        assert 0.0 <= float(r["Colour.intersection"]) <= 1.0
        assert r["server"] and r["prompt_id"] and float(r["execution_s"]) > 0
        for image in r["images"].split():
            assert (out / image).is_file()
    from PIL import Image
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= 3 * 192 and grid.height >= 3 * 192
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [
        "Colour.emd.png", "Colour.intersection.png", "Grid.artifact_db.png"]
    return rows


def _frozen_flights(server: ComfyServer, out: Path, busy, attempts: int = 5) -> dict:
    """The runner's cells in flight on `server` once it is frozen (SIGSTOP) and the runner has read whatever the
    server sent before: cells that server can no longer finish. (A snapshot taken while it runs races with its
    finishing that very cell.) busy(): waits until the server has a cell in flight again, for another try."""
    for _ in range(attempts):
        busy()
        os.kill(server.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)
        flights = {k: f for k, f in _state(out).get("in_flight", {}).items() if f["server"] == server.url}
        if flights:
            return flights
        os.kill(server.proc.pid, signal.SIGCONT)     # it had just finished its cell: let it take another
    raise AssertionError(f"no cell stayed in flight on {server.url} once it was frozen ({attempts} tries)")


def test_server_killed_and_restarted_mid_sweep(two_servers, tmp_path, monkeypatch):
    a, b, workflow = two_servers
    wf = tmp_path / "workflow.json"
    wf.write_text(json.dumps(workflow))
    out = tmp_path / "killed_server"
    proc = _runner(out, wf, [a, b])
    try:
        def b_busy_after_one_result():
            flights = {k: f for k, f in _state(out).get("in_flight", {}).items() if f["server"] == b.url}
            done_on_b = [r for r in _rows(out) if r["server"] == b.url]
            return flights if flights and done_on_b else None

        _wait_for("B to finish a cell and start another", b_busy_after_one_result, proc)
        os.kill(a.proc.pid, signal.SIGSTOP)  # A pauses so that, once back, B must take work again
        try:
            lost = _frozen_flights(b, out, lambda: _wait_for("B's cell in flight", b_busy_after_one_result, proc))
            _kill(b)
            _wait_for("the runner to requeue B's cell",
                      lambda: not any(f["server"] == b.url for f in _state(out).get("in_flight", {}).values()), proc)
            restarted_at = time.time()
            _restart_on_same_port(b, monkeypatch)
            _wait_for("B to get a cell after its restart",
                      lambda: any(f["server"] == b.url for f in _state(out).get("in_flight", {}).values()), proc)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        _finish(proc, out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = {r["key"]: r for r in _check_outputs_complete(out)}
    (key, flight), = lost.items()
    assert rows[key]["prompt_id"] != flight["prompt_id"], "the cell B lost was not run again"
    assert any(r["server"] == b.url and r["finished_at"] > restarted_at for r in rows.values()), \
        "B took no work after its restart"
    log = (out / "sweep.log").read_text()
    assert f"server {b.url} down" in log and f"server {b.url} back" in log


def _submissions(servers, client_id: str) -> dict[str, int]:
    """Job key -> how many prompts this sweep (its client id) submitted for it, over every server's /history."""
    counts: dict[str, int] = {}
    for s in servers:
        for entry in s.get_json("/history").values():
            extra = entry["prompt"][3]
            if extra.get("client_id") == client_id and "zimage_vl_sweep_key" in extra:
                counts[extra["zimage_vl_sweep_key"]] = counts.get(extra["zimage_vl_sweep_key"], 0) + 1
    return counts


def test_runner_killed_and_resumed_submits_no_finished_cell_again(two_servers, tmp_path):
    a, b, workflow = two_servers
    wf = tmp_path / "workflow.json"
    wf.write_text(json.dumps(workflow))
    out = tmp_path / "killed_runner"
    proc = _runner(out, wf, [a, b])
    try:
        _wait_for("three finished cells and one in flight",
                  lambda: len(_rows(out)) >= 3 and _state(out).get("in_flight"), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finished_before = {r["key"] for r in _rows(out)}
    state = _state(out)
    assert len(finished_before) < CELLS, "the sweep ended before the kill: nothing left to resume"

    refused = subprocess.run([sys.executable, "-m", "tools.sweep", str(wf), "--grid", f"9.alpha={ALPHAS}",
                              "--seeds", SEEDS, "--out", str(out), "--server", a.url],
                             cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr, refused.stderr
    again = _runner(out, wf, [a, b], "--resume")
    _finish(again, out)
    rows = _check_outputs_complete(out)
    counts = _submissions([a, b], state["client_id"])
    assert set(counts) == {r["key"] for r in rows}
    assert all(counts[k] == 1 for k in finished_before), {k: counts[k] for k in finished_before}
    assert all(n == 1 for n in counts.values()), counts  # in-flight cells were looked up, not resubmitted
    in_flight = set(state["in_flight"]) - finished_before
    adopted = [line for line in (out / "sweep.log").read_text().splitlines() if " adopt " in line]
    assert len(adopted) == len(in_flight) and all(any(k in line for line in adopted) for k in in_flight), \
        (in_flight, adopted)  # each cell in flight at the kill was looked up on its server first


def test_bad_grids_are_refused_before_anything_is_submitted(two_servers, tmp_path):
    a, b, workflow = two_servers
    wf = tmp_path / "workflow.json"
    wf.write_text(json.dumps(workflow))
    before = len(a.get_json("/history")) + len(b.get_json("/history"))
    cases = {
        "42.alpha=0,1": "no node with id or title '42'",
        '"VL Embedding Blend".alfa=0': "has no input 'alfa'",
        '"VL Embedding Blend".alpha=0,lots': "'lots' is not a number",
        '"VL Embedding Blend".mode=linear,cubic': "'cubic' is not a choice",
        '"VL Embedding Blend".conditioning=1': "is a link from node",
        "6.image=test_scene_64.png,not_there.png": "'not_there.png' is not a choice",
    }
    infos = {a.url: a.object_info(refresh=True), b.url: b.object_info(refresh=True)}
    for axis, message in cases.items():  # against the servers' real /object_info: each refusal names the fix
        with pytest.raises(GridError, match=re.escape(message)):
            grid.validate_axis(grid.parse_axis(axis, workflow), workflow, infos)
    # the API as imported refuses before it submits or writes anything
    spec = SweepSpec(workflow, ['"VL Embedding Blend".mode=linear,cubic'], [a.url, b.url], tmp_path / "bad",
                     progress=False)
    with pytest.raises(GridError, match="'cubic' is not a choice"):
        asyncio.run(run_sweep(spec))
    # the command: exit status 2 and the message on stderr
    r = subprocess.run([sys.executable, "-m", "tools.sweep", str(wf), "--grid", "9.alpha=0,2", "--out",
                        str(tmp_path / "bad"), "--server", a.url, "--server", b.url],
                       cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "outside 0.0..1.0" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
    assert len(a.get_json("/history")) + len(b.get_json("/history")) == before
