import itertools

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.text import Text

from vl_core import plot

RED = torch.tensor(plot.OUTLIER_RGB, dtype=torch.float32) / 255


def red_rows(figure):
    hits = (figure - RED).abs().sum(-1) < 0.02
    return hits.nonzero()[:, 0]


def test_outlier_colour_constants_agree():
    assert tuple(round(c * 255) for c in to_rgb(plot.OUTLIER)) == plot.OUTLIER_RGB


def test_outliers_are_drawn_red_on_their_side_of_the_axis():
    ratio = torch.ones(512)
    ratio[396] = 1 / 617  # quieter
    fig = plot.ratio_figure(ratio, ratio < 0.1, 10.0, "t", [])
    rows = red_rows(fig)
    assert fig.shape == (600, 1400, 3) and fig.dtype == torch.float32 and fig.min() >= 0 and fig.max() <= 1
    assert len(rows) and rows.min() > 300  # below the 1× line (the middle of the plot)
    ratio[396], ratio[7] = 1.0, 600.0  # louder
    rows = red_rows(plot.ratio_figure(ratio, ratio > 10, 10.0, "t", []))
    assert len(rows) and rows.max() < 300


def test_no_outliers_no_red():
    ratio = torch.exp(torch.linspace(-1, 1, 300))
    assert len(red_rows(plot.ratio_figure(ratio, torch.zeros(300, dtype=torch.bool), 10.0, "t", ["x"]))) == 0


def crowded_ratio():
    """2560 dims with 30 outliers packed into neighbouring dims (their labels would collide beside the points)."""
    ratio = torch.ones(2560)
    for i, d in enumerate(range(100, 120)):
        ratio[d] = 50.0 + i          # louder, adjacent dims, nearly equal ratios
    for i, d in enumerate(range(2000, 2010)):
        ratio[d] = 1 / (30.0 + i)    # quieter
    return ratio


def test_the_most_extreme_outliers_are_labelled_per_side_without_overlap():
    ratio = crowded_ratio()
    fig = plot.ratio_plot(ratio, outliers := (ratio > 10) | (ratio < 0.1), 10.0, "t", [])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = ax.texts
    dims = [int(t.get_text()) for t in labels]
    assert sorted(d for d in dims if d < 1000) == list(range(112, 120))   # the 8 loudest of 20
    assert sorted(d for d in dims if d >= 1000) == list(range(2002, 2010))  # the 8 quietest of 10
    assert all(bool(outliers[d]) for d in dims)
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the label itself, not its leader line
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    middle = ax.transAxes.transform((0, 0.5))[1]
    for d, box in zip(dims, boxes):  # louder labels above the 1× line, quieter below
        assert (box.y0 > middle) == (ratio[d] > 1)
    assert ax.get_yscale() == "log"


def test_report_lines_appear_beside_the_plot_wrapped():
    long = "source: " + "x" * 150
    fig = plot.ratio_plot(torch.ones(8), torch.zeros(8, dtype=torch.bool), 10.0, "title", ["tokens: 5", long])
    panel = fig.texts[0].get_text().splitlines()
    assert panel[0] == "tokens: 5" and max(map(len, panel)) <= plot.PANEL_CHARS
    assert "".join(p.strip() for p in panel[1:]).replace(" ", "") == long.replace(" ", "")


def test_line_plot_draws_a_rising_series_rising():
    image = plot.line_plot({"loss": [1.0, 2.0, 3.0, 4.0]}, size=(400, 300), title="t", xlabel="step")
    assert image.shape == (300, 400, 3)
    blue = torch.tensor(to_rgb("C0"), dtype=torch.float32)
    hits = ((image - blue).abs().sum(-1) < 0.05).nonzero()
    legend = hits[:, 0] > 60  # leave out the legend swatch (top right)
    left, right = hits[hits[:, 1] < 150], hits[(hits[:, 1] > 250) & legend]
    assert len(left) and len(right) and left[:, 0].float().mean() > right[:, 0].float().mean()


def test_line_plot_log_y_and_several_series():
    image = plot.line_plot({"a": torch.tensor([1.0, 0.1, 0.01]), "b": [2.0, 0.5, 0.05]}, log_y=True)
    assert image.shape == (500, 800, 3)
    for colour in ("C0", "C1"):
        assert ((image - torch.tensor(to_rgb(colour))).abs().sum(-1) < 0.05).any()
    with pytest.raises(ValueError, match="at least one series"):
        plot.line_plot({})


def test_heatmap_cells_follow_the_values():
    image = plot.heatmap([[0.0, 1.0]], cmap="gray", size=(400, 300))
    assert image.shape == (300, 400, 3)
    row = image[150]
    dark = (row.sum(-1) < 0.1).nonzero()[:, 0]
    light = (row.sum(-1) > 2.9).nonzero()[:, 0]
    assert len(dark) > 50 and len(light) > 50 and dark.float().mean() < light.float().mean()
    annotated = plot.heatmap(np.array([[0.0, 1.0]]), cmap="gray", annotate=True, row_labels=["r"],
                             col_labels=["lo", "hi"], size=(400, 300))
    assert not torch.equal(annotated, image)
    with pytest.raises(ValueError, match=r"2-d \[rows, cols\]"):
        plot.heatmap([1.0, 2.0])


def test_inspect_embeds_reports_against_text_tokens_and_checks_width():
    from vl_core.types import VLEmbeds

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 20, 64, generator=g)
    hidden[:, 4:16, 9] *= 1 / 600  # a dim 600× quieter in the image tokens
    vl = VLEmbeds(hidden={6: hidden}, image_spans=((4, 16),), prompt_span=(16, 18), num_layers=8)
    figure, report = plot.inspect_embeds(vl, 10.0)
    assert figure.shape == (600, 1400, 3) and "VL non-image tokens" in report and "dim 9:" in report
    assert "quieter" in report and len(red_rows(figure)) and red_rows(figure).min() > 300
    _, report = plot.inspect_embeds(vl, 10.0, reference=torch.randn(1, 30, 64, generator=g))
    assert "text conditioning" in report
    with pytest.raises(ValueError, match="width 32 does not match vl_embeds width 64"):
        plot.inspect_embeds(vl, 10.0, reference=torch.randn(1, 5, 32))


def test_without_matplotlib_a_figure_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(plot, "MATPLOTLIB_MISSING", ImportError("No module named 'matplotlib'"))
    with pytest.raises(ImportError, match=r"need matplotlib.*pip install -r custom_nodes/comfyui-zimage-vl/"):
        plot.line_plot({"a": [1.0, 2.0]})
