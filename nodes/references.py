"""Combine References: several VL_EMBEDS (and negative ones) into one, for every embedding / injection node."""
from __future__ import annotations

from comfy_api.latest import io

from ..vl_core.references import COMBINE_MODES, combine_references
from .common import CATEGORY, VLEmbedsType, check_vl_embeds

MAX_INPUTS = 16


def growing(name: str, socket, prefix: str, tooltip: str, minimum: int = 1) -> io.Autogrow.Input:
    """A growing list of sockets name.prefix0, name.prefix1, … (a new one appears when the last is connected);
    minimum 0 makes the whole group optional."""
    return io.Autogrow.Input(name, tooltip=tooltip, optional=minimum == 0, template=io.Autogrow.TemplatePrefix(
        socket.Input(prefix, tooltip=tooltip), prefix=prefix, min=minimum, max=MAX_INPUTS))


def connected(values) -> list:
    """The connected values of a growing input, in socket order (prefix0, prefix1, …)."""
    values = values or {}

    def index(name: str) -> int:
        digits = "".join(ch for ch in name if ch.isdigit())
        return int(digits) if digits else 0

    return [values[k] for k in sorted(values, key=index) if values[k] is not None]


def parse_weights(name: str, text: str, count: int) -> list[float]:
    """'1, 0.5' → [1.0, 0.5]; '' = all 1; one value = that value for all; otherwise exactly one per input."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name} {text!r} must be numbers separated by commas, e.g. '1, 0.5'") from None
    if not values:
        return [1.0] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} connected input(s): give one per input, "
                         "or a single value for all")
    return values


class CombineReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_CombineReferences",
            display_name="VL Combine References",
            category=CATEGORY,
            search_aliases=["multiple reference images", "negative reference", "reference", "reference image",
                            "ipadapter", "ip-adapter", "image prompt"],
            description="Combines several VL references into one VL_EMBEDS, with per-reference weights; negative "
                        "references are subtracted (refs − w·mean(negatives)). Works in Blend, Style Delta, AdaIN, "
                        "Gram Match and DiT Layer Injection.",
            inputs=[
                growing("references", VLEmbedsType, "reference_",
                        "A reference (VL Encode / Load VL Embeddings). Connect one and another socket appears."),
                io.Combo.Input("mode", options=list(COMBINE_MODES), default="average",
                               tooltip="concat: tokens side by side (spans and weights kept for the injection; "
                                       "more tokens = more compute); average: weighted mean after pooling to one "
                                       "length; norm_average: the same after giving each reference the same "
                                       "loudness, so a loud reference cannot dominate."),
                io.String.Input("weights", default="",
                                tooltip="One weight per connected reference, e.g. '1, 0.5' (>= 0); empty = all 1; "
                                        "one number = that weight for all. concat keeps them as metadata only."),
                growing("negatives", VLEmbedsType, "negative_",
                        "A reference to push away from (optional). Connect one and another socket appears.",
                        minimum=0),
                io.Float.Input("negative_weight", default=0.5, min=0.0, max=4.0, step=0.05,
                               tooltip="w in refs − w·mean(negatives); 0 = negatives ignored (exact)."),
                io.Int.Input("num_tokens", default=0, min=0, max=16384, advanced=True,
                             tooltip="average modes: token count everything is pooled to; 0 = the first "
                                     "reference's count."),
            ],
            outputs=[VLEmbedsType.Output(display_name="vl_embeds")],
        )

    @classmethod
    def execute(cls, references: io.Autogrow.Type, mode: str, weights: str, negative_weight: float,
                num_tokens: int, negatives: io.Autogrow.Type = None) -> io.NodeOutput:
        refs = [check_vl_embeds(f"reference #{i + 1}", r) for i, r in enumerate(connected(references))]
        negs = [check_vl_embeds(f"negative #{i + 1}", r) for i, r in enumerate(connected(negatives))]
        w = parse_weights("weights", weights, len(refs))
        return io.NodeOutput(combine_references(refs, w, mode, negs, negative_weight, num_tokens))
