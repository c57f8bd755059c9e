"""The VL embeddings file format (safetensors), checked field by field before anything is used.

A file holds tensors `hidden.<layer>` (floating point, one shape [B ≥ 1, N ≥ 1, D ≥ 1]) and one metadata
entry `vl_embeds`: a JSON object (format, version, layers, image_spans, prompt_span, num_layers, placement,
token_mode, source, prompt, image_sizes, width, num_tokens, extra). Every refusal is a ValueError naming
the file and the field; files written by VLEmbeds.to_safetensors (version 1) load unchanged.
"""
from __future__ import annotations

import json
import math
import os

import torch

from .extract import PLACEMENTS, TOKEN_MODES
from .types import LAYER_WEIGHTS_KEY, SAFETENSORS_FORMAT, SAFETENSORS_VERSION, VLEmbeds

METADATA_KEY = "vl_embeds"
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
MAX_METADATA_CHARS = 1_000_000
MAX_STRING_CHARS = {"source": 4096, "prompt": 100_000}
MAX_LAYERS = 1024
MAX_SPANS = 4096
MAX_IMAGE_SIDE = 1 << 20
HIDDEN_PREFIX = "hidden."


class FormatError(ValueError):
    """Internal: a refusal whose message is complete; read_embeds re-raises it as a plain ValueError."""


class FieldError(FormatError):
    """One field breaks the format (the caller adds what to do: re-save, or re-encode)."""


def _fail(label: str, field: str, rule: str) -> FieldError:
    return FieldError(f"{label}: field {field!r} {rule}")


