"""Host tests: Save / Load VL Embeddings in the REAL ComfyUI server on tiny models — hostile prefixes and
files, Save → Load in one prompt, a save racing the server, a save killed mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tools.host_harness import REPO_ROOT, add_node

LOAD, SAVE = "ZImageVL_LoadEmbeds", "ZImageVL_SaveEmbeds"


def embeds_dir(server) -> Path:
    return server.models_dir / "vl_embeddings"


def all_files(server) -> set[Path]:
    """Every file under the server's models folder (to see what a save wrote, and where)."""
    return {p for p in server.models_dir.rglob("*") if p.is_file() or p.is_symlink()}


def encode_prompt(server, prompt_text="a picture") -> tuple[dict, str]:
    """LoadImage -> tiny native Qwen3-VL -> VL Encode (layer -3, 64 image tokens)."""
    p = {}
    img = add_node(p, "LoadImage", {"image": server.stage_ref_image("test_scene.png", size=128)})
    clip = add_node(p, "TinyQwen3VLClip", {"seed": 0, "hidden_size": 256})
    enc = add_node(p, "ZImageVL_Encode", {
        "image": [img, 0], "clip": [clip, 0], "prompt": prompt_text, "layers": "-3", "token_mode": "full",
        "placement": "after_image", "max_image_tokens": 64, "resize": "fit_budget", "outlier_threshold": 10.0,
        "outlier_mode": "none"})
    return p, enc


def saved_name(entry: dict, node_id: str) -> str:
    text = "".join(entry["outputs"][node_id]["text"])
    assert text.startswith("saved "), text
    return text[len("saved "):]


def expect_error(server, prompt: dict):
    with pytest.raises(server.Error) as ei:
        server.submit(prompt)
    return ei.value


def load_inspect_prompt(name) -> tuple[dict, str]:
    p = {}
    load = add_node(p, LOAD, {"name": name})
    ins = add_node(p, "ZImageVL_Inspect", {"vl_embeds": [load, 0], "outlier_threshold": 10.0})
    add_node(p, "PreviewImage", {"images": [ins, 0]})
    return p, load


def test_load_name_is_a_file_list_that_takes_a_string_link(comfy_server):
    spec = comfy_server.object_info(refresh=True)[LOAD]["input"]["required"]["name"]
    assert set(spec[0].split(",")) == {"COMBO", "STRING"}, spec
    assert spec[1].get("widgetType") == "COMBO" and isinstance(spec[1].get("options"), list), spec
    save_out = comfy_server.object_info()[SAVE]["output"]
    assert save_out == ["STRING"], save_out


def test_save_then_load_in_one_prompt_loads_what_was_saved(comfy_server):
    from vl_core.types import VLEmbeds
    import torch

    listed = comfy_server.object_info(refresh=True)[LOAD]["input"]["required"]["name"][1]["options"]
    assert not any(n.startswith("chain/") for n in listed), listed  # the fresh name cannot be in the list
    p, enc = encode_prompt(comfy_server, "chain test")
    save = add_node(p, SAVE, {"vl_embeds": [enc, 0], "filename_prefix": "chain/ref"})
    load = add_node(p, LOAD, {"name": [save, 0]})
    copy = add_node(p, SAVE, {"vl_embeds": [load, 0], "filename_prefix": "chain/copy"})
    entry = comfy_server.submit(p)
    first, second = saved_name(entry, save), saved_name(entry, copy)
    assert (first, second) == ("chain/ref_00001_.safetensors", "chain/copy_00001_.safetensors")
    a = VLEmbeds.from_safetensors(str(embeds_dir(comfy_server) / first))
    b = VLEmbeds.from_safetensors(str(embeds_dir(comfy_server) / second))
    assert a.metadata() == b.metadata() and a.prompt == "chain test"
    assert all(torch.equal(a.hidden[k], b.hidden[k]) for k in a.layers)


