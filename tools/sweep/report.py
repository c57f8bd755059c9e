"""What a sweep writes besides the images: results.csv, a labelled grid image (axis labels, per-cell metric
captions) and plots of each metric against the swept parameters (line plot for one axis, heatmap for two)."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

GRID_FILE, CSV_FILE, PLOTS_DIR = "grid.png", "results.csv", "plots"
CELL_PX = 192
CAPTION_METRICS = 3


def metrics_of(entry: dict, names: dict[str, str]) -> dict[str, float]:
    """Every metric node's values from a /history entry: {"<node title>.<metric>": value}."""
    out = {}
    for nid, node_out in (entry.get("outputs") or {}).items():
        for values in node_out.get("metrics") or []:
            for k, v in (values or {}).items():
                if isinstance(v, (int, float)):
                    out[f"{names.get(nid, nid)}.{k}"] = float(v)
    return out


def read_results(path: Path) -> dict[str, dict]:
    """results.jsonl deduplicated by job key: an ok row wins over an error row, else the latest row."""
    rows: dict[str, dict] = {}
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        old = rows.get(row.get("key"))
        if old is None or old["status"] != "ok":
            rows[row["key"]] = row
    return rows


def metric_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.get("metrics", {})))


def write_csv(path: Path, rows: list[dict], axes) -> None:
    metrics = metric_names(rows)
    head = ["key"] + [a.label for a in axes] + ["seed", "server", "prompt_id", "status", "execution_s", "wall_s",
                                               "images"] + metrics + ["error"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            w.writerow([r["key"]] + [r["params"].get(a.label) for a in axes]
                       + [r.get("seed"), r.get("server"), r.get("prompt_id"), r.get("status"), r.get("execution_s"),
                          r.get("wall_s"), " ".join(r.get("images", []))]
                       + [r.get("metrics", {}).get(m) for m in metrics] + [r.get("error") or ""])


def _layout(rows: list[dict], axes, seeds):
    """Columns: the first axis (or the seeds); rows: every combination of the others (seed last)."""
    dims = [(a.label, list(a.values)) for a in axes] + ([("seed", list(seeds))] if seeds else [])
    if not dims:
        dims = [("run", [None])]
    col_dim, row_dims = dims[0], dims[1:]

    def coords(r):
        vals = [r["params"].get(label) if label != "seed" else r.get("seed") for label, _ in dims]
        return vals[0], tuple(vals[1:])

    import itertools
    row_keys = list(itertools.product(*[v for _, v in row_dims])) or [()]
    return col_dim, row_dims, row_keys, coords


def _short(name: str, all_names: list[str]) -> str:
    tail = name.rsplit(".", 1)[-1]
    return tail if sum(n.rsplit(".", 1)[-1] == tail for n in all_names) == 1 else name


def grid_image(path: Path, out: Path, rows: list[dict], axes, seeds) -> None:
    """Every cell's first image with its metric captions, column header = first axis, row header = the rest."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    col_dim, row_dims, row_keys, coords = _layout(rows, axes, seeds)
    metrics = metric_names(rows)[:CAPTION_METRICS]
    line_h, head_h, left_w = 13, 34, 170
    cell_h = CELL_PX + line_h * (max(1, len(metrics)) + 1) + 6
    cols = col_dim[1]
    canvas = Image.new("RGB", (left_w + CELL_PX * len(cols), head_h + cell_h * len(row_keys)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"columns: {col_dim[0]}", fill="black", font=font)
    if row_dims:
        draw.text((4, 18), "rows: " + ", ".join(label for label, _ in row_dims), fill="black", font=font)
    for c, v in enumerate(cols):
        draw.text((left_w + c * CELL_PX + 4, 18), f"{col_dim[0]}={v}"[:30], fill="black", font=font)
    by_cell = {coords(r): r for r in rows}
    for ri, rk in enumerate(row_keys):
        y = head_h + ri * cell_h
        for li, ((label, _), v) in enumerate(zip(row_dims, rk)):
            draw.text((4, y + 4 + li * line_h), f"{label}={v}"[:27], fill="black", font=font)
        for c, v in enumerate(cols):
            x, r = left_w + c * CELL_PX, by_cell.get((v, rk))
            if r and r["status"] == "ok" and r["images"]:
                with Image.open(out / r["images"][0]) as im:
                    scale = (CELL_PX - 4) / max(im.size)  # small images are enlarged, large ones reduced
                    im = im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                                  Image.LANCZOS)
                    canvas.paste(im, (x + 2, y + 2))
                captions = [f"{_short(m, metric_names(rows))}={r['metrics'][m]:.3f}" for m in metrics if m in r["metrics"]]
            else:
                draw.rectangle([x + 2, y + 2, x + CELL_PX - 2, y + CELL_PX - 2], fill=(200, 200, 200))
                captions = ["failed: " + (r.get("error") or "")[:40]] if r else ["missing"]
            for li, text in enumerate(captions):
                draw.text((x + 4, y + CELL_PX + 2 + li * line_h), text[:34], fill="black", font=font)
    canvas.save(path)


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def plots(folder: Path, rows: list[dict], axes, seeds) -> list[Path]:
    """One PNG per metric: against the swept axis (a line per seed and their mean), or a heatmap of the
    seed mean over two axes; with more axes, the mean against each axis in turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok"]
    dims = [(a.label, list(a.values)) for a in axes] or ([("seed", list(seeds))] if seeds else [])
    written = []
    for m in metric_names(ok):
        def mean(match):
            vals = [r["metrics"][m] for r in ok if m in r["metrics"] and match(r)]
            return sum(vals) / len(vals) if vals else math.nan

        def value(r, label):
            return r.get("seed") if label == "seed" else r["params"].get(label)

        if len(dims) == 2:
            (la, va), (lb, vb) = dims
            z = [[mean(lambda r, a=a, b=b: value(r, la) == a and value(r, lb) == b) for a in va] for b in vb]
            fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(va), 1.4 + 0.8 * len(vb)))
            im = ax.imshow(z, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(va)), [str(v) for v in va])
            ax.set_yticks(range(len(vb)), [str(v) for v in vb])
            ax.set_xlabel(la)
            ax.set_ylabel(lb)
            for yi, line in enumerate(z):
                for xi, v in enumerate(line):
                    ax.text(xi, yi, "" if math.isnan(v) else f"{v:.3g}", ha="center", va="center", color="w")
            fig.colorbar(im, ax=ax, label=m)
        else:
            fig, axs = plt.subplots(1, max(1, len(dims)), figsize=(4.5 * max(1, len(dims)), 3.4), squeeze=False)
            for ax, (label, vals) in zip(axs[0], dims or [("run", [None])]):
                xs = vals if _numeric(vals) else list(range(len(vals)))
                if len(dims) == 1 and label != "seed" and seeds:
                    for s in seeds:
                        ax.plot(xs, [mean(lambda r, v=v, s=s: value(r, label) == v and r.get("seed") == s)
                                     for v in vals], "o-", alpha=0.35, label=f"seed {s}")
                ax.plot(xs, [mean(lambda r, v=v: value(r, label) == v) for v in vals], "o-", color="k", lw=2,
                        label="mean")
                if not _numeric(vals):
                    ax.set_xticks(xs, [str(v) for v in vals])
                ax.set_xlabel(label)
                ax.set_ylabel(m)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(m, fontsize=9)
        fig.tight_layout()
        path = folder / f"{_safe(m)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_all(out: Path, rows: list[dict], axes, seeds) -> None:
    write_csv(out / CSV_FILE, rows, axes)
    grid_image(out / GRID_FILE, out, rows, axes, seeds)
    plots(out / PLOTS_DIR, rows, axes, seeds)
