"""Runs of a grid as Slurm jobs, through submitit (``runs GRID.yaml --executor slurm``).

Each run of the grid is one job. submitit pickles the job (``runs.run_job`` with the run's spec), writes the
sbatch file, submits it and later reads the pickled result; runs with the same resources are submitted as one
job array, whose ``%N`` throttle is ``array_parallelism``. Nothing here writes an sbatch script by hand.

The bookkeeping is the local runner's (``runs.py``): a run counts as complete only with ``results.json`` and the
``.complete`` marker, written last inside the job. What Slurm adds is a job per run folder, recorded at
submission in ``<run>/slurm.json`` (job id, cluster, where its logs are) with ``<run>/slurm`` linking to the
job's submitit folder (``<out>/.slurm/<job id>/``: sbatch file, pickles, stdout and stderr). On every call a
run that is not complete is one of:

- *pending*: its recorded job is still queued or running; it is waited for (or, with ``--collect`` and
  ``--no-wait``, listed), never submitted twice;
- *failed*: its job ended without completing the run (the notebook raised, or Slurm killed the job at its
  time limit, on preemption or out of memory); the reason is the first line of ``error.txt`` in the run folder,
  and the next call that submits runs it again from an emptied folder;
- *not started*: no job recorded.

Tests use submitit's own local cluster (``cluster="local"``): the same submission, pickling, result files and
logs, run as local processes. Which parameters reach ``sbatch`` is checked on the sbatch text submitit writes
(:func:`sbatch_text`).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError
from .io import write_json_atomic, write_text_atomic

EXECUTORS = ("local", "slurm")
CLUSTERS = ("slurm", "local")
JOB_FILE = "slurm.json"
LOG_LINK = "slurm"
LOG_ROOT = ".slurm"
# Slurm job states in which the job may still run (squeue/sacct names); anything else has ended.
ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "READY"}
# How long after submission an "UNKNOWN" state (sacct has not seen the job yet) still counts as queued.
UNKNOWN_GRACE_S = 300.0
# Per-entry keys of a grid's ``slurm:`` mapping, and the option each sets.
ENTRY_KEYS = {"partition": "partition", "gpus": "gpus", "cpus": "cpus", "mem_gb": "mem_gb", "time": "time",
              "array_parallelism": "array_parallelism", "extra": "extra"}

_TIME_FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def parse_time(value: Any) -> int:
    """A Slurm time limit in whole minutes (rounded up), from any of sbatch's ``--time`` forms: ``M``,
    ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S`` (an int is minutes). ``UserError`` otherwise."""
    if isinstance(value, bool):
        raise UserError(f"time limit {value!r} is not a time: give {_TIME_FORMS}, e.g. 04:00:00")
    if isinstance(value, int):
        minutes = value
    else:
        text = str(value).strip()
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not m:
            raise UserError(f"time limit {value!r} does not parse: give {_TIME_FORMS}, e.g. 04:00:00")
        days, a, b, c = (int(x) if x is not None else None for x in m.groups())
        if days is None:
            if b is None:  # M
                seconds = a * 60
            elif c is None:  # M:S
                seconds = a * 60 + b
            else:  # H:M:S
                seconds = a * 3600 + b * 60 + c
        else:  # D-H, D-H:M, D-H:M:S
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        minutes = -(-seconds // 60)
    if minutes <= 0:
        raise UserError(f"time limit {value!r} is not positive: give {_TIME_FORMS}, e.g. 04:00:00")
    return int(minutes)


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks Slurm for. ``gpus`` per job (one node), ``cpus`` per job (also the notebook's thread
    count), ``mem_gb`` per node (None: the partition's default), ``time`` in any sbatch form, ``partition``
    (None: the cluster's default), ``array_parallelism`` jobs of one array at once, ``extra`` further sbatch
    parameters (``{"account": "lab", "qos": "high"}``). ``cluster`` is submitit's: ``slurm``, or ``local`` for
    submitit's local executor (the same files, local processes: tests and a single workstation)."""

    partition: str | None = None
    gpus: int = 1
    cpus: int | None = 8
    mem_gb: float | None = None
    time: str = "04:00:00"
    array_parallelism: int = 16
    extra: tuple[tuple[str, str], ...] = ()
    cluster: str = "slurm"

    @property
    def minutes(self) -> int:
        return parse_time(self.time)


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}: " + (
            "use 0 for a CPU-only job" if name.endswith("gpus") else f"give a number of at least {minimum}"))
    return value


