"""Gram Match: optimise the conditioning so its normalised token second moments match the VL reference's."""
from __future__ import annotations

import logging

import comfy.model_management as model_management
import comfy.utils
from comfy_api.latest import io

from ..vl_core import plot
from ..vl_core.gram import GramSettings, gram_match, gram_report
from .common import CATEGORY, VLEmbedsType, check_vl_embeds, map_conditioning, vl_tokens_like

log = logging.getLogger("comfyui-zimage-vl")
LOG_EVERY = 50


class GramMatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_GramMatch",
            display_name="VL Gram Match",
            category=CATEGORY,
            search_aliases=["style transfer", "gram matrix", "reference image", "reference"],
            description="Optimises the conditioning (starting at the text) so the Gram matrix of its RMS-normalised "
                        "tokens matches the reference's, while staying close to the text: second-order style "
                        "transfer without copying tokens. Untuned on real weights.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Z-Image text conditioning (the content; the start)."),
                VLEmbedsType.Input("vl_embeds", tooltip="The style reference (VL Encode; token_mode image is "
                                                        "the picture only)."),
                io.Float.Input("style_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Weight of ‖G(c) − G(vl)‖² / ‖G(vl)‖² (relative Gram error)."),
                io.Float.Input("content_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Weight of ‖c − text‖² / ‖text‖²; higher keeps the prompt's content."),
                io.Int.Input("steps", default=200, min=1, max=10000,
                             tooltip="Most Adam steps (stops earlier on a loss plateau)."),
                io.Float.Input("learning_rate", default=0.01, min=0.00001, max=1.0, step=0.001,
                               tooltip="Adam step size relative to the text's token RMS."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the starting jitter (only used when init_noise > 0)."),
                io.Float.Input("init_noise", default=0.0, min=0.0, max=1.0, step=0.01, advanced=True,
                               tooltip="Start at text + init_noise·rms·N(0, 1) instead of exactly at the text."),
                io.Int.Input("patience", default=20, min=1, max=10000, advanced=True,
                             tooltip="Stop when the loss has not improved by 0.01% for this many steps."),
            ],
            outputs=[io.Conditioning.Output(), io.Image.Output(display_name="loss_curve"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, conditioning, vl_embeds, style_weight: float, content_weight: float, steps: int,
                learning_rate: float, seed: int, init_noise: float, patience: int) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        settings = GramSettings(steps=steps, lr=learning_rate, style_weight=style_weight,
                                content_weight=content_weight, seed=seed, init_noise=init_noise, patience=patience)
        device = model_management.get_torch_device()
        results = []

        def match(cond):
            pbar = comfy.utils.ProgressBar(steps)

            def progress(step, total, loss):
                pbar.update_absolute(step + 1, total)
                if step % LOG_EVERY == 0:
                    log.info("VL Gram Match: step %d/%d, loss %.6g", step, total, loss)

            result = gram_match(cond, vl_tokens_like(vl, cond), settings, device=device, progress=progress)
            results.append(result)
            return result.conditioning

        out = map_conditioning(conditioning, match, vl.width)
        curve = plot.line_plot({f"conditioning {i + 1}": r.losses for i, r in enumerate(results)},
                               title="VL Gram Match loss", xlabel="Adam step", ylabel="loss", log_y=True)
        report = "\n".join(gram_report(r, settings) for r in results)
        return io.NodeOutput(out, curve[None], report, ui={"text": (report,)})
