"""Checks on a local Hugging Face Qwen3-VL folder and on the installed transformers (no model is loaded here)."""
from __future__ import annotations

import json
import os

QWEN3VL_MODEL_TYPE = "qwen3_vl"


def _read_model_type(path: str) -> tuple[str | None, list]:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config.get("model_type"), config.get("architectures") or []


def check_qwen3vl_folder(path: str) -> str:
    """Absolute path of a Hugging Face Qwen3-VL folder; ValueError naming the folder and what it holds otherwise."""
    path = os.path.abspath(os.fspath(path))
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path):
        raise ValueError(f"Qwen3-VL folder {name!r} not found ({path} is not a directory): put the Hugging Face "
                         "Qwen3-VL-4B-Instruct folder under models/text_encoders or models/LLM")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"folder {name!r} ({path}) has no config.json, so it is not a Hugging Face model folder: "
                         "use the full Qwen3-VL-4B-Instruct download (config.json, tokenizer, *.safetensors)")
    try:
        model_type, architectures = _read_model_type(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"folder {name!r}: cannot read config.json ({e})") from e
    if model_type != QWEN3VL_MODEL_TYPE:
        found = f"model_type {model_type!r}" + (f" ({', '.join(map(str, architectures))})" if architectures else "")
        raise ValueError(f"folder {name!r} is not a Qwen3-VL model: its config.json has {found}, expected "
                         f"model_type {QWEN3VL_MODEL_TYPE!r} (Qwen3VLForConditionalGeneration, e.g. "
                         "Qwen3-VL-4B-Instruct)")
    return path


def check_safetensors_weights(path: str) -> None:
    """ValueError unless the folder holds its weights as .safetensors (pickled .bin/.pt files are never loaded)."""
    files = os.listdir(path)
    if any(f.endswith(".safetensors") for f in files):
        return
    name = os.path.basename(os.path.normpath(path))
    pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    found = f"it has {', '.join(pickled[:3])}" if pickled else "it has no weight files"
    raise ValueError(f"folder {name!r} has no .safetensors weights ({found}): this loader reads safetensors only "
                     "(pickled PyTorch files can run code when loaded); download the safetensors release of "
                     "Qwen3-VL-4B-Instruct or convert the weights to .safetensors")


# transformers 4.x's Qwen3-VL gives other image-token states than 5.x and than ComfyUI's own Qwen3-VL for the
# same weights (its vision tower; measured on the tiny model at 4.57.1: 0.35 max abs difference at layer 1),
# and its hidden_states name other tensors (DeepStack adds in place; the last layer un-normed). The native
# backend does not depend on it and runs on 4.57.
TRANSFORMERS_BACKEND_MIN = (5, 0)


def require_transformers_for_backend(version: str | None = None) -> None:
    """Raise ValueError unless the installed transformers is new enough for this backend (≥ 5.0)."""
    if version is None:
        import transformers

        version = transformers.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < TRANSFORMERS_BACKEND_MIN:
        need = ".".join(map(str, TRANSFORMERS_BACKEND_MIN))
        raise ValueError(f"Load Qwen3-VL (transformers) needs transformers >= {need}, this environment has "
                         f"{version} (whose Qwen3-VL computes different image states): run "
                         f"`pip install -U 'transformers>={need}'` in ComfyUI's environment, or load the model "
                         "with CLIPLoader (the native backend works with transformers 4.57)")