def _extra_pairs(extra: Any, where: str) -> tuple[tuple[str, str], ...]:
    if extra is None:
        return ()
    if isinstance(extra, Mapping):
        items = list(extra.items())
    elif isinstance(extra, (list, tuple)):
        items = []
        for item in extra:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                items.append(tuple(item))
            elif isinstance(item, str) and "=" in item:
                items.append(tuple(item.split("=", 1)))
            else:
                raise UserError(f"{where}: extra Slurm parameter {item!r} is not KEY=VALUE: write e.g. qos=high")
    else:
        raise UserError(f"{where}: extra Slurm parameters must be KEY=VALUE pairs, got {extra!r}")
    out = []
    for k, v in items:
        k = str(k).strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", k):
            raise UserError(f"{where}: extra Slurm parameter name {k!r} is not an sbatch option: write e.g. qos=high")
        out.append((k.replace("_", "-"), str(v)))
    return tuple(out)


def slurm_options(where: str = "slurm options", **given: Any) -> SlurmOptions:
    """Checked :class:`SlurmOptions` from keyword values (None keeps the default). Raises a one-line
    ``UserError`` for a negative GPU count, a time that does not parse, an unknown cluster, and the like."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = [k for k in given if k not in SlurmOptions.__dataclass_fields__]
    if unknown:
        raise UserError(f"{where}: unknown Slurm option(s) {', '.join(unknown)}: use "
                        f"{', '.join(ENTRY_KEYS)}")
    opts = SlurmOptions()
    if "partition" in given:
        if not isinstance(given["partition"], str) or not given["partition"].strip():
            raise UserError(f"{where}: partition must be a name, got {given['partition']!r}")
    if "gpus" in given:
        given["gpus"] = _whole(f"{where}: gpus", given["gpus"], 0)
    if "cpus" in given:
        given["cpus"] = _whole(f"{where}: cpus", given["cpus"], 1)
    if "array_parallelism" in given:
        given["array_parallelism"] = _whole(f"{where}: array_parallelism", given["array_parallelism"], 1)
    if "mem_gb" in given:
        try:
            mem = float(given["mem_gb"])
        except (TypeError, ValueError):
            raise UserError(f"{where}: mem_gb must be a number of GB, got {given['mem_gb']!r}") from None
        if not mem > 0:
            raise UserError(f"{where}: mem_gb must be positive, got {given['mem_gb']!r}")
        given["mem_gb"] = mem
    if "time" in given:
        parse_time(given["time"])
        given["time"] = str(given["time"])
    if "extra" in given:
        given["extra"] = _extra_pairs(given["extra"], where)
    if "cluster" in given and given["cluster"] not in CLUSTERS:
        raise UserError(f"{where}: cluster {given['cluster']!r} is not one of {', '.join(CLUSTERS)}: use slurm "
                        f"(or local for submitit's local test cluster)")
    return replace(opts, **given)


def entry_options(base: SlurmOptions, resources: Mapping | None, where: str) -> SlurmOptions:
    """``base`` with a grid entry's own ``slurm:`` resources on top (``{gpus: 1, time: "04:00:00"}``); extra
    parameters are merged, the entry's winning."""
    if not resources:
        return base
    if not isinstance(resources, Mapping):
        raise UserError(f"{where}.slurm must be a mapping such as {{gpus: 1, time: '04:00:00'}}, got "
                        f"{type(resources).__name__}")
    unknown = [k for k in resources if k not in ENTRY_KEYS]
    if unknown:
        raise UserError(f"{where}.slurm: unknown key(s) {', '.join(map(str, unknown))}: use "
                        f"{', '.join(ENTRY_KEYS)}")
    own = slurm_options(f"{where}.slurm", **{ENTRY_KEYS[k]: v for k, v in resources.items()})
    merged = {k: getattr(own, k) for k in resources}
    if "extra" in merged:
        merged["extra"] = tuple({**dict(base.extra), **dict(own.extra)}.items())
    return replace(base, **merged)


