"""``python -m ecoflap_utils runs GRID.yaml``: run a notebook grid with papermill and write the results table."""
from __future__ import annotations

import argparse


def add_runs_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``runs`` command to an argparse ``subparsers`` object; its handler is ``args.func``."""
    p = subparsers.add_parser(
        "runs", help="run a grid of notebooks with papermill and collect results",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Expand GRID.yaml (notebook, parameters, grid of values) into runs, execute each notebook "
                    "with papermill into its own folder under --out (skipping runs already complete, so an "
                    "interrupted batch resumes), then write results.csv, results.md and figures/*.png there. "
                    "Exits 1 if some runs failed.")
    p.add_argument("grid", metavar="GRID.yaml", help="grid file: one entry or a 'runs:' list of entries with "
                   "notebook, parameters, grid and an optional name template")
    p.add_argument("--out", default="runs", help="folder that holds one sub-folder per run and the results table")
    p.add_argument("--kernel", default=None,
                   help="Jupyter kernel name (default: a kernel of this Python, installed into the venv if needed)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per notebook cell (default: none)")
    p.add_argument("--jobs", type=int, default=1,
                   help="notebooks run at once, each with an equal share of the cores as its threads (make run "
                        "uses 2: small models use two threads poorly, so two one-thread runs finish sooner)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_runs, interrupted="finished runs are kept (they hold a .complete marker); run the same "
                                               "command again to do the others")
    return p


def cmd_runs(args) -> int:
    """Handler of ``runs``: 0 when every run is complete, 1 when some failed (listed by ``run_grid``)."""
    from .runs import run_grid

    result = run_grid(args.grid, args.out, kernel_name=args.kernel, progress=not args.no_progress,
                      timeout=getattr(args, "timeout", None), jobs=getattr(args, "jobs", 1))
    return 0 if result.ok else 1
