"""Steering-direction and calibration-map files (safetensors), checked field by field like embeddings files.

A direction file holds tensor `vector` [K, D] and metadata `vl_direction`; a calibration file holds `weight`
([D] affine, [D, D] linear) and `bias` [D] with metadata `vl_calibration`. Both are JSON objects (format,
version, the dataclass fields). The same checker runs before a save (so nothing unloadable is written) and
on load (header dtypes/shapes before any tensor is read, then finite values); every refusal is a ValueError
naming the file and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .calibrate import FITS, VLCalibration
from .embeds_file import (FLOAT_DTYPES, MAX_LAYERS, MAX_METADATA_CHARS, FormatError, _choice, _fail, read_checked,
                          _int, _list, _str)
from .steer import ESTIMATORS, VLDirection

VERSION = 1
MAX_VALUES = 1 << 20        # agreement entries, λ scores, warnings: bounded lists
MAX_TEXT = 100_000


def _finite_json(v):
    """NaN/Inf floats → None (JSON has no NaN), recursively; read back as NaN."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_json(x) for x in v]
    return v


def _float(label: str, field: str, v, lo: float = -math.inf, hi: float = math.inf, nan_ok: bool = False) -> float:
    """A JSON number in [lo, hi]; null (a NaN when saved) only when nan_ok."""
    if v is None and nan_ok:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(label, field, f"must be a finite number{' or null' if nan_ok else ''}, got {str(v)[:30]!r}")
    if not lo <= v <= hi:
        raise _fail(label, field, f"is {v}, expected {lo}..{hi}")
    return float(v)


def _layers(label: str, field: str, v, num_layers: int) -> tuple[int, ...]:
    layers = [_int(label, field, x, 0, num_layers) for x in _list(label, field, v, MAX_LAYERS)]
    if not layers or len(set(layers)) != len(layers):
        raise _fail(label, field, f"must list distinct layers, got {layers[:8]}")
    return tuple(layers)


def _mix(label: str, field: str, v, layers: tuple[int, ...]) -> dict[int, float] | None:
    """A layer mix {"<layer>": w > 0} naming exactly `layers`, or None / absent (mixed equally)."""
    if v is None:
        return None
    if not isinstance(v, dict) or sorted(v) != sorted(str(x) for x in layers):
        raise _fail(label, field, f"must be a JSON object with one weight per layer {list(layers)[:8]}")
    return {int(k): _float(label, field, w, 1e-12) for k, w in sorted(v.items(), key=lambda kv: int(kv[0]))}


def _mix_json(weights: dict[int, float] | None) -> dict | None:
    return None if weights is None else {str(k): float(w) for k, w in weights.items()}


def _strings(label: str, field: str, v) -> tuple[str, ...]:
    return tuple(_str(label, field, x, MAX_TEXT) for x in _list(label, field, v, MAX_VALUES))


def _header(label: str, meta: dict, fmt: str) -> None:
    if meta.get("format") != fmt:
        raise _fail(label, "format", f"is {str(meta.get('format'))[:60]!r}, expected {fmt!r}")
    _int(label, "version", meta.get("version"), 1, VERSION)


def _required(label: str, meta: dict, keys) -> None:
    for key in keys:
        if key not in meta:
            raise _fail(label, key, "is missing")