def executor_parameters(opts: SlurmOptions, *, name: str = "ecoflap") -> dict:
    """The parameters handed to ``submitit.AutoExecutor.update_parameters``: submitit's generic names (which
    it translates for each cluster) and ``slurm_``-prefixed ones that only Slurm reads."""
    params: dict[str, Any] = {"name": name, "timeout_min": opts.minutes, "gpus_per_node": opts.gpus,
                              "tasks_per_node": 1, "nodes": 1, "slurm_array_parallelism": opts.array_parallelism}
    if opts.cpus is not None:
        params["cpus_per_task"] = opts.cpus
    if opts.mem_gb is not None:
        params["mem_gb"] = opts.mem_gb
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.extra:
        params["slurm_additional_parameters"] = dict(opts.extra)
    return params


def make_executor(folder: str | os.PathLike, opts: SlurmOptions, *, name: str = "ecoflap"):
    """A ``submitit.AutoExecutor`` on ``opts.cluster`` writing its files under ``folder`` (``%j`` is the job id),
    with :func:`executor_parameters`. On ``slurm`` submitit needs ``srun`` on the PATH."""
    import submitit

    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=opts.cluster)
    except RuntimeError as e:  # SlurmExecutor: 'Could not detect "srun"'
        raise UserError(f"cannot submit to Slurm from this machine ({e}): run on a login node of the cluster, "
                        f"or use --executor local") from None
    ex.update_parameters(**executor_parameters(opts, name=name))
    return ex


def sbatch_text(opts: SlurmOptions, folder: str | os.PathLike, *, array: int | None = None,
                command: str = "python -u -m submitit.core._submit FOLDER") -> str:
    """The sbatch file submitit would write for one job (or an array of ``array`` jobs) with ``opts``: read
    from submitit's own Slurm executor, so a test sees exactly what ``sbatch`` would be asked for."""
    ex = make_executor(folder, replace(opts, cluster="slurm"))
    inner = ex._executor  # submitit.SlurmExecutor, after submitit's translation of the generic parameters
    if array is None:
        return inner._make_submission_file_text(command, "uid")
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=inner.folder, **{**inner.parameters, "map_count": array})


# --------------------------------------------------------------------------------------------- the job

@dataclass
class JobRecord:
    """A submitted job as recorded in ``<run>/slurm.json``."""

    job_id: str
    cluster: str
    folder: str  # submitit's folder template (with %j)
    submitted: float
    options: dict = field(default_factory=dict)

    def job(self):
        """The submitit job object (reattached from its id and folder)."""
        import submitit
        from submitit.local.local import LocalJob

        cls = LocalJob if self.cluster == "local" else submitit.SlurmJob
        return cls(folder=self.folder, job_id=self.job_id)

    def log_folder(self) -> Path:
        return Path(self.folder.replace("%j", self.job_id))


def read_job(run_dir: Path) -> JobRecord | None:
    """The job recorded in a run folder, or None."""
    path = Path(run_dir) / JOB_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return JobRecord(**{k: data[k] for k in ("job_id", "cluster", "folder", "submitted")},
                         options=data.get("options", {}))
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def write_job(run_dir: Path, record: JobRecord) -> None:
    """Record a job in its run folder (atomically) and link ``<run>/slurm`` to its log folder."""
    write_json_atomic(run_dir / JOB_FILE, asdict(record))
    link = run_dir / LOG_LINK
    if link.is_symlink() or link.exists():
        link.unlink()
    target = record.log_folder()
    try:
        link.symlink_to(os.path.relpath(target, run_dir), target_is_directory=True)
    except OSError:  # a file system without links: the path is in slurm.json
        pass


