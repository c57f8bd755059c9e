import torch

from vl_core import plot

RED = torch.tensor(plot.OUTLIER, dtype=torch.float32) / 255


def red_rows(figure):
    hits = (figure - RED).abs().sum(-1) < 0.02
    return hits.nonzero()[:, 0]


def test_outliers_are_drawn_red_on_their_side_of_the_axis():
    ratio = torch.ones(512)
    ratio[396] = 1 / 617  # quieter
    fig = plot.ratio_figure(ratio, ratio < 0.1, 10.0, "t", [])
    rows = red_rows(fig)
    assert fig.shape == (600, 1400, 3) and fig.min() >= 0 and fig.max() <= 1
    assert len(rows) and rows.min() > 300  # below the 1× line (the middle of the plot)
    ratio[396], ratio[7] = 1.0, 600.0  # louder
    rows = red_rows(plot.ratio_figure(ratio, ratio > 10, 10.0, "t", []))
    assert len(rows) and rows.max() < 300


def test_no_outliers_no_red():
    ratio = torch.exp(torch.linspace(-1, 1, 300))
    assert len(red_rows(plot.ratio_figure(ratio, torch.zeros(300, dtype=torch.bool), 10.0, "t", ["x"]))) == 0


def test_inspect_embeds_reports_against_text_tokens_and_checks_width():
    import pytest

    from vl_core.types import VLEmbeds

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 20, 64, generator=g)
    hidden[:, 4:16, 9] *= 1 / 600  # a dim 600× quieter in the image tokens
    vl = VLEmbeds(hidden={6: hidden}, image_spans=((4, 16),), prompt_span=(16, 18), num_layers=8)
    figure, report = plot.inspect_embeds(vl, 10.0)
    assert figure.shape[-1] == 3 and "VL non-image tokens" in report and "dim 9:" in report and "quieter" in report
    _, report = plot.inspect_embeds(vl, 10.0, reference=torch.randn(1, 30, 64, generator=g))
    assert "text conditioning" in report
    with pytest.raises(ValueError, match="width 32 does not match vl_embeds width 64"):
        plot.inspect_embeds(vl, 10.0, reference=torch.randn(1, 5, 32))