@pytest.mark.parametrize("prefix,folder", [(".", ""), ("./", ""), ("", ""), ("dot/.", "dot/"), ("  ", "")])
def test_prefix_naming_the_folder_saves_strictly_inside_it(comfy_server, prefix, folder):
    p, enc = encode_prompt(comfy_server)
    save = add_node(p, SAVE, {"vl_embeds": [enc, 0], "filename_prefix": prefix})
    before = all_files(comfy_server)
    name = saved_name(comfy_server.submit(p), save)
    new = all_files(comfy_server) - before
    path = embeds_dir(comfy_server) / name
    assert new == {path} and name.startswith(folder + "vl_embeds_"), (name, new)
    assert path.resolve().parent.is_relative_to(embeds_dir(comfy_server).resolve())


@pytest.mark.parametrize("prefix,rule", [
    ("sub/..", "'..'"), ("../escape", "'..'"), ("/tmp/abs", "absolute"), ("nul\x00byte", "NUL byte"),
    ("x" * 300, "longer than"), ("blocker/x", "existing file, not a folder"), ("con", "reserved"),
    ("a<b", "character"), (".hidden", "starts with '.'"),
])
def test_bad_prefixes_are_refused_naming_filename_prefix(comfy_server, prefix, rule):
    embeds_dir(comfy_server).mkdir(parents=True, exist_ok=True)
    (embeds_dir(comfy_server) / "blocker").write_bytes(b"a file in the way")
    p, enc = encode_prompt(comfy_server)
    add_node(p, SAVE, {"vl_embeds": [enc, 0], "filename_prefix": prefix})
    before = all_files(comfy_server)
    err = expect_error(comfy_server, p)
    assert err.node_type == SAVE and err.exception_type.endswith("ValueError"), err.text
    assert "filename_prefix" in err.text and rule in err.text, err.text
    assert all_files(comfy_server) == before


def _write_embeds(path: Path, tensors: dict, **meta_changes) -> None:
    import torch
    from safetensors.torch import save_file

    from vl_core.types import VLEmbeds

    base = VLEmbeds(hidden={6: torch.randn(1, 24, 256)}, image_spans=((2, 18),), prompt_span=(18, 22),
                    num_layers=8, source="hostile")
    meta = base.metadata() | meta_changes
    save_file(tensors or {"hidden.6": base.hidden[6]}, str(path), metadata={"vl_embeds": json.dumps(meta)})


def test_hostile_files_are_refused_naming_file_and_field(comfy_server):
    import torch

    folder = embeds_dir(comfy_server) / "hostile"
    folder.mkdir(parents=True, exist_ok=True)
    cases = {
        "int8.safetensors": ({"hidden.6": torch.zeros(1, 24, 256, dtype=torch.int8)}, {}, "tensor hidden.6"),
        "batch0.safetensors": ({"hidden.6": torch.zeros(0, 24, 256)}, {}, "tensor hidden.6"),
        "bigsource.safetensors": (None, {"source": "s" * 5_000_000}, "vl_embeds"),
        "span.safetensors": (None, {"image_spans": [[20, 30]]}, "image_spans"),
        "mode.safetensors": (None, {"token_mode": 5}, "token_mode"),
        "layers.safetensors": (None, {"num_layers": 4}, "layers"),
    }
    for name, (tensors, meta, _) in cases.items():
        _write_embeds(folder / name, tensors, **meta)
    (folder / "empty.safetensors").write_bytes(b"")
    for name, (_, _, field) in cases.items():
        err = expect_error(comfy_server, load_inspect_prompt(f"hostile/{name}")[0])
        assert err.node_type == LOAD and err.exception_type.endswith("ValueError"), err.text
        assert f"hostile/{name}" in err.text and field in err.text, err.text
    err = expect_error(comfy_server, load_inspect_prompt("hostile/empty.safetensors")[0])
    assert "interrupted" in err.text, err.text
    listed = comfy_server.object_info(refresh=True)[LOAD]["input"]["required"]["name"][1]["options"]
    assert "hostile/empty.safetensors" not in listed and "hostile/int8.safetensors" in listed, listed


