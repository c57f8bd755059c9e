"""Model folders of the transformers loader: models/text_encoders and models/LLM (registered once)."""
from __future__ import annotations

import os

from ..vl_core.encoders.hf_folder import check_qwen3vl_folder

VL_FOLDER_KEYS = ("text_encoders", "LLM")
MAX_FOLDER_DEPTH = 3          # models/LLM/<org>/<name>/config.json is found; deeper is not


def register_folders() -> None:
    """Register ComfyUI folder key "LLM" (models/LLM) if no one has yet. Called at node-load time."""
    import folder_paths

    if "LLM" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("LLM", os.path.join(folder_paths.models_dir, "LLM"))


def _vl_roots() -> list[str]:
    import folder_paths

    register_folders()
    roots = []
    for key in VL_FOLDER_KEYS:
        try:
            roots.extend(folder_paths.get_folder_paths(key))
        except KeyError:
            continue
    return [os.path.abspath(r) for r in roots]


def list_vl_folders() -> list[str]:
    """Sub-folders (up to MAX_FOLDER_DEPTH deep, '/'-separated) of models/text_encoders and models/LLM
    that hold a config.json, sorted; the first root wins for a name found twice."""
    names: list[str] = []
    for root in _vl_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= MAX_FOLDER_DEPTH:
                dirnames[:] = []
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if depth > 0 and "config.json" in filenames:
                name = rel.replace(os.sep, "/")
                if name not in names:
                    names.append(name)
                dirnames[:] = []          # a model folder's sub-folders are not models
    return sorted(names)


def resolve_vl_folder(name: str) -> str:
    """Absolute path of a name from list_vl_folders(); ValueError for names outside those folders or missing."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("no Qwen3-VL folder given: put the Hugging Face Qwen3-VL-4B-Instruct folder under "
                         "models/text_encoders or models/LLM and pick it")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts) or ":" in name:
        raise ValueError(f"folder name {name!r} is not a plain sub-folder of models/text_encoders or models/LLM")
    roots = _vl_roots()
    for root in roots:
        path = os.path.normpath(os.path.join(root, *parts))
        if os.path.commonpath([root, path]) != root:
            continue
        if os.path.isfile(os.path.join(path, "config.json")):
            return check_qwen3vl_folder(path)
    raise ValueError(f"Qwen3-VL folder {name!r} not found with a config.json under {roots}")
