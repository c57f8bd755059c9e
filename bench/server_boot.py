"""Start ComfyUI's main.py (in the current directory, the host root) inside this process, after stubbing PyAV when
it is missing (common.stub_missing_av; only ComfyUI's video types and LoadImage use it). Arguments go to main.py.
Nothing here may import torch: main.py chooses the CUDA allocator (cuda_malloc.py) before torch loads, and torch
refuses a changed allocator backend later; comfy-kitchen (which imports torch, and which Z-Image's DiT needs
for its fused rms_rope) must be installed, not stubbed.

ZIMAGE_VL_BENCH_HIDE_MODULES=a,b,... makes those top-level modules unimportable first, so a run here can mimic
the GPU machine (which lacks, e.g., alembic, av, blake3, the frontend packages) before device time is spent.

Used by bench/bench_server.py as the server's launcher: python bench/server_boot.py --listen ... --port ...
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by ZIMAGE_VL_BENCH_HIDE_MODULES)",
                                      name=fullname)
        return None


def main() -> None:
    hidden = [n for n in os.environ.get("ZIMAGE_VL_BENCH_HIDE_MODULES", "").split(",") if n]
    if hidden:
        sys.meta_path.insert(0, _Hide(hidden))
    spec = importlib.util.spec_from_file_location("zimage_vl_bench_common", HERE / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    common.stub_missing_av()
    root = Path.cwd()
    sys.path[0] = str(root)               # as `python main.py` would have it (not this folder)
    sys.argv = [str(root / "main.py"), *sys.argv[1:]]
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
