"""Weighted multi-layer mixes: parse `-6:0.7, -15:0.3`, and select / re-weight the layers a VLEmbeds carries.

The weights live in VLEmbeds.extra[LAYER_WEIGHTS_KEY] ({"<layer>": w}, Σw = 1), so every consumer that reads
vl.tokens() gets Σ_l w_l·h_l; without the key the stored layers are mixed equally (the old behaviour).
parse_layer_spec is the one parser of every `layers` input (VL Encode, VL Select Layers, VL Steering Direction,
VL Fit Calibration); require_same_mix the one check that two encodings mix their layers alike.
"""
from __future__ import annotations

import math

from .extract import parse_layers, resolve_layer
from .types import LAYER_WEIGHTS_KEY, VLEmbeds

SYNTAX = "layers are 'L' or 'L1,L2' (mixed equally) or 'L1:w1, L2:w2' (weighted), e.g. -6 or -6:0.7, -15:0.3"


def _weighted_entry(part: str, spec: str) -> tuple[int, float]:
    layer, _, weight = part.partition(":")
    try:
        layer_i, w = int(layer.strip()), float(weight.strip())
    except ValueError:
        raise ValueError(f"layers {spec!r}: {part!r} is not 'layer:weight'; {SYNTAX}") from None
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"layers {spec!r}: weight {weight.strip()!r} of layer {layer_i} must be a finite number "
                         "> 0 (drop the layer instead of giving it 0)")
    return layer_i, w


def parse_layer_spec(spec: str, num_layers: int) -> tuple[list[int], dict[int, float] | None]:
    """(sorted resolved layers, normalised weights w_l / Σw or None): "-6,-2" → equal mix (None), as before;
    "-6:0.7, -15:0.3" → {26: 0.7, 17: 0.3} on a 32-layer model."""
    if not isinstance(spec, str) or ":" not in spec:
        return parse_layers(spec, num_layers), None
    parts = [p.strip() for p in spec.replace(";", ",").split(",") if p.strip()]
    if not all(":" in p for p in parts):
        raise ValueError(f"layers {spec!r}: give a weight to every layer or to none; {SYNTAX}")
    weights: dict[int, float] = {}
    for part in parts:
        layer, w = _weighted_entry(part, spec)
        resolved = resolve_layer(layer, num_layers)
        if resolved in weights:
            raise ValueError(f"layers {spec!r}: layer {layer} is listed twice; give each layer once")
        weights[resolved] = w
    total = sum(weights.values())
    return sorted(weights), {layer: w / total for layer, w in sorted(weights.items())}


def select_layers(vl: VLEmbeds, layers: list[int], weights: dict[int, float] | None) -> VLEmbeds:
    """Keep only `layers` (each must be stored) and record their weights normalised to Σw = 1 (None: mixed equally
    downstream)."""
    missing = [layer for layer in layers if layer not in vl.hidden]
    if missing:
        raise ValueError(f"layer(s) {', '.join(vl.layer_label(m) for m in missing)} are not in vl_embeds, which "
                         f"holds {', '.join(vl.layer_label(s) for s in vl.layers)}: encode them in VL Encode's "
                         "layers (e.g. '-6,-15') and select from those")
    extra = {k: v for k, v in vl.extra.items() if k != LAYER_WEIGHTS_KEY}
    if weights is not None and len(layers) > 1:
        total = sum(float(weights[layer]) for layer in layers)
        extra[LAYER_WEIGHTS_KEY] = {str(layer): float(weights[layer]) / total for layer in layers}
    return vl.with_hidden({layer: vl.hidden[layer] for layer in layers}, extra=extra)


def apply_mix(vl: VLEmbeds, layers: list[int], weights: dict[int, float] | None) -> VLEmbeds:
    """What a `layers` spec gives an encode made at exactly those layers: the weights recorded (select_layers), or
    the encode unchanged for an unweighted spec."""
    return vl if weights is None else select_layers(vl, layers, weights)


def mix_label(layers, weights: dict[int, float] | None, num_layers: int) -> str:
    """'-6 ×0.70 + -15 ×0.30', or the layers joined by ', ' when mixed equally (weights None)."""
    if weights is None:
        return ", ".join(str(layer - num_layers - 1) for layer in sorted(layers))
    return " + ".join(f"{layer - num_layers - 1} ×{w:.2f}" for layer, w in sorted(weights.items()))


def layer_mix_label(vl: VLEmbeds) -> str:
    """'-6 ×0.70 + -15 ×0.30', or the layers joined by ', ' when mixed equally."""
    return mix_label(vl.layers, vl.stored_layer_weights(), vl.num_layers)


def mix_weights(layers, weights: dict[int, float] | None) -> dict[int, float]:
    """The effective mix Σ_l w_l·h_l / Σ_l w_l that VLEmbeds.tokens() reads: the weights normalised, else 1/L each."""
    if weights is None:
        return {int(layer): 1.0 / len(layers) for layer in layers}
    total = sum(weights.values())
    return {int(layer): float(w) / total for layer, w in weights.items()}


MIX_TOLERANCE = 1e-6


def same_mix(layers_a, weights_a, layers_b, weights_b) -> bool:
    """True when two (layers, weights) read the same Σ_l w_l·h_l: same layers, |Δw_l| ≤ 1e-6 after normalising
    (an explicit equal weighting is the same mix as none)."""
    a, b = mix_weights(layers_a, weights_a), mix_weights(layers_b, weights_b)
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= MIX_TOLERANCE for k in a)


def require_same_mix(name: str, vl: VLEmbeds, ref_name: str, ref: VLEmbeds, *, what: str) -> None:
    """ValueError unless two encodings of the same layers mix them with the same weights (see same_mix)."""
    if not same_mix(vl.layers, vl.stored_layer_weights(), ref.layers, ref.stored_layer_weights()):
        raise ValueError(f"{name} mixes its layers as {layer_mix_label(vl)} but {ref_name} as "
                         f"{layer_mix_label(ref)}: {what} must use the same layer weights (the same VL Encode "
                         "layers, or one VL Select Layers spec for all)")
