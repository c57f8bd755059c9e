"""Image metrics with known endpoints: CIELAB colour-histogram similarity, the DiT patch-grid artifact score,
embedding cosine for CLIP / SigLIP vision outputs, and a small annotated thumbnail to show the numbers."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# CIELAB channel ranges as kornia.color.rgb_to_lab returns them (L 0..100, a/b about -128..127 for sRGB).
LAB_RANGES = ((0.0, 100.0), (-128.0, 128.0), (-128.0, 128.0))
# Z-Image's DiT sees 2×2 latent patches and the VAE downsamples by 8: one token covers 16×16 pixels.
DIT_PERIOD = 16
# Spectral bins on each side of a harmonic that form its neighbourhood (fewer on small images).
GRID_NEIGHBOURS = 4
# Luma weights (Rec. 601) for the artifact spectrum.
LUMA = (0.299, 0.587, 0.114)


def check_images(name: str, images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C≥3] → float [B, H, W, 3] in 0..1 (alpha dropped); ValueError if not an image batch."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] < 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} must be an IMAGE batch [batch, height, width, 3], got {shape}: "
                         "connect a VAE Decode or Load Image output")
    rgb = images[..., :3].float()
    if not bool(torch.isfinite(rgb).all()):
        raise ValueError(f"{name} contains NaN/Inf pixels: the upstream decode failed")
    return rgb.clamp(0.0, 1.0)


def _pair_batches(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a batch of 1 against the other; any other size mismatch is an error."""
    if a.shape[0] == b.shape[0]:
        return a, b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    raise ValueError(f"{name_a} has {a.shape[0]} images and {name_b} has {b.shape[0]}: give the same number, "
                     "or a single one to compare against all")


# --------------------------------------------------------------------------- colour

