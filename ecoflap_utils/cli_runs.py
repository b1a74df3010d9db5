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
    p.add_argument("--executor", default="local",
                   help="local (this machine) or slurm (one Slurm job per run, through submitit; same run folders, "
                        "resume and summary)")
    p.add_argument("--collect", action="store_true",
                   help="submit and run nothing: write the summary from the runs that are complete and list those "
                        "still pending or failed (after --no-wait)")
    s = p.add_argument_group("Slurm (with --executor slurm; a grid entry's own 'slurm:' mapping overrides these)")
    s.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    s.add_argument("--gpus", type=int, default=None, help="GPUs per job (default: 1; 0 for CPU-only jobs)")
    s.add_argument("--cpus", type=int, default=None,
                   help="CPUs per job, also the notebook's thread count (default: 8)")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per job in GB (default: the partition's)")
    s.add_argument("--time", default=None,
                   help="time limit per job, as sbatch takes it: minutes, HH:MM:SS or D-HH:MM:SS "
                        "(default: 04:00:00)")
    s.add_argument("--array-parallelism", type=int, default=None,
                   help="jobs of the grid running at once (Slurm array throttle; default: 16)")
    s.add_argument("--slurm-extra", action="append", default=None, metavar="KEY=VALUE",
                   help="further sbatch parameter, e.g. --slurm-extra account=mylab --slurm-extra qos=high")
    s.add_argument("--slurm-cluster", default=None,
                   help="submitit cluster: slurm, or local (submitit's local executor: the same job files run "
                        "as local processes; for tests and one workstation) (default: slurm)")
    s.add_argument("--no-wait", action="store_true",
                   help="submit the jobs and return; later, the same command with --collect writes the summary")
    p.set_defaults(func=cmd_runs, interrupted="finished runs are kept (they hold a .complete marker); run the same "
                                               "command again to do the others")
    return p


def cmd_runs(args) -> int:
    """Handler of ``runs``: 0 when every run is complete, 1 when some failed (listed by ``run_grid``)."""
    from .runs import run_grid

    result = run_grid(args.grid, args.out, kernel_name=args.kernel, progress=not args.no_progress,
                      timeout=getattr(args, "timeout", None), jobs=getattr(args, "jobs", 1),
                      executor=getattr(args, "executor", "local"), slurm=slurm_options_from_args(args),
                      wait=not getattr(args, "no_wait", False), collect=getattr(args, "collect", False))
    return 0 if result.ok else 1


SLURM_FLAGS = {"partition": "--partition", "gpus": "--gpus", "cpus": "--cpus", "mem_gb": "--mem-gb",
               "time": "--time", "array_parallelism": "--array-parallelism", "slurm_extra": "--slurm-extra",
               "slurm_cluster": "--slurm-cluster", "no_wait": "--no-wait"}


def slurm_options_from_args(args):
    """The ``cluster.SlurmOptions`` of the command line, None when none was given; a Slurm option given with
    ``--executor local`` (or an unknown executor) is a ``UserError``, before anything is submitted."""
    from .cluster import slurm_options
    from .errors import UserError

    executor = getattr(args, "executor", "local")
    if executor not in ("local", "slurm"):
        raise UserError(f"unknown executor {executor!r}: use --executor local (this machine) or slurm (a Slurm "
                        f"cluster, through submitit)")
    given = [flag for name, flag in SLURM_FLAGS.items() if getattr(args, name, None) not in (None, False)]
    if executor == "local":
        if given:
            raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --executor slurm only: "
                            f"add --executor slurm, or drop {'it' if len(given) == 1 else 'them'}")
        return None
    return slurm_options("command line", partition=args.partition, gpus=args.gpus, cpus=args.cpus,
                         mem_gb=args.mem_gb, time=args.time, array_parallelism=args.array_parallelism,
                         extra=args.slurm_extra, cluster=args.slurm_cluster)
