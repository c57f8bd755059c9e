"""The inspector figure: per-dimension std ratio on a log axis, outliers marked, token accounting beside it."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BG, AXIS, DOT, OUTLIER, BAND = (255, 255, 255), (60, 60, 60), (70, 110, 200), (220, 40, 40), (235, 235, 235)


def ratio_figure(ratio: torch.Tensor, outliers: torch.Tensor, threshold: float, title: str, lines: list[str],
                 size: tuple[int, int] = (1400, 600)) -> torch.Tensor:
    """Scatter of log10(ratio_d) against d, the ±log10(threshold) band shaded; returns [H, W, 3] float 0..1."""
    width, height = size
    img = Image.new("RGB", size, BG)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top = 70, width - 420, 40
    bottom = height - 50
    logs = torch.log10(ratio.float().clamp_min(1e-12)).cpu().numpy()
    limit = max(math.log10(threshold) * 1.5, float(np.abs(logs).max()) * 1.05, 0.5)

    def y_of(v):
        return bottom - (v + limit) / (2 * limit) * (bottom - top)

    band = math.log10(threshold)
    draw.rectangle([left, y_of(band), right, y_of(-band)], fill=BAND)
    draw.line([left, top, left, bottom], fill=AXIS)
    draw.line([left, bottom, right, bottom], fill=AXIS)
    draw.line([left, y_of(0), right, y_of(0)], fill=AXIS)
    for tick in range(-math.floor(limit), math.floor(limit) + 1):
        y = y_of(tick)
        draw.line([left - 4, y, left, y], fill=AXIS)
        draw.text((8, y - 6), f"{10.0 ** tick:g}x", fill=AXIS, font=font)
    n = len(logs)
    xs = left + (np.arange(n) + 0.5) / max(n, 1) * (right - left)
    flagged = outliers.cpu().numpy().astype(bool)
    for x, v, bad in zip(xs, logs, flagged):
        colour, r = (OUTLIER, 3) if bad else (DOT, 1)
        y = y_of(float(v))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    worst = np.flatnonzero(flagged)[np.argsort(-np.abs(logs[flagged]), kind="stable")][:10]
    for d in worst:  # label the most extreme outliers
        draw.text((xs[d] + 4, y_of(float(logs[d])) - 12), str(int(d)), fill=OUTLIER, font=font)
    draw.text((left, 10), title.replace("×", "x"), fill=AXIS, font=font)
    draw.text((left, bottom + 10), f"dimension 0..{n - 1}   (shaded: within {threshold:g}x either way; "
                                   "red: outliers, louder above, quieter below)", fill=AXIS, font=font)
    for i, line in enumerate(lines):  # the bitmap default font has no "×"
        draw.text((right + 20, top + 16 * i), line.replace("×", "x"), fill=AXIS, font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def inspect_embeds(vl, threshold: float, reference: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """(figure [H, W, 3], report) for VL Inspect: r_d = σ_d(VL image tokens) / σ_d(reference), outliers two-sided.

    reference: text tokens [B, N, D] (e.g. the Z-Image conditioning); default = the pass's own non-image tokens.
    """
    from . import extract, stats
    from .checks import require_width

    tokens = vl.tokens()
    image = vl.image_mask()
    subject = stats.dim_stats(tokens, image if bool(image.any()) else None)
    if reference is not None:
        require_width("conditioning", reference.shape[-1], "vl_embeds", vl.width)
        ref_stats, ref_name = stats.dim_stats(reference), "text conditioning"
    elif bool(image.any()) and not bool(image.all()):
        ref_stats, ref_name = stats.dim_stats(tokens, ~image), "VL non-image tokens"
    else:
        raise ValueError("vl_embeds holds only one kind of token (token_mode image or text), so there is no "
                         "reference: connect a text conditioning, or encode with token_mode 'full'")
    ratio = stats.std_ratio(subject, ref_stats)
    outliers = stats.find_outliers(ratio, threshold)
    what = "image tokens" if bool(image.any()) else f"{vl.token_mode} tokens"
    title = f"std ratio per dim: VL {what} / {ref_name}"
    lines = extract.token_accounting(vl) + stats.outlier_report(ratio, outliers).splitlines()
    return ratio_figure(ratio, outliers, threshold, title, lines), "\n".join([title, *lines])
