"""VL Inspect: per-dim std-ratio plot with outliers marked, and token accounting."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..vl_core import extract, plot, stats
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
        tokens = vl.tokens()
        image = vl.image_mask()
        subject = stats.dim_stats(tokens, image if bool(image.any()) else None)
        if conditioning is not None:
            check_conditioning(conditioning)
            ref_tokens = torch.cat([c.float().reshape(-1, c.shape[-1]) for c, _ in conditioning])[None]
            if ref_tokens.shape[-1] != vl.width:
                raise ValueError(f"conditioning is {ref_tokens.shape[-1]}-d but vl_embeds is {vl.width}-d: "
                                 "use Qwen3-VL-4B with Z-Image")
            reference, ref_name = stats.dim_stats(ref_tokens), "text conditioning"
        elif bool(image.any()) and not bool(image.all()):
            reference, ref_name = stats.dim_stats(tokens, ~image), "VL non-image tokens"
        else:
            raise ValueError("vl_embeds holds only one kind of token (token_mode image or text), so there is no "
                             "reference: connect a text conditioning, or encode with token_mode 'full'")
        ratio = stats.std_ratio(subject, reference)
        outliers = stats.find_outliers(ratio, outlier_threshold)
        what = "image tokens" if bool(image.any()) else f"{vl.token_mode} tokens"
        title = f"std ratio per dim: VL {what} / {ref_name}"
        lines = extract.token_accounting(vl) + stats.outlier_report(ratio, outliers).splitlines()
        report = "\n".join([title, *lines])
        figure = plot.ratio_figure(ratio, outliers, outlier_threshold, title, lines)
        return io.NodeOutput(figure[None], report, ui={"text": (report,)})
