"""python -m tools.sweep WORKFLOW_API.json --grid '9.alpha=0,0.3,0.5' --seeds 1,2 --server URL [--server URL] --out DIR"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .grid import GridError
from .runner import SweepAborted, SweepSpec, run_sweep


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: write integers separated by commas") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give distinct integers, e.g. 1,2,3")
    return seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("workflow", type=Path, help="API-format workflow JSON (Export (API) in the editor)")
    ap.add_argument("--grid", action="append", default=[], metavar="NODE.INPUT=V1,V2",
                    help='one axis; NODE is a node id (9.alpha=0,0.5) or title ("Embedding Blend".alpha=0,0.5); repeat')
    ap.add_argument("--seeds", type=_seeds, help="comma-separated seeds, one more axis (default: the workflow's seed)")
    ap.add_argument("--seed-input", action="append", metavar="NODE.INPUT",
                    help="where the seed goes (default: every KSampler / RandomNoise seed input)")
    ap.add_argument("--server", action="append", default=[], required=True, metavar="URL",
                    help="a ComfyUI server, e.g. http://127.0.0.1:8188; repeat for more (one job in flight each)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (images, results.jsonl/csv, grid, plots)")
    ap.add_argument("--resume", action="store_true", help="continue the sweep in --out after a kill")
    ap.add_argument("--job-timeout", type=float, default=3600.0, help="seconds one job may take (default 3600)")
    ap.add_argument("--server-timeout", type=float, default=600.0,
                    help="give up when every server has been down this long (default 600 s)")
    args = ap.parse_args(argv)
    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"sweep: cannot read the workflow {args.workflow}: {e}", file=sys.stderr)
        return 2
    if "nodes" in workflow and "links" in workflow:
        print(f"sweep: {args.workflow} is an editor (UI) workflow; export it with Export (API)", file=sys.stderr)
        return 2
    spec = SweepSpec(workflow, args.grid, args.server, args.out, seeds=args.seeds, seed_inputs=args.seed_input,
                     job_timeout_s=args.job_timeout, server_timeout_s=args.server_timeout)
    try:
        rows = asyncio.run(run_sweep(spec, resume=args.resume))
    except GridError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    except SweepAborted as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 3
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"sweep: {len(rows) - len(failed)}/{len(rows)} cells ok; {args.out / 'results.csv'}, "
          f"{args.out / 'grid.png'}, {args.out / 'plots'}/", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
