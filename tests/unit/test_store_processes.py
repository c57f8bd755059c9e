"""Real processes on one folder: two savers racing on one prefix lose nothing; a save killed with SIGKILL
mid-write leaves nothing loadable and no orphan once a fresh process lists the folder."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from vl_core import store
from vl_core.types import VLEmbeds

REPO = Path(__file__).resolve().parents[2]
EXT = ".safetensors"

# the children write the embeddings format with numpy (no torch import: they start in a fraction of a second)
CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from safetensors.numpy import save, save_file
from vl_core import store

def embeds(tag, i, tokens=16):
    hidden = np.random.default_rng(ord(tag) * 1000 + i).standard_normal((1, tokens, 8), dtype=np.float32)
    meta = {"format": "comfyui-zimage-vl/vl-embeds", "version": 1, "layers": [3], "image_spans": [[0, 4]],
            "prompt_span": [4, 6], "num_layers": 8, "placement": "after_image", "token_mode": "full",
            "source": f"{tag}-{i}", "prompt": "", "image_sizes": [], "width": 8, "num_tokens": tokens, "extra": {}}
    return {"hidden.3": hidden}, {"vl_embeds": json.dumps(meta)}

mode, folder, tag = sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "race":
    print("READY", flush=True)
    sys.stdin.readline()  # "GO": both children start saving at the same moment
    for i in range(int(sys.argv[5])):
        tensors, meta = embeds(tag, i)
        print(store.save_numbered(folder, "race/r", ".safetensors", lambda p: save_file(tensors, p, meta)),
              flush=True)
else:  # "slow": write a quarter of a large embedding, say so, then hang until killed
    data = save(*embeds(tag, 0, tokens=int(sys.argv[5])))

    def slow(path):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 4])
            f.flush()
            print("WRITING", path, flush=True)
            time.sleep(120)
            f.write(data[len(data) // 4:])
    store.save_numbered(folder, "killed/big", ".safetensors", slow)
"""


def expected(tag, i, tokens=16):
    import numpy as np
    return torch.from_numpy(np.random.default_rng(ord(tag) * 1000 + i).standard_normal((1, tokens, 8), dtype=np.float32))


def child(*args):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_saving_one_prefix_lose_nothing(tmp_path):
    root = tmp_path / "vl_embeddings"
    root.mkdir()
    count = 100
    procs = {tag: child("race", root, tag, count) for tag in ("a", "b")}
    for p in procs.values():
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    for p in procs.values():
        p.stdin.write("GO\n")
        p.stdin.flush()
    names = {}
    for tag, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        names[tag] = out.split()
    all_names = names["a"] + names["b"]
    assert len(all_names) == 2 * count and len(set(all_names)) == 2 * count, "two saves got one name"
    numbers = {tag: [int(n.split("_")[-2]) for n in saved] for tag, saved in names.items()}
    assert min(numbers["a"]) < max(numbers["b"]) and min(numbers["b"]) < max(numbers["a"]), \
        f"the savers did not overlap in time, so nothing raced: {numbers}"
    assert store.list_files([str(root)], EXT) == sorted(all_names)
    assert sorted(os.listdir(root / "race")) == sorted(n.split("/")[1] for n in all_names)  # no temps left
    for tag, saved in names.items():
        for i, name in enumerate(saved):
            vl = VLEmbeds.from_safetensors(str(root / name))
            assert vl.source == f"{tag}-{i}" and torch.equal(vl.hidden[3], expected(tag, i)), name


def test_a_save_killed_mid_write_leaves_nothing_loadable_and_no_orphan(tmp_path):
    root = tmp_path / "vl_embeddings"
    root.mkdir()
    p = child("slow", root, "k", 20000)
    line = p.stdout.readline()
    assert line.startswith("WRITING"), (line, p.stderr.read() if p.poll() is not None else "")
    temp = Path(line.split(" ", 1)[1].strip())
    assert temp.is_file() and temp.stat().st_size > 0 and temp.name.endswith(store.TEMP_SUFFIX)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close(), p.stderr.close()
    reservation = root / "killed" / "big_00001_.safetensors"
    assert temp.exists() and reservation.exists() and reservation.stat().st_size == 0  # what the kill left

    # a fresh process lists the folder: nothing to load, and the cleanup rule removed the orphans
    fresh = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from vl_core import store; print(store.list_files([sys.argv[2]], '.safetensors'))",
                            str(REPO), str(root)], capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "[]", fresh
    assert not temp.exists() and not reservation.exists() and os.listdir(root / "killed") == []
    # the next save takes the first number again and loads
    vl = VLEmbeds(hidden={3: torch.ones(1, 4, 8)}, image_spans=(), prompt_span=(0, 0), num_layers=8)
    assert store.save_numbered(str(root), "killed/big", EXT, vl.to_safetensors) == "killed/big_00001_.safetensors"
    assert torch.equal(VLEmbeds.from_safetensors(str(reservation)).hidden[3], vl.hidden[3])
