"""What this pack needs from its ComfyUI host, checked before any node module is imported.

ComfyUI's V3 API has no frozen version to write against: ``comfy_api.v0_0_2`` re-exports
``comfy_api.latest``'s ``io`` unchanged, so a host update can change the classes under us. Instead of
dying at import with a TypeError deep in a schema (``Combo.Input() got an unexpected keyword argument
'advanced'`` on 0.3.64), the entry point asks `missing_features` first and, on a host that lacks
something, logs one line naming the ComfyUI version needed and registers nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect

REQUIRED_COMFYUI = "0.29.0"


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def missing_features(io=None, find_spec=importlib.util.find_spec) -> list[str]:
    """Names of the host features this pack uses that `io` (default: comfy_api.latest.io) / the host lack."""
    if io is None:
        try:
            from comfy_api.latest import io
        except ImportError:
            return ["comfy_api.latest (the V3 node API)"]
    missing = []
    for name in ("ComfyNode", "Schema", "Custom", "NodeOutput", "Combo", "Float", "Int", "String", "Boolean",
                 "Image", "Model", "Conditioning", "Clip", "Mask", "Latent"):
        if not hasattr(io, name):
            missing.append(f"io.{name}")
    combo = getattr(getattr(io, "Combo", None), "Input", None)
    if combo is not None and not _accepts(combo.__init__, "advanced"):
        missing.append("advanced inputs (io.Combo.Input(advanced=...))")
    schema = getattr(io, "Schema", None)
    if schema is not None and dataclasses.is_dataclass(schema):
        fields = {f.name for f in dataclasses.fields(schema)}
        for field in ("search_aliases", "is_output_node"):
            if field not in fields:
                missing.append(f"io.Schema.{field}")
    for module in ("comfy.text_encoders.qwen3vl", "comfy.ldm.lumina.model"):
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(f"{module} (native Qwen3-VL / Z-Image)")
    return missing


def unsupported_message(missing: list[str]) -> str:
    """The one log line for a host that lacks what the pack needs."""
    return (f"comfyui-zimage-vl needs ComfyUI >= {REQUIRED_COMFYUI}; this ComfyUI lacks "
            f"{', '.join(missing)} — no nodes of this pack were registered (update ComfyUI to use them)")