def _int(label: str, field: str, v, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _fail(label, field, f"must be an integer, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _fail(label, field, f"is {v}, expected {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}")
    return v


def _list(label: str, field: str, v, max_len: int) -> list:
    if not isinstance(v, list):
        raise _fail(label, field, f"must be a JSON list, got {type(v).__name__}")
    if len(v) > max_len:
        raise _fail(label, field, f"has {len(v)} entries (at most {max_len})")
    return v


def _pair(label: str, field: str, v, lo: int, hi: int) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise _fail(label, field, "must be a [start, end] pair of integers")
    return _int(label, field, v[0], lo, hi), _int(label, field, v[1], lo, hi)


def _str(label: str, field: str, v, max_chars: int) -> str:
    if not isinstance(v, str):
        raise _fail(label, field, f"must be a string, got {type(v).__name__}")
    if len(v) > max_chars:
        raise _fail(label, field, f"is {len(v)} characters long (at most {max_chars})")
    return v


def _choice(label: str, field: str, v, choices) -> str:
    if v not in choices or not isinstance(v, str):
        raise _fail(label, field, f"is {str(v)[:40]!r}, expected one of {', '.join(map(repr, choices))}")
    return v


def parse_metadata(raw, label: str) -> dict:
    """The `vl_embeds` metadata string → a JSON object (bounded size and depth)."""
    if raw is None:
        raise FormatError(f"{label} is a safetensors file but not VL embeddings (no {METADATA_KEY!r} metadata); "
                          "save embeddings with the 'Save VL Embeddings' node")
    if len(raw) > MAX_METADATA_CHARS:
        raise _fail(label, METADATA_KEY, f"is {len(raw)} characters (at most {MAX_METADATA_CHARS})")
    try:
        meta = json.loads(raw, parse_constant=lambda c: None)
    except (ValueError, RecursionError) as e:
        raise _fail(label, METADATA_KEY, f"is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise _fail(label, METADATA_KEY, f"must be a JSON object, got {type(meta).__name__}")
    return meta


def check_metadata(meta: dict, tensor_layers, shape: tuple, label: str) -> dict:
    """Validate every field against the format and the file's tensors (their layers, one shape [B, N, D]);
    returns VLEmbeds keyword args."""
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise _fail(label, "format", f"is {str(meta.get('format'))[:60]!r}, expected {SAFETENSORS_FORMAT!r}")
    _int(label, "version", meta.get("version"), 1, SAFETENSORS_VERSION)
    for key in ("layers", "image_spans", "prompt_span", "num_layers", "placement", "token_mode", "source"):
        if key not in meta:
            raise _fail(label, key, "is missing")
    num_layers = _int(label, "num_layers", meta["num_layers"], 1, MAX_LAYERS)
    layers = [_int(label, "layers", v, 0, num_layers) for v in _list(label, "layers", meta["layers"], MAX_LAYERS)]
    if not layers or len(set(layers)) != len(layers):
        raise _fail(label, "layers", f"must list distinct layers, got {layers[:8]}")
    if sorted(tensor_layers) != sorted(layers):
        raise _fail(label, "layers", f"{sorted(layers)[:8]} do not match the tensors {sorted(tensor_layers)[:8]}")
    tokens = shape[1]
    for field, actual in (("width", shape[2]), ("num_tokens", tokens)):
        if field in meta and meta[field] != actual:
            raise _fail(label, field, f"is {str(meta[field])[:20]}, but the tensors have {actual}")
    spans = [_pair(label, "image_spans", s, 0, tokens) for s in _list(label, "image_spans", meta["image_spans"],
                                                                        MAX_SPANS)]
    end = 0
    for s, e in spans:
        if not (end <= s < e <= tokens):
            raise _fail(label, "image_spans", f"span [{s}, {e}) must be non-empty, ordered, non-overlapping "
                                              f"and inside [0, {tokens})")
        end = e
    ps, pe = _pair(label, "prompt_span", meta["prompt_span"], 0, tokens)
    if ps > pe or any(ps < e and s < pe for s, e in spans):
        raise _fail(label, "prompt_span", f"[{ps}, {pe}) must be ordered, inside [0, {tokens}] and not overlap "
                                          "an image span")
    token_mode = _choice(label, "token_mode", meta["token_mode"], TOKEN_MODES)
    if token_mode == "text" and spans:
        raise _fail(label, "image_spans", "must be empty when token_mode is 'text'")
    sizes = [_pair(label, "image_sizes", s, 1, MAX_IMAGE_SIDE)
             for s in _list(label, "image_sizes", meta.get("image_sizes", []), MAX_SPANS)]
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise _fail(label, "extra", f"must be a JSON object, got {type(extra).__name__}")
    _check_layer_weights(label, extra.get(LAYER_WEIGHTS_KEY), layers)
    return dict(image_spans=tuple(spans), prompt_span=(ps, pe), num_layers=num_layers, layers=layers,
                placement=_choice(label, "placement", meta["placement"], PLACEMENTS), token_mode=token_mode,
                source=_str(label, "source", meta["source"], MAX_STRING_CHARS["source"]),
                prompt=_str(label, "prompt", meta.get("prompt", ""), MAX_STRING_CHARS["prompt"]),
                image_sizes=tuple(sizes), extra=extra)


def _check_layer_weights(label: str, weights, layers: list[int]) -> None:
    """extra.layer_weights, when present: {"<stored layer>": finite weight > 0} naming every stored layer."""
    if weights is None:
        return
    field = f"extra.{LAYER_WEIGHTS_KEY}"
    if not isinstance(weights, dict) or sorted(weights) != sorted(str(v) for v in layers):
        raise _fail(label, field, f"must be a JSON object with one weight per stored layer {layers[:8]}")
    for v in weights.values():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise _fail(label, field, f"has weight {str(v)[:30]!r}; weights are finite numbers > 0")


def layer_of_key(key: str, label: str) -> int:
    """'hidden.<layer>' → layer (canonical decimal only); anything else is refused."""
    digits = key[len(HIDDEN_PREFIX):] if key.startswith(HIDDEN_PREFIX) else ""
    if not (digits.isdigit() and digits.isascii() and str(int(digits)) == digits and len(digits) <= 4):
        raise FormatError(f"{label}: tensor {key[:60]!r} is not part of the format (expected 'hidden.<layer>')")
    return int(digits)


def check_tensor_specs(specs: dict[str, tuple[str, list]], label: str) -> tuple[dict[int, str], tuple]:
    """{key: (safetensors dtype, shape)} → ({layer: key}, shared shape); floating [B≥1, N≥1, D≥1] only."""
    if not specs:
        raise FormatError(f"{label}: holds no 'hidden.<layer>' tensors; the file is not valid VL embeddings")
    keys, shapes = {}, set()
    for key, (dtype, shape) in specs.items():
        layer = layer_of_key(key, label)
        field = f"tensor {key}"
        if dtype not in FLOAT_DTYPES:
            raise _fail(label, field, f"has dtype {dtype}; VL embeddings are floating point "
                                      f"({', '.join(FLOAT_DTYPES)})")
        if len(shape) != 3 or min(shape) < 1:
            raise _fail(label, field, f"has shape {list(shape)}; expected [batch ≥ 1, tokens ≥ 1, width ≥ 1]")
        keys[layer] = key
        shapes.add(tuple(shape))
    if len(shapes) != 1:
        raise _fail(label, "hidden", f"layers must share one shape [B, N, D], got {sorted(shapes)}")
    return keys, shapes.pop()


def read_checked(path: str, label: str, metadata_key: str, what: str, saver: str, read):
    """read(raw metadata string, specs, get_tensor) inside the open safetensors file, every failure a ValueError
    naming the file: specs = {key: (dtype name, shape)} from the header, so a reader checks them before it asks
    get_tensor for any tensor. `what` names the kind ("VL embeddings"), `saver` the node that writes it."""
    from safetensors import safe_open

    try:
        if os.path.getsize(path) == 0:
            raise FormatError(f"{label} is empty: its save is still running or was interrupted; wait, or save "
                              "it again")
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(metadata_key)
            specs = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
            return read(raw, specs, f.get_tensor)
    except FieldError as e:
        raise ValueError(f"{e}; the file is not valid {what} — re-save it with '{saver}'") from None
    except FormatError as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers and buffers
        raise ValueError(f"cannot read {label} as safetensors {what} ({str(e)[:200]}); the file is corrupt "
                         "or not a safetensors file (pickles are never loaded)") from e


def read_embeds(path: str, label: str | None = None) -> VLEmbeds:
    """Load a VL embeddings file, validating every field before use; a ValueError naming file and field otherwise.

    Headers, dtypes and shapes are checked before any tensor is read; values must be finite.
    """
    label = label or path

    def read(raw, specs, get_tensor):
        meta = parse_metadata(raw, label)
        keys, shape = check_tensor_specs(specs, label)
        fields = check_metadata(meta, keys, shape, label)
        return keys, fields, {layer: get_tensor(key) for layer, key in keys.items()}

    keys, fields, hidden = read_checked(path, label, METADATA_KEY, "VL embeddings", "Save VL Embeddings", read)
    for layer, t in hidden.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{label}: field 'tensor {keys[layer]}' contains {bad} NaN/Inf values (of "
                              f"{t.numel()}); the tensor is corrupt — re-encode and save again")
    del fields["layers"]
    return VLEmbeds(hidden=hidden, **fields)


def check_writable(vl: VLEmbeds, label: str) -> None:
    """Refuse, before writing, embeddings that would not load back (same rules as read_embeds)."""
    try:
        _check_writable(vl, label)
    except FormatError as e:
        raise ValueError(f"cannot save {e}: these embeddings would not load back; check the upstream node") from None


def _check_writable(vl: VLEmbeds, label: str) -> None:
    specs = {f"{HIDDEN_PREFIX}{layer}": (next((k for k, d in FLOAT_DTYPES.items() if d == t.dtype), str(t.dtype)),
                                         list(t.shape)) for layer, t in vl.hidden.items()}
    keys, shape = check_tensor_specs(specs, label)
    try:
        raw = json.dumps(vl.metadata(), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _fail(label, METADATA_KEY, f"cannot be written as JSON ({str(e)[:80]})") from None
    meta = parse_metadata(raw, label)
    check_metadata(meta, keys, shape, label)
    for layer, t in vl.hidden.items():
        if not bool(torch.isfinite(t).all()):
            raise _fail(label, f"tensor {HIDDEN_PREFIX}{layer}", "contains NaN/Inf values; re-encode")
