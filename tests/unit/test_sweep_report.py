"""tools.sweep.report: results deduplicated by key, CSV, labelled grid image and plots from result rows."""
import csv
import json

import pytest
from PIL import Image

from tools.sweep import grid as G
from tools.sweep import report

WORKFLOW = {"9": {"class_type": "Blend", "_meta": {"title": "Blend"}, "inputs": {"alpha": 0.3, "mode": "a"}},
            "3": {"class_type": "KSampler", "inputs": {"seed": 0}}}
INFO = {"Blend": {"input": {"required": {"alpha": ["FLOAT", {}], "mode": [["a", "b"], {}]}}},
        "KSampler": {"input": {"required": {"seed": ["INT", {}]}}}}


def axes_of(*texts):
    return [G.validate_axis(G.parse_axis(t, WORKFLOW), WORKFLOW, {"s": INFO}) for t in texts]


def rows_for(tmp_path, axes, seeds, failed=()):
    (tmp_path / "images").mkdir(exist_ok=True)
    rows = []
    for i, job in enumerate(G.expand(axes, seeds)):
        rel = f"images/{job.key}.png"
        Image.new("RGB", (64, 48), (40 * i % 255, 90, 160)).save(tmp_path / rel)
        ok = job.key not in failed
        rows.append({"key": job.key, "label": job.label(), "params": dict(job.params), "seed": job.seed,
                     "server": "http://s", "prompt_id": f"p{i}", "status": "ok" if ok else "error",
                     "error": None if ok else "boom", "images": [rel] if ok else [], "execution_s": 0.5,
                     "wall_s": 0.7, "metrics": {"Colour.intersection": 0.1 * i, "Grid.artifact_db": -i} if ok else {}})
    return rows


def test_two_axes_and_seeds_write_csv_grid_and_heatmaps(tmp_path):
    axes = axes_of("9.alpha=0,0.5,1", "Blend.mode=a,b")
    rows = rows_for(tmp_path, axes, [1, 2])
    report.write_all(tmp_path, rows, axes, [1, 2])
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and {r["key"] for r in table} == {r["key"] for r in rows}
    assert {"9.alpha", "Blend.mode", "seed", "server", "prompt_id", "execution_s", "wall_s",
            "Colour.intersection", "Grid.artifact_db"} <= set(table[0])
    assert float(table[3]["Colour.intersection"]) == pytest.approx(0.3)
    with Image.open(tmp_path / "grid.png") as grid:
        # 3 columns (alpha) × 4 rows (mode × seed), each cell CELL_PX wide
        assert grid.width == 170 + 3 * report.CELL_PX
        assert grid.height > 4 * report.CELL_PX
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["Colour.intersection.png", "Grid.artifact_db.png"]


def test_one_axis_gives_line_plots_and_failed_cells_are_marked(tmp_path):
    axes = axes_of("9.alpha=0,0.5,1")
    jobs = G.expand(axes, [1, 2, 3])
    rows = rows_for(tmp_path, axes, [1, 2, 3], failed={jobs[4].key})
    report.write_all(tmp_path, rows, axes, [1, 2, 3])
    with open(tmp_path / "results.csv", newline="") as f:
        table = {r["key"]: r for r in csv.DictReader(f)}
    assert table[jobs[4].key]["status"] == "error" and table[jobs[4].key]["error"] == "boom"
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2
    with Image.open(tmp_path / "grid.png") as grid:
        # the failed cell (column 1, row 1) is painted grey
        assert grid.convert("RGB").getpixel((170 + report.CELL_PX + 50, 34 + (grid.height - 34) // 3 + 50)) == (200, 200, 200)


def test_read_results_dedupes_by_key_ok_wins_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [{"key": "a", "status": "error"}, {"key": "a", "status": "ok", "n": 1}, {"key": "a", "status": "ok", "n": 2},
             {"key": "b", "status": "error", "n": 1}, {"key": "b", "status": "error", "n": 2}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"key": "c", "sta', encoding="utf-8")
    rows = report.read_results(path)
    assert set(rows) == {"a", "b"} and rows["a"]["n"] == 1 and rows["b"]["n"] == 2


def test_metrics_of_reads_every_metric_node_by_title():
    entry = {"outputs": {"7": {"metrics": [{"intersection": 0.5, "emd": 0.9}], "images": []},
                         "8": {"metrics": [{"artifact_db": 3.0}]}, "9": {"images": [{"filename": "x.png"}]}}}
    names = {"7": "Colour", "8": "Grid", "9": "Save"}
    assert report.metrics_of(entry, names) == {"Colour.intersection": 0.5, "Colour.emd": 0.9, "Grid.artifact_db": 3.0}


@pytest.mark.parametrize("seeds", [None, [1, 2]])
def test_no_axes_still_reports(tmp_path, seeds):
    rows = rows_for(tmp_path, [], seeds)
    report.write_all(tmp_path, rows, [], seeds)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "results.csv").is_file()
