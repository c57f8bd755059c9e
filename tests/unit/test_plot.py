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