class Tracked:
    """A job being waited for: its record, and the live submitit job object when this process submitted it."""

    def __init__(self, record: JobRecord, job=None):
        self.record = record
        self.job = job if job is not None else record.job()

    def state(self) -> str:
        """``alive`` (queued or running), or ``ended``."""
        rec = self.record
        if rec.cluster == "local":
            proc = getattr(self.job, "_process", None)
            if proc is not None:
                return "alive" if proc.poll() is None else "ended"
            return "alive" if _local_controller_alive(rec.job_id) else "ended"
        state = str(self.job.state).split()[0].upper() if self.job.state else "UNKNOWN"
        if state in ALIVE_STATES:
            return "alive"
        if state == "UNKNOWN" and not self.job.paths.result_pickle.exists() \
                and time.time() - rec.submitted < UNKNOWN_GRACE_S:
            return "alive"
        return "ended"

    def ended(self, run_dir: Path, complete: bool) -> tuple[Any, str | None]:
        """For an ended job: ``(what it returned, None)``, or ``(None, why it has no result)``; the reason is
        also written to ``error.txt`` so that the run folder says it. ``complete``: the run folder is complete
        (a job that finished its work and then lost its result file still counts)."""
        job = self.job
        if job.paths.result_pickle.exists():
            try:
                return job.result(), None
            except Exception as e:  # the job function itself raised
                return None, _failed(run_dir, f"job {self.record.job_id} raised {_first_line(e)}")
        if complete:
            return None, None
        return None, _failed(run_dir, f"job {self.record.job_id} ended without finishing the run ({self._why()}); "
                                      f"log: {_log_hint(job)}")

    def _why(self) -> str:
        if self.record.cluster == "local":
            proc = getattr(self.job, "_process", None)
            code = proc.poll() if proc is not None else None
            return f"its process was killed (exit {code})" if code is not None else "its process was killed"
        state = self.job.state
        return {"TIMEOUT": "Slurm state TIMEOUT: it reached its time limit; raise --time or the entry's "
                           "slurm.time",
                "PREEMPTED": "Slurm state PREEMPTED",
                "OUT_OF_MEMORY": "Slurm state OUT_OF_MEMORY: raise --mem-gb",
                "NODE_FAIL": "Slurm state NODE_FAIL",
                "CANCELLED": "Slurm state CANCELLED"}.get(str(state).split()[0].upper(), f"Slurm state {state}")


def _failed(run_dir: Path, why: str) -> str:
    if run_dir.is_dir():
        write_text_atomic(run_dir / "error.txt", why + "\n")
    return why


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _log_hint(job) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:  # pragma: no cover - paths need the job id
        return "(unknown)"


def _local_controller_alive(job_id: str) -> bool:
    """Whether submitit's local controller process ``job_id`` (its pid) is still running (not a zombie)."""
    import psutil

    try:
        p = psutil.Process(int(job_id))
        return p.status() != psutil.STATUS_ZOMBIE and "submitit" in " ".join(p.cmdline())
    except (psutil.Error, ValueError):
        return False


def submit(job_fn, runs: Sequence[tuple], opts_of, out: Path, *, kernel_name: str, timeout: float | None
           ) -> dict[str, Tracked]:
    """Submit ``job_fn(spec, run_dir, out_dir, kernel_name, timeout, threads)`` for each of ``runs``
    (``(spec, run_dir)`` pairs, run folders already prepared), grouped by their options (``opts_of(spec)``),
    one job array per group; record each job in its run folder. Returns run name -> its tracked job."""
    groups: dict[SlurmOptions, list[tuple]] = {}
    for spec, run_dir in runs:
        groups.setdefault(opts_of(spec), []).append((spec, run_dir))
    folder = str(out / LOG_ROOT / "%j")
    tracked = {}
    for opts, members in groups.items():
        ex = make_executor(folder, opts)
        with ex.batch():
            jobs = [ex.submit(job_fn, spec, str(run_dir), str(out), kernel_name, timeout, opts.cpus)
                    for spec, run_dir in members]
        now = time.time()
        for (spec, run_dir), job in zip(members, jobs):
            rec = JobRecord(job_id=str(job.job_id), cluster=opts.cluster, folder=folder, submitted=now,
                            options={k: v for k, v in asdict(opts).items() if k != "extra"}
                            | {"extra": dict(opts.extra)})
            write_job(run_dir, rec)
            tracked[spec.name] = Tracked(rec, job)
    return tracked
