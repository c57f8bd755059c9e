"""vl_core.metrics on images with known answers."""
import math

import pytest
import torch

from vl_core import metrics


def scene(n=256, seed=0, noise=0.03):
    """A smooth colour gradient with mild seeded noise: [1, n, n, 3] in 0..1."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, n), torch.linspace(0, 1, n), indexing="ij")
    img = torch.stack([0.3 + 0.4 * x, 0.2 + 0.5 * y, 0.6 - 0.3 * x * y], -1)
    return (img + noise * torch.randn(n, n, 3, generator=g))[None].clamp(0, 1)


def lines(n, period, amplitude):
    """A grid of 1-px lines every `period` px, `amplitude` high, as an additive [1, n, n, 1] pattern."""
    on = (torch.arange(n) % period == 0).float()
    return torch.maximum(on[None, :], on[:, None])[None, :, :, None] * amplitude


def gridded(period, amplitude, n=256):
    return (scene(n) + lines(n, period, amplitude)).clamp(0, 1)


# --------------------------------------------------------------------------- colour

def test_identical_images_score_exactly_one():
    img = scene(64)
    out = metrics.colour_similarity(img, img)
    assert out["intersection"].item() == pytest.approx(1.0, abs=1e-6)
    assert out["emd"].item() == pytest.approx(1.0, abs=1e-6)


def test_layout_is_ignored_colours_are_not():
    img = scene(64)
    shuffled = img.flatten(1, 2)[:, torch.randperm(64 * 64, generator=torch.Generator().manual_seed(1))]
    same = metrics.colour_similarity(shuffled.reshape(img.shape), img)
    assert same["intersection"].item() == pytest.approx(1.0, abs=1e-6)
    permuted = metrics.colour_similarity(img[..., [2, 0, 1]], img)
    assert permuted["intersection"].item() < 0.95 and permuted["emd"].item() < 0.99


def test_scores_fall_as_colours_move_further():
    img = scene(48, noise=0.0)
    shifts = [0.0, 0.05, 0.15, 0.3]
    scores = [metrics.colour_similarity((img + s).clamp(0, 1), img) for s in shifts]
    inter = [s["intersection"].item() for s in scores]
    emd = [s["emd"].item() for s in scores]
    assert all(a > b for a, b in zip(inter, inter[1:]))
    assert all(a > b for a, b in zip(emd, emd[1:]))


def test_black_against_white_differs_only_in_lightness():
    black, white = torch.zeros(1, 32, 32, 3), torch.ones(1, 32, 32, 3)
    out = metrics.colour_similarity(black, white, bins=16)
    # L sits in opposite end bins (0 overlap, the farthest move); a and b are neutral grey in both
    assert out["intersection"].item() == pytest.approx(2 / 3, abs=1e-3)
    assert out["emd"].item() == pytest.approx(2 / 3, abs=1e-3)


def test_emd_is_the_mass_shift_over_the_bins():
    p = torch.zeros(1, 1, 5)
    q = torch.zeros(1, 1, 5)
    p[..., 0], q[..., 2] = 1.0, 1.0
    assert metrics.emd_similarity(p, q).item() == pytest.approx(1 - 2 / 4)
    assert metrics.histogram_intersection(p, q).item() == 0.0


def test_reference_batch_of_one_broadcasts_and_sizes_may_differ():
    imgs = torch.cat([scene(64), scene(64)[..., [1, 2, 0]]])
    out = metrics.colour_similarity(imgs, scene(96))
    assert out["intersection"].shape == (2,)
    assert out["intersection"][0] > out["intersection"][1]


@pytest.mark.parametrize("bad", [torch.zeros(32, 32, 3), torch.zeros(1, 32, 32, 1), "image"])
def test_not_an_image_batch_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="IMAGE batch"):
        metrics.colour_similarity(bad, scene(32))


def test_mismatched_batches_are_refused():
    with pytest.raises(ValueError, match="same number"):
        metrics.colour_similarity(torch.zeros(2, 8, 8, 3), torch.zeros(3, 8, 8, 3))


# --------------------------------------------------------------------------- artifact

AMPLITUDES = [0.02, 0.05, 0.1, 0.2, 0.4]


def test_clean_image_scores_near_zero_db():
    assert abs(metrics.grid_artifact_score(scene()).item()) < 1.5


def test_planted_16px_grid_raises_the_score_monotonically_with_amplitude():
    clean = metrics.grid_artifact_score(scene()).item()
    scores = [metrics.grid_artifact_score(gridded(16, a)).item() for a in AMPLITUDES]
    assert scores[0] > clean
    assert all(b > a for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] > clean + 15.0


def test_13px_grid_does_not_raise_the_score():
    clean = metrics.grid_artifact_score(scene()).item()
    weakest_16 = metrics.grid_artifact_score(gridded(16, AMPLITUDES[0])).item()
    for a in AMPLITUDES:
        score = metrics.grid_artifact_score(gridded(13, a)).item()
        assert score <= clean + 0.5, (a, score, clean)
        assert score < weakest_16


def test_grid_phase_does_not_matter():
    base = scene()
    shifted = (base + lines(256, 16, 0.1).roll(5, dims=2).roll(9, dims=1)).clamp(0, 1)
    assert metrics.grid_artifact_score(shifted).item() == pytest.approx(
        metrics.grid_artifact_score(gridded(16, 0.1)).item(), abs=1.0)


def test_sizes_that_are_not_whole_periods_are_cropped():
    img = gridded(16, 0.1, n=256)[:, :250, :203]
    assert metrics.grid_artifact_score(img).item() > 10.0


def test_too_small_image_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="at least 4 periods"):
        metrics.grid_artifact_score(torch.zeros(1, 48, 256, 3))


def test_score_is_per_image():
    out = metrics.grid_artifact_score(torch.cat([scene(), gridded(16, 0.2)]))
    assert out.shape == (2,) and out[1] > out[0] + 10


# --------------------------------------------------------------------------- embeddings + display

def test_cosine_endpoints_and_token_pooling():
    a = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.embedding_cosine("x", a, "y", a).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert metrics.embedding_cosine("x", a, "y", -a).tolist() == pytest.approx([-1.0] * 3, abs=1e-6)
    tokens = a[:, None, :].expand(3, 5, 16)  # per-token outputs (SigLIP in ComfyUI) are averaged
    assert metrics.embedding_cosine("x", tokens, "y", a[:1]).shape == (3,)
    assert metrics.embedding_cosine("x", tokens, "y", a).tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_cosine_of_different_widths_names_the_fix():
    with pytest.raises(ValueError, match="matches the CLIP vision model"):
        metrics.embedding_cosine("image", torch.ones(1, 8), "text", torch.ones(1, 6))


def test_annotate_puts_text_below_the_thumbnail():
    img = torch.zeros(1, 64, 128, 3)
    out = metrics.annotate(img, ["intersection: 0.5", "emd: 0.9"], width=256)
    assert out.shape[0] == 1 and out.shape[2] == 256 and out.shape[3] == 3
    assert out.shape[1] == 128 + 14 * 2 + 8
    text_band = out[0, 128:]
    assert text_band.min() < 0.5 and math.isclose(out[0, :128].max().item(), 0.0)