def _shape(label: str, specs: dict, name: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """specs[name] must be floating with one of `shapes` (-1 = any size ≥ 1)."""
    if name not in specs:
        raise _fail(label, f"tensor {name}", "is missing")
    dtype, shape = specs[name]
    if dtype not in FLOAT_DTYPES:
        raise _fail(label, f"tensor {name}", f"has dtype {dtype}; expected floating point ({', '.join(FLOAT_DTYPES)})")
    for want in shapes:
        if len(want) == len(shape) and min(shape) >= 1 and all(w in (-1, s) for w, s in zip(want, shape)):
            return tuple(shape)
    raise _fail(label, f"tensor {name}", f"has shape {list(shape)}; expected {' or '.join(map(str, shapes))}")


# --------------------------------------------------------------------------- directions

DIRECTION_KEY = "vl_direction"
DIRECTION_FORMAT = "comfyui-zimage-vl/vl-direction"
DIRECTION_METHODS = (*ESTIMATORS, "combined")


def _direction_meta(d: VLDirection) -> tuple[dict, dict]:
    meta = {"format": DIRECTION_FORMAT, "version": VERSION, "scale": d.scale, "layers": list(d.layers),
            "num_layers": d.num_layers, "method": d.method, "pairs": d.pairs,
            "explained_variance": d.explained_variance, "agreement": list(d.agreement), "prompt": d.prompt,
            "width": d.width, "num_tokens": d.num_tokens, "layer_weights": _mix_json(d.layer_weights)}
    return {"vector": d.vector}, meta


def _direction_fields(label: str, meta: dict, specs: dict) -> dict:
    """Every field checked against the format and the `vector` tensor [K, D]; VLDirection keyword args."""
    _header(label, meta, DIRECTION_FORMAT)
    _required(label, meta, ("scale", "layers", "num_layers", "method", "pairs"))
    if set(specs) != {"vector"}:
        raise _fail(label, "tensors", f"are {sorted(specs)[:8]}, expected only 'vector'")
    k, width = _shape(label, specs, "vector", ((-1, -1),))
    for field, actual in (("width", width), ("num_tokens", k)):
        if field in meta and meta[field] != actual:
            raise _fail(label, field, f"is {str(meta[field])[:20]}, but the vector is {k}×{width}")
    num_layers = _int(label, "num_layers", meta["num_layers"], 1, MAX_LAYERS)
    layers = _layers(label, "layers", meta["layers"], num_layers)
    return dict(scale=_float(label, "scale", meta["scale"], 0.0), layers=layers,
                layer_weights=_mix(label, "layer_weights", meta.get("layer_weights"), layers),
                num_layers=num_layers, method=_choice(label, "method", meta["method"], DIRECTION_METHODS),
                pairs=_int(label, "pairs", meta["pairs"], 0),
                explained_variance=_float(label, "explained_variance", meta.get("explained_variance"), 0.0, 1.0 + 1e-6,
                                          nan_ok=True),
                agreement=tuple(_float(label, "agreement", a, -1.0 - 1e-6, 1.0 + 1e-6)
                                for a in _list(label, "agreement", meta.get("agreement", []), MAX_VALUES)),
                prompt=_str(label, "prompt", meta.get("prompt", ""), MAX_TEXT))


def _direction(fields: dict, tensors: dict) -> VLDirection:
    return VLDirection(vector=tensors["vector"].float(), **fields)


# --------------------------------------------------------------------------- calibration maps

CALIBRATION_KEY = "vl_calibration"
CALIBRATION_FORMAT = "comfyui-zimage-vl/vl-calibration"
_METRICS = ("rel_error", "cosine")


def _calibration_meta(c: VLCalibration) -> tuple[dict, dict]:
    meta = {"format": CALIBRATION_FORMAT, "version": VERSION, "kind": c.kind, "vl_layers": list(c.vl_layers),
            "num_layers": c.num_layers, "text_layer": c.text_layer, "lam": c.lam, "held_out": c.held_out,
            "num_prompts": c.num_prompts, "num_tokens": c.num_tokens, "warnings": list(c.warnings),
            "width": c.width, "vl_layer_weights": _mix_json(c.vl_layer_weights)}
    return {"weight": c.weight, "bias": c.bias}, meta


def _held_out(label: str, v) -> dict:
    """{"map"/"identity": {rel_error, cosine}, "prompts": int, "lambda_scores": {λ: error}} (any part optional)."""
    if not isinstance(v, dict):
        raise _fail(label, "held_out", f"must be a JSON object, got {type(v).__name__}")
    out = {}
    for part in ("map", "identity"):
        if part in v:
            m = v[part]
            if not isinstance(m, dict):
                raise _fail(label, f"held_out.{part}", "must be a JSON object")
            out[part] = {k: _float(label, f"held_out.{part}.{k}", m.get(k), nan_ok=True) for k in _METRICS}
    if "prompts" in v:
        out["prompts"] = _int(label, "held_out.prompts", v["prompts"], 0)
    scores = v.get("lambda_scores", {})
    if not isinstance(scores, dict) or len(scores) > MAX_VALUES:
        raise _fail(label, "held_out.lambda_scores", "must be a JSON object of λ: error")
    out["lambda_scores"] = {_str(label, "held_out.lambda_scores", k, 64):
                            _float(label, "held_out.lambda_scores", s, nan_ok=True) for k, s in scores.items()}
    return out


def _calibration_fields(label: str, meta: dict, specs: dict) -> dict:
    """Every field checked against the format and the tensors (weight [D] or [D, D] by kind, bias [D])."""
    _header(label, meta, CALIBRATION_FORMAT)
    _required(label, meta, ("kind", "vl_layers", "num_layers", "text_layer", "lam"))
    if set(specs) != {"weight", "bias"}:
        raise _fail(label, "tensors", f"are {sorted(specs)[:8]}, expected 'weight' and 'bias'")
    kind = _choice(label, "kind", meta["kind"], tuple(FITS))
    (width,) = _shape(label, specs, "bias", ((-1,),))
    _shape(label, specs, "weight", ((width,),) if kind == "affine" else ((width, width),))
    if "width" in meta and meta["width"] != width:
        raise _fail(label, "width", f"is {str(meta['width'])[:20]}, but the tensors are {width} wide")
    num_layers = _int(label, "num_layers", meta["num_layers"], 1, MAX_LAYERS)
    vl_layers = _layers(label, "vl_layers", meta["vl_layers"], num_layers)
    return dict(kind=kind, vl_layers=vl_layers,
                vl_layer_weights=_mix(label, "vl_layer_weights", meta.get("vl_layer_weights"), vl_layers),
                num_layers=num_layers, text_layer=_str(label, "text_layer", meta["text_layer"], 256),
                lam=_float(label, "lam", meta["lam"], 0.0), held_out=_held_out(label, meta.get("held_out", {})),
                num_prompts=_int(label, "num_prompts", meta.get("num_prompts", 0), 0),
                num_tokens=_int(label, "num_tokens", meta.get("num_tokens", 0), 0),
                warnings=_strings(label, "warnings", meta.get("warnings", [])))


def _calibration(fields: dict, tensors: dict) -> VLCalibration:
    return VLCalibration(weight=tensors["weight"].float(), bias=tensors["bias"].float(), **fields)


# --------------------------------------------------------------------------- one reader / writer for both kinds

@dataclass(frozen=True)
class FileKind:
    """What differs between the two file kinds: metadata key, node names, (de)serialisers, the checker."""

    key: str
    what: str            # e.g. "VL direction"
    saver: str           # the node that writes it
    cls: type
    to_file: Callable    # value → (tensors, metadata)
    fields: Callable     # (label, metadata, {name: (dtype, shape)}) → constructor kwargs
    build: Callable      # (kwargs, tensors) → value


DIRECTION = FileKind(DIRECTION_KEY, "VL direction", "Save VL Direction", VLDirection, _direction_meta,
                     _direction_fields, _direction)
CALIBRATION = FileKind(CALIBRATION_KEY, "VL calibration", "Save VL Calibration", VLCalibration, _calibration_meta,
                       _calibration_fields, _calibration)


def _parse(kind: FileKind, raw, label: str) -> dict:
    if raw is None:
        raise FormatError(f"{label} is a safetensors file but not a {kind.what} (no {kind.key!r} metadata); save "
                          f"one with the '{kind.saver}' node")
    if len(raw) > MAX_METADATA_CHARS:
        raise _fail(label, kind.key, f"is {len(raw)} characters (at most {MAX_METADATA_CHARS})")
    try:
        meta = json.loads(raw, parse_constant=lambda c: None)
    except (ValueError, RecursionError) as e:
        raise _fail(label, kind.key, f"is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise _fail(label, kind.key, f"must be a JSON object, got {type(meta).__name__}")
    return meta


def _spec(t: torch.Tensor) -> tuple[str, list]:
    return next((k for k, d in FLOAT_DTYPES.items() if d == t.dtype), str(t.dtype)), list(t.shape)


def _require_finite_tensors(label: str, tensors: dict) -> None:
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise _fail(label, f"tensor {name}", f"contains {bad} NaN/Inf values (of {t.numel()})")


def write(kind: FileKind, value, path: str) -> None:
    """Save `value` (checked first with the loader's own rules) as safetensors at `path`."""
    from safetensors.torch import save_file

    label = kind.what
    if not isinstance(value, kind.cls):
        raise ValueError(f"cannot save {type(value).__name__} as a {kind.what}")
    tensors, meta = kind.to_file(value)
    tensors = {k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}
    try:
        raw = json.dumps(_finite_json(meta), allow_nan=False)
        kind.fields(label, _parse(kind, raw, label), {k: _spec(t) for k, t in tensors.items()})
        _require_finite_tensors(label, tensors)
    except (TypeError, FormatError) as e:
        raise ValueError(f"cannot save: {e}; this {kind.what} would not load back, check the upstream node") from None
    save_file(tensors, path, metadata={kind.key: raw})


def read(kind: FileKind, path: str, label: str | None = None):
    """Load a file written by `write`, every field validated before use; ValueError naming file and field."""
    label = label or path

    def read_fields(raw, specs, get_tensor):
        fields = kind.fields(label, _parse(kind, raw, label), specs)
        tensors = {k: get_tensor(k) for k in specs}
        _require_finite_tensors(label, tensors)
        return fields, tensors

    fields, tensors = read_checked(path, label, kind.key, kind.what, kind.saver, read_fields)
    return kind.build(fields, tensors)
