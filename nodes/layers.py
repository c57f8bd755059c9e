"""VL Select Layers: pick or re-weight the layers of a multi-layer VL_EMBEDS, so each consumer gets its own mix."""
from __future__ import annotations

from comfy_api.latest import io

from ..vl_core import layer_mix
from .common import CATEGORY, VLEmbedsType, check_vl_embeds, validation_answer


class VLSelectLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_SelectLayers",
            display_name="VL Select Layers",
            category=CATEGORY,
            description="Keeps some layers of a multi-layer VL_EMBEDS (encode e.g. '-6,-15' once) with a weight "
                        "each, so different layers can feed different consumers (e.g. a middle layer into early "
                        "DiT blocks, a late one into late blocks). Untuned on real weights.",
            inputs=[
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode with several layers."),
                io.String.Input("layers", default="-6",
                                tooltip="Layers to keep, Hugging Face numbering, each one encoded upstream: '-6', "
                                        "'-6,-15' (mixed equally) or '-6:0.7, -15:0.3' (weights normalised to "
                                        "sum 1)."),
            ],
            outputs=[VLEmbedsType.Output(display_name="vl_embeds")],
        )

    @classmethod
    def validate_inputs(cls, layers: str = "-6") -> bool | str:   # only layers: ComfyUI checks the rest
        return validation_answer(layer_mix.parse_layer_spec, layers, 10_000)

    @classmethod
    def execute(cls, vl_embeds, layers: str) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        resolved, weights = layer_mix.parse_layer_spec(layers, vl.num_layers)
        out = layer_mix.select_layers(vl, resolved, weights)
        return io.NodeOutput(out, ui={"text": (f"layers {layer_mix.layer_mix_label(out)}",)})