def test_a_save_racing_the_server_on_one_folder_loses_nothing(comfy_server):
    """The server saves prompts 'race i' while another process saves the same prefix into the same folder."""
    from vl_core.types import VLEmbeds

    count, child_count = 6, 40
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import numpy as np\n"
            "from safetensors.numpy import save_file; from vl_core import store\n"
            "for i in range(int(sys.argv[3])):\n"
            "    meta = {'format': 'comfyui-zimage-vl/vl-embeds', 'version': 1, 'layers': [6], 'image_spans': [],"
            " 'prompt_span': [0, 0], 'num_layers': 8, 'placement': 'after_image', 'token_mode': 'full',"
            " 'source': f'child-{i}'}\n"
            "    t = {'hidden.6': np.full((1, 4, 256), float(i), dtype=np.float32)}\n"
            "    write = lambda p: save_file(t, p, {'vl_embeds': json.dumps(meta)})\n"
            "    print(store.save_numbered(sys.argv[2], 'race/r', '.safetensors', write), flush=True)\n")
    ids = []
    for i in range(count):  # queue the server's saves first, then start the child while they run
        p, enc = encode_prompt(comfy_server, f"race {i}")
        save = add_node(p, SAVE, {"vl_embeds": [enc, 0], "filename_prefix": "race/r"})
        ids.append((comfy_server.post_prompt(p)["prompt_id"], save))
    child = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(embeds_dir(comfy_server)), str(child_count)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    server_names = [saved_name(comfy_server.wait_history(pid), save) for pid, save in ids]
    names = server_names + child.stdout.split()
    assert len(set(names)) == count + child_count, names
    files = sorted(p.name for p in (embeds_dir(comfy_server) / "race").iterdir())
    assert files == sorted(n.split("/")[1] for n in names), files  # every save present, no temp left
    for i, n in enumerate(server_names):
        assert VLEmbeds.from_safetensors(str(embeds_dir(comfy_server) / n)).prompt == f"race {i}", n
    for i, n in enumerate(child.stdout.split()):
        vl = VLEmbeds.from_safetensors(str(embeds_dir(comfy_server) / n))
        assert vl.source == f"child-{i}" and float(vl.hidden[6][0, 0, 0]) == float(i), n


def test_a_save_killed_mid_write_then_the_server_lists_and_loads_nothing_partial(comfy_server):
    folder = embeds_dir(comfy_server)
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from vl_core import store\n"
            "def slow(path):\n"
            "    f = open(path, 'wb'); f.write(b'\\0' * (1 << 20)); f.flush()\n"
            "    print('WRITING', path, flush=True); time.sleep(120)\n"
            "store.save_numbered(sys.argv[2], 'killed/big', '.safetensors', slow)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(REPO_ROOT), str(folder)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("WRITING"), (line, child.stderr.read())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close(), child.stderr.close()
    temp = Path(line.split(" ", 1)[1].strip())
    reservation = folder / "killed" / "big_00001_.safetensors"
    assert temp.stat().st_size == 1 << 20 and reservation.stat().st_size == 0  # what the kill left behind

    err = expect_error(comfy_server, load_inspect_prompt("killed/big_00001_.safetensors")[0])
    assert "interrupted" in err.text or "not found" in err.text, err.text
    listed = comfy_server.object_info(refresh=True)[LOAD]["input"]["required"]["name"][1]["options"]
    assert not any(n.startswith("killed/") for n in listed), listed
    assert not temp.exists() and not reservation.exists(), os.listdir(folder / "killed")
    err = expect_error(comfy_server, load_inspect_prompt("killed/big_00001_.safetensors")[0])
    assert "not found" in err.text, err.text