def lab_histograms(images: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-channel CIELAB histograms [B, 3, bins], each summing to 1, linearly binned: a value at position
    p = (x − lo)/(hi − lo)·(bins − 1) gives 1 − frac(p) to bin ⌊p⌋ and frac(p) to the next (no jumps at bin edges)."""
    if int(bins) < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    try:  # ComfyUI installs kornia (a "non essential" requirement): the pack still loads without it
        import kornia.color
    except ImportError:
        raise ValueError("the colour metric needs kornia: pip install 'kornia>=0.7.1' in ComfyUI's "
                         "environment (ComfyUI's requirements.txt lists it)") from None
    rgb = check_images("image", images)
    lab = kornia.color.rgb_to_lab(rgb.movedim(-1, 1)).flatten(2)  # [B, 3, HW]
    lo = torch.tensor([r[0] for r in LAB_RANGES], device=lab.device).view(1, 3, 1)
    hi = torch.tensor([r[1] for r in LAB_RANGES], device=lab.device).view(1, 3, 1)
    pos = ((lab - lo) / (hi - lo)).clamp(0, 1) * (bins - 1)
    left = pos.floor().clamp(max=bins - 2)
    frac = pos - left
    counts = torch.zeros(*lab.shape[:2], int(bins), device=lab.device)
    counts.scatter_add_(2, left.long(), 1.0 - frac).scatter_add_(2, left.long() + 1, frac)
    return counts / counts.sum(-1, keepdim=True)


def histogram_intersection(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over channels of Σ_k min(p_k, q_k) for normalised histograms [B, C, K] → [B] in 0..1 (1 = identical)."""
    return torch.minimum(p, q).sum(-1).mean(-1)


def emd_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 − mean over channels of the 1-D earth-mover distance Σ_k |P_k − Q_k| / (K − 1), P, Q cumulative → [B] in 0..1.

    K − 1 bins is the farthest any mass can move, so 0 means all of it sits at opposite ends.
    """
    cdf_gap = (p.cumsum(-1) - q.cumsum(-1)).abs().sum(-1)
    return 1.0 - (cdf_gap / (p.shape[-1] - 1)).mean(-1)


def colour_similarity(images: torch.Tensor, reference: torch.Tensor, bins: int = 64) -> dict[str, torch.Tensor]:
    """Colour likeness of images to reference (batch 1 or B): {"intersection", "emd"} each [B] in 0..1.

    Histograms are normalised, so the two images may differ in size.
    """
    p = lab_histograms(check_images("image", images), bins)
    q = lab_histograms(check_images("reference", reference), bins)
    p, q = _pair_batches("image", p, "reference", q)
    return {"intersection": histogram_intersection(p, q), "emd": emd_similarity(p, q)}


# --------------------------------------------------------------------------- patch-grid artifacts

def _axis_power(gray: torch.Tensor) -> torch.Tensor:
    """Power spectrum along the last axis, row means removed, averaged over rows: [B, W/2 + 1]."""
    rows = gray - gray.mean(-1, keepdim=True)
    return torch.fft.rfft(rows, dim=-1).abs().square().mean(-2)


def _grid_energy(power: torch.Tensor, cycles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ power at the harmonics of `cycles` cycles per axis, Σ mean power of each harmonic's neighbours) → [B], [B]."""
    nyquist = power.shape[-1] - 1
    harmonics = list(range(cycles, nyquist, cycles))  # the Nyquist bin would also count 2-px checkerboards
    reach = max(1, min(GRID_NEIGHBOURS, cycles // 2))
    peaks, floors = [], []
    for k in harmonics:
        near = [k + d for d in range(-reach, reach + 1) if d and 0 < k + d <= nyquist and (k + d) % cycles]
        peaks.append(power[:, k])
        floors.append(power[:, near].mean(-1))
    return torch.stack(peaks, -1).sum(-1), torch.stack(floors, -1).sum(-1)


def grid_artifact_score(images: torch.Tensor, period: int = DIT_PERIOD) -> torch.Tensor:
    """Patch-grid signature in dB [B]: 10·log10(Σ P(n·f₀) / Σ mean P(n·f₀ ± d)), f₀ = 1/period, rows and columns.

    P is the luma power spectrum along each axis on the image cropped to whole periods, so the harmonics
    n·f₀ (n = 1 … below Nyquist) fall on exact bins; d = 1…4 neighbouring bins. ≈ 0 dB: no grid.
    """
    rgb = check_images("image", images)
    period = int(period)
    if period < 2:
        raise ValueError(f"period must be at least 2 px, got {period}")
    h, w = rgb.shape[1] // period * period, rgb.shape[2] // period * period
    if min(h, w) < 4 * period:
        raise ValueError(f"image is {rgb.shape[2]}×{rgb.shape[1]} px: the artifact score needs at least 4 periods "
                         f"({4 * period} px) on each side; use a larger image or a smaller period")
    gray = (rgb[:, :h, :w] * torch.tensor(LUMA, device=rgb.device)).sum(-1)  # [B, h, w]
    peak_x, floor_x = _grid_energy(_axis_power(gray), w // period)
    peak_y, floor_y = _grid_energy(_axis_power(gray.transpose(1, 2)), h // period)
    tiny = torch.finfo(torch.float32).tiny
    return 10.0 * torch.log10((peak_x + peak_y + tiny) / (floor_x + floor_y + tiny))


# --------------------------------------------------------------------------- embeddings

def pooled_embedding(embeds: torch.Tensor) -> torch.Tensor:
    """One vector per image [B, D]: a projected embedding [B, D] as is, per-token outputs [B, N, D] averaged."""
    if not torch.is_tensor(embeds) or embeds.ndim not in (2, 3):
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise ValueError(f"image embeddings must be [batch, dims] or [batch, tokens, dims], got {shape}")
    return embeds.float().mean(1) if embeds.ndim == 3 else embeds.float()


def embedding_cosine(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> torch.Tensor:
    """cos(â, b̂) per item [B] (−1..1; 1 = same direction) of two embedding batches (one side may be a single one)."""
    a, b = pooled_embedding(a), pooled_embedding(b).to(a.device)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} embeddings have {a.shape[-1]} dims but {name_b} have {b.shape[-1]}: they come "
                         "from different models; use a CLIP text model that matches the CLIP vision model")
    a, b = _pair_batches(name_a, a, name_b, b)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# --------------------------------------------------------------------------- display

def annotate(images: torch.Tensor, lines: Sequence[str], width: int = 256) -> torch.Tensor:
    """The first image scaled to `width` px with the text lines below it: IMAGE [1, H', width, 3] float 0..1."""
    rgb = check_images("image", images)[0]
    thumb = Image.fromarray((rgb.cpu().numpy() * 255.0).round().astype(np.uint8))
    height = max(1, round(thumb.height * width / thumb.width))
    thumb = thumb.resize((width, height), Image.BICUBIC)
    font = ImageFont.load_default()
    line_h = 14
    canvas = Image.new("RGB", (width, height + line_h * len(lines) + 8), (255, 255, 255))
    canvas.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, height + 4 + i * line_h), line, fill=(20, 20, 20), font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]
