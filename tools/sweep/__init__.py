"""Parameter sweeps over ComfyUI servers: an API workflow × a grid × seeds, run in parallel on every server,
restart-safe (servers and the runner itself), with results.jsonl/CSV, a labelled grid image and plots.

    from tools.sweep import SweepSpec, run_sweep
    rows = asyncio.run(run_sweep(SweepSpec(workflow, ["9.alpha=0,0.5,1"], ["http://127.0.0.1:8188"], Path("out"),
                                           seeds=[1, 2, 3])))

Command line: ``python -m tools.sweep --help``.
"""
from .grid import Axis, GridError, Job, expand, parse_axis, validate_axis
from .runner import RESULTS_FILE, STATE_FILE, SweepAborted, SweepSpec, run_sweep

__all__ = ["Axis", "GridError", "Job", "RESULTS_FILE", "STATE_FILE", "SweepAborted", "SweepSpec", "expand",
           "parse_axis", "run_sweep", "validate_axis"]
