"""Figures as ComfyUI IMAGE tensors, drawn by matplotlib on its Agg canvas: line plots, heatmaps, the inspector.

No pyplot: each figure is a `matplotlib.figure.Figure` with its own Agg canvas, so nothing global (backend,
current figure) is touched and nothing opens a window. `render` turns any figure into [H, W, 3] float 0..1.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import torch

try:  # a missing matplotlib must not stop the pack loading: only the figures need it, and they say so
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    MATPLOTLIB_MISSING: ImportError | None = None
except ImportError as e:
    MATPLOTLIB_MISSING = e

DOT, OUTLIER, BAND, AXIS = "#466ec8", "#dc2828", "#ebebeb", "#3c3c3c"
OUTLIER_RGB = (220, 40, 40)  # OUTLIER as 0..255, for pixel checks
DPI = 100
LABELLED_PER_SIDE = 8   # the most extreme louder and quieter outliers get their dimension written
PANEL_CHARS = 62        # report lines beside the inspector plot wrap at this width


def new_figure(size: tuple[int, int] = (800, 500)) -> Figure:
    """An Agg-backed figure of exactly size = (width, height) pixels."""
    if MATPLOTLIB_MISSING is not None:
        raise ImportError("the pack's plots need matplotlib, which this Python lacks: run `python -m pip install "
                          "-r custom_nodes/comfyui-zimage-vl/requirements.txt` with ComfyUI's Python, then restart "
                          f"({MATPLOTLIB_MISSING})") from MATPLOTLIB_MISSING
    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def render(fig: Figure) -> torch.Tensor:
    """The figure's pixels as float32 [H, W, 3] in 0..1 (RGB of the Agg RGBA buffer, opaque background)."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)


def _series(values) -> np.ndarray:
    return values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=float)


def line_plot(series: Mapping[str, Sequence[float] | torch.Tensor], *, x: Sequence[float] | None = None,
              title: str = "", xlabel: str = "", ylabel: str = "", log_y: bool = False,
              size: tuple[int, int] = (800, 500)) -> torch.Tensor:
    """One line per named series (y over x, default x = 0..n−1), legend when named; e.g. loss curves with log_y."""
    if not series:
        raise ValueError("line_plot needs at least one series: pass {name: values}")
    fig = new_figure(size)
    ax = fig.add_subplot()
    for name, values in series.items():
        y = _series(values)
        ax.plot(np.arange(len(y)) if x is None else _series(x), y, label=name or None)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend()
    fig.tight_layout()
    return render(fig)


def heatmap(values: torch.Tensor | Sequence[Sequence[float]], *, row_labels: Sequence[str] | None = None,
            col_labels: Sequence[str] | None = None, title: str = "", colorbar: str = "", cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, annotate: bool = False,
            size: tuple[int, int] = (800, 600)) -> torch.Tensor:
    """values [R, C] as coloured cells (row 0 on top) with a colour bar over [vmin, vmax] (default: the data's
    range); annotate writes each value in its cell (dark text on light cells, light on dark)."""
    grid = _series(values)
    if grid.ndim != 2:
        raise ValueError(f"heatmap needs a 2-d [rows, cols] array, got shape {grid.shape}")
    fig = new_figure(size)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label=colorbar)
    for labels, set_ticks, set_labels in ((row_labels, ax.set_yticks, ax.set_yticklabels),
                                          (col_labels, ax.set_xticks, ax.set_xticklabels)):
        if labels is not None:
            set_ticks(range(len(labels)))
            set_labels(labels)
    if annotate:
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=8,
                    color="black" if image.norm(v) > 0.5 else "white")
    ax.set_title(title)
    fig.tight_layout()
    return render(fig)


def _label_outliers(ax, dims: np.ndarray, ratios: np.ndarray, louder: bool) -> None:
    """Write each dim in its own slot of a row at the top (louder) or bottom (quieter) of the axes, in dim order,
    with a leader line to its point: evenly spaced slots cannot overlap, and leaders do not cross."""
    order = np.argsort(dims, kind="stable")
    for slot, i in enumerate(order):
        ax.annotate(str(int(dims[i])), xy=(dims[i], ratios[i]), xycoords="data",
                    xytext=((slot + 0.5) / len(order), 0.955 if louder else 0.045), textcoords="axes fraction",
                    ha="center", va="center", fontsize=8, color=OUTLIER,
                    arrowprops=dict(arrowstyle="-", color=OUTLIER, lw=0.6, shrinkA=2, shrinkB=2))


def ratio_plot(ratio: torch.Tensor, outliers: torch.Tensor, threshold: float, title: str, lines: list[str],
               size: tuple[int, int] = (1400, 600)) -> Figure:
    """Scatter of r_d against d on a log axis, the band 1/t ≤ r ≤ t shaded, outliers red with the most extreme
    labelled (louder along the top, quieter along the bottom), `lines` as a text panel on the right."""
    r = ratio.detach().float().clamp_min(1e-12).cpu().numpy()
    flagged = torch.as_tensor(outliers).cpu().numpy().astype(bool)
    logs = np.log10(r)
    # data in the middle 80% of the height (labels live in the outer rows), the band always visible
    limit = max(math.log10(threshold) * 1.5, float(np.abs(logs).max()) * 1.05, 0.5) * 1.25
    fig = new_figure(size)
    ax = fig.add_axes((0.06, 0.12, 0.6, 0.8))
    dims = np.arange(len(r))
    ax.axhspan(1 / threshold, threshold, color=BAND, zorder=0)
    ax.axhline(1.0, color=AXIS, lw=0.8, zorder=1)
    ax.scatter(dims[~flagged], r[~flagged], s=4, color=DOT, linewidths=0, zorder=2)
    ax.scatter(dims[flagged], r[flagged], s=30, color=OUTLIER, linewidths=0, zorder=3)
    ax.set_yscale("log")
    ax.set_ylim(10 ** -limit, 10 ** limit)
    ax.set_xlim(-0.5, len(r) - 0.5)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=30))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    for louder in (True, False):
        side = np.flatnonzero(flagged & ((r > 1) == louder))
        side = side[np.argsort(-np.abs(logs[side]), kind="stable")][:LABELLED_PER_SIDE]
        if len(side):
            _label_outliers(ax, side, r[side], louder)
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel(f"dimension 0..{len(r) - 1}   (shaded: within {threshold:g}× either way; "
                  "red: outliers, louder above, quieter below)", fontsize=9)
    ax.set_ylabel("VL std / reference std", fontsize=9)
    panel = "\n".join(w for line in lines for w in textwrap.wrap(line, PANEL_CHARS, subsequent_indent="    ",
                                                                 drop_whitespace=False) or [""])
    fig.text(0.68, 0.92, panel, va="top", ha="left", family="monospace", fontsize=8.5, color=AXIS)
    return fig


def ratio_figure(ratio: torch.Tensor, outliers: torch.Tensor, threshold: float, title: str, lines: list[str],
                 size: tuple[int, int] = (1400, 600)) -> torch.Tensor:
    """ratio_plot rendered: [H, W, 3] float 0..1."""
    return render(ratio_plot(ratio, outliers, threshold, title, lines, size))


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
