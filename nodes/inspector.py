"""VL Inspect: per-dim std-ratio plot with outliers marked, and token accounting."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..vl_core import plot
from .common import CATEGORY, VLEmbedsType, check_conditioning, check_vl_embeds


class VLInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_Inspect",
            display_name="VL Inspect",
            category=CATEGORY,
            description="Plots how loud each dimension of the VL image tokens is relative to a text reference "
                        "(both directions: louder AND quieter outliers) and accounts for the tokens.",
            inputs=[
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode or Load VL Embeddings."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional Z-Image text conditioning as the reference; without it the "
                                              "VL pass's own non-image tokens are the reference."),
                io.Float.Input("outlier_threshold", default=10.0, min=1.01, max=10000.0, step=0.5,
                               tooltip="Ratio (either way) from which a dim is reported as an outlier."),
            ],
            outputs=[io.Image.Output(display_name="plot"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vl_embeds, outlier_threshold: float, conditioning=None) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        reference = None
        if conditioning is not None:
            check_conditioning(conditioning)
            reference = torch.cat([c.float().reshape(-1, c.shape[-1]) for c, _ in conditioning])[None]
        figure, report = plot.inspect_embeds(vl, outlier_threshold, reference)
        image = figure[None]
        # the plot as the node's own preview (the editor shows it on the node) beside the report box's text
        return io.NodeOutput(image, report, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": (report,)})
