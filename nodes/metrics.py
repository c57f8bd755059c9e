"""Metric nodes: IMAGE in, numbers out (FLOAT sockets, on the node after a run, and in /history under
"metrics" for API use), plus a small annotated IMAGE. The math lives in vl_core.metrics."""
from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui

from ..vl_core import metrics
from .common import CATEGORY

METRICS_CATEGORY = f"{CATEGORY}/metrics"
MATCHING_PAIRS = ("CLIP ViT-L/14 vision (clip_vision_l / clip-vit-large-patch14) + clip_l text (SD1.x), "
                  "OpenCLIP ViT-H/14 vision (clip_vision_h) + the SD2.x text encoder, "
                  "OpenCLIP ViT-bigG/14 vision (clip_vision_g) + clip_g text (SDXL)")


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean())


def _metric_output(cls, image: torch.Tensor, title: str, values: dict[str, float], per_image: dict[str, list],
                   outputs: list) -> io.NodeOutput:
    """The node's result: its sockets, an annotated thumbnail, and the numbers as UI text + a metrics dict."""
    measured = {k: v for k, v in values.items() if not math.isnan(v)}  # JSON (the editor, /history) has no NaN
    lines = [title] + [f"{k}: {v:.4f}" for k, v in measured.items()]
    if image.shape[0] > 1:
        lines += [f"  {k} per image: " + ", ".join(f"{x:.3f}" for x in xs) for k, xs in per_image.items()]
    annotated = metrics.annotate(image, lines)
    shown = ui.PreviewImage(annotated, cls=cls).as_dict()
    return io.NodeOutput(*outputs, annotated,
                         ui={**shown, "text": ("\n".join(lines),), "metrics": [measured]})


class ColourSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_ColourSimilarity",
            display_name="Colour Similarity (CIELAB)",
            category=METRICS_CATEGORY,
            search_aliases=["similarity", "colour similarity", "color similarity", "palette"],
            description="How close the colours of an image are to a reference: per-channel CIELAB histograms "
                        "compared by intersection and by 1-D earth-mover distance, both 0..1 (1 = same colours). "
                        "Layout is ignored: a reshuffled picture with the same colours scores 1.",
            inputs=[
                io.Image.Input("image", tooltip="The generated image(s)."),
                io.Image.Input("reference", tooltip="The reference image (one, or as many as image)."),
                io.Int.Input("bins", default=64, min=2, max=256,
                             tooltip="Histogram bins per L/a/b channel. More bins: stricter intersection."),
            ],
            outputs=[
                io.Float.Output(display_name="intersection",
                                tooltip="Mean over L, a, b of Σ min(p, q): 1 = identical histograms."),
                io.Float.Output(display_name="emd",
                                tooltip="1 − earth-mover distance / its maximum: 1 = identical, lower the "
                                        "farther colour mass must move."),
                io.Image.Output(display_name="annotated"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, reference, bins: int) -> io.NodeOutput:
        scores = metrics.colour_similarity(image, reference, bins)
        values = {k: _mean(v) for k, v in scores.items()}
        return _metric_output(cls, image, "colour vs reference", values, {k: v.tolist() for k, v in scores.items()},
                              [values["intersection"], values["emd"]])


class ArtifactScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_ArtifactScore",
            display_name="Grid Artifact Score",
            category=METRICS_CATEGORY,
            search_aliases=["artifact", "grid artifact", "quality score"],
            description="The grid signature of a bad layer or blend: spectral energy at the DiT's 16-px patch "
                        "period (patch 2 × VAE 8) and its harmonics against the neighbouring spectrum, in dB. "
                        "About 0 dB: no grid; it rises with the grid's strength.",
            inputs=[
                io.Image.Input("image", tooltip="The generated image(s); at least 4 periods (64 px) per side."),
                io.Int.Input("period", default=metrics.DIT_PERIOD, min=2, max=256,
                             tooltip="Grid period in pixels. Z-Image: 16 (2×2 latent patches × VAE factor 8)."),
            ],
            outputs=[
                io.Float.Output(display_name="score",
                                tooltip="10·log10(harmonic energy / neighbouring energy), mean over the batch."),
                io.Image.Output(display_name="annotated"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, period: int) -> io.NodeOutput:
        score = metrics.grid_artifact_score(image, period)
        values = {"artifact_db": _mean(score)}
        return _metric_output(cls, image, f"{period}-px grid artifact", values, {"artifact_db": score.tolist()},
                              [values["artifact_db"]])


def _image_embeds(clip_vision, images: torch.Tensor) -> torch.Tensor:
    return clip_vision.encode_image(metrics.check_images("image", images), crop=True)["image_embeds"]


def _text_embeds(clip_vision, clip, text: str) -> torch.Tensor:
    """The CLIP text model's projected pooled output [1, D], refused where no image–text space is shared."""
    if "siglip" in str(getattr(clip_vision, "model_type", "")):
        raise ValueError("image–text similarity needs a CLIP vision model: ComfyUI has no SigLIP text tower "
                         f"(the SigLIP output here is its token mean). Matching pairs: {MATCHING_PAIRS}")
    if not text.strip():
        raise ValueError("text is empty: write the prompt to compare the image against, or disconnect clip")
    _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    if not torch.is_tensor(pooled):
        raise ValueError(f"the connected text model gives no pooled CLIP embedding; load one of: {MATCHING_PAIRS}")
    return pooled


class SemanticSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_SemanticSimilarity",
            display_name="Semantic Similarity (CLIP / SigLIP)",
            category=METRICS_CATEGORY,
            search_aliases=["clip score", "similarity", "image similarity", "siglip"],
            description="Cosine similarity (−1..1) of CLIP / SigLIP vision embeddings: the image vs the reference "
                        "(style/look), vs the text-only output of the same seed (content kept), and vs a text "
                        "through a matching CLIP text model. Connect at least one; unmeasured outputs are NaN "
                        "and left out of the report.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="From Load CLIP Vision (CLIP or SigLIP; no downloads)."),
                io.Image.Input("image", tooltip="The generated image(s)."),
                io.Image.Input("reference", optional=True, tooltip="The style reference: gives vs_reference."),
                io.Image.Input("text_only", optional=True,
                               tooltip="The same seed and prompt without the reference: gives vs_text_only."),
                io.Clip.Input("clip", optional=True,
                              tooltip="A CLIP text model that matches clip_vision, for image_text: "
                                      + MATCHING_PAIRS + ". Not SigLIP, not Z-Image's Qwen3."),
                io.String.Input("text", default="", multiline=True, optional=True,
                                tooltip="The text compared with the image through clip (image_text)."),
            ],
            outputs=[
                io.Float.Output(display_name="vs_reference", tooltip="cos(image, reference); NaN if not connected."),
                io.Float.Output(display_name="vs_text_only", tooltip="cos(image, text-only output); NaN if not connected."),
                io.Float.Output(display_name="image_text", tooltip="cos(image, text) via clip; NaN if not connected."),
                io.Image.Output(display_name="annotated"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip_vision, image, reference=None, text_only=None, clip=None, text: str = "") -> io.NodeOutput:
        if reference is None and text_only is None and clip is None:
            raise ValueError("nothing to compare: connect reference, text_only, or clip (+ text)")
        text_embed = _text_embeds(clip_vision, clip, text) if clip is not None else None  # checked before encoding
        embeds = _image_embeds(clip_vision, image)
        scores = {
            "vs_reference": None if reference is None else
            metrics.embedding_cosine("image", embeds, "reference", _image_embeds(clip_vision, reference)),
            "vs_text_only": None if text_only is None else
            metrics.embedding_cosine("image", embeds, "text_only", _image_embeds(clip_vision, text_only)),
            "image_text": None if text_embed is None else
            metrics.embedding_cosine("image", embeds, "text", text_embed),
        }
        values = {k: math.nan if v is None else _mean(v) for k, v in scores.items()}
        per_image = {k: v.tolist() for k, v in scores.items() if v is not None}
        return _metric_output(cls, image, "semantic (cosine)", values, per_image, list(values.values()))
