"""The papermill batch runner: expand a parameter grid, run one notebook per point, collect one results table.

A grid file (YAML) holds one entry, or a list of them under ``runs:``::

    runs:
      - notebook: notebooks/04_prune_blip2.ipynb   # relative to the grid file, the repo root or the cwd
        name: "{notebook}/{method}-s{sparsity}"    # optional str.format template of the run folder
        parameters: {model: tiny-blip2-t5, task: vqa}
        grid: {method: [wanda, sparsegpt], sparsity: [0.3, 0.5]}

Each point of the product of ``grid`` values is one run with its own folder under ``out_dir``, named from
the notebook's stem and the grid values (``04_prune_blip2/method=wanda,sparsity=0.5``). The runner injects
``OUT_DIR`` (that folder, absolute) and the parameters into the notebook's ``parameters`` cell with papermill
and keeps the executed notebook there. Every parameter a grid names must be assigned in that cell (read with
``papermill.inspect_notebook``): an unknown name, which papermill would inject and nothing would read, is
refused with a ``UserError`` when the grid is expanded, before anything runs.

How a run is made safe to resume (our choice among "temporary folder moved into place" and "mark complete
last"): the notebook writes straight into its final run folder, because ``OUT_DIR`` is often recorded inside
results and figures and must stay valid after the run; the folder counts as complete only when it holds
``results.json`` *and* the ``.complete`` marker, which is written last, atomically, after papermill returned
and ``results.json`` was checked against the schema. So:

- a complete run is skipped when the grid is run again;
- a failed run (the notebook raised) is recorded with the first line of its error and leaves its folder
  without the marker (the executed notebook with the traceback stays there to read);
- a folder without the marker, from a failed or interrupted attempt, is not trusted: it is emptied and run
  again. Only folders the runner made (stamped with ``.run.json``) are ever deleted.

Runs are independent, so ``jobs=N`` (``runs --jobs N``) runs N of them at once, each kernel with an equal
share of the cores as its threads; resuming works the same way.

After the runs, :func:`collect_results` reads every complete run's ``results.json`` under ``out_dir`` into
one table, and :func:`write_summary` writes ``results.csv``, ``results.md`` and ``figures/*.png``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError
from .io import write_json_atomic, write_text_atomic
from .records import check_seeds
from .records import CORE_COLUMNS, interval_bounds, is_metric_column, records_frame  # noqa: F401  (re-exported)

COMPLETE = ".complete"
STAMP = ".run.json"
RESULTS = "results.json"
ENTRY_KEYS = ("notebook", "parameters", "grid", "name", "slurm")
RESERVED = ("OUT_DIR",)
KERNEL_NAME = "ecoflap"
_MAX_COMPONENT = 120


# ----------------------------------------------------------------------------------------------- grid

@dataclass(frozen=True)
class RunSpec:
    """One point of a grid: the notebook, its parameters, and its folder (relative to ``out_dir``)."""

    name: str
    notebook: Path
    parameters: dict
    varying: dict
    slurm: dict | None = None  # the entry's own Slurm resources (``slurm: {gpus: 1, time: "04:00:00"}``)


def _safe_component(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._=,+@-]+", "_", text).strip("_").lstrip(".")
    if not s:
        s = "_"
    if len(s) > _MAX_COMPONENT:
        import hashlib

        s = s[:100] + "-" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return s


def _value_text(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "+".join(_value_text(x) for x in v)
    if isinstance(v, Mapping):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def run_name(stem: str, varying: Mapping[str, Any], parameters: Mapping[str, Any] | None = None,
             template: str | None = None) -> str:
    """The run folder, relative to ``out_dir``: ``<stem>/<k>=<v>,...`` over the grid keys, or ``template``
    formatted with the parameters (and ``notebook`` = the stem); each path part made file-system safe."""
    if template is None:
        leaf = ",".join(f"{k}={_value_text(v)}" for k, v in varying.items()) or "default"
        parts = [stem, leaf]
    else:
        values = {k: _value_text(v) for k, v in {**(parameters or {}), **varying}.items()}
        values.setdefault("notebook", stem)
        try:
            text = template.format(**values)
        except KeyError as e:
            raise UserError(f"name template {template!r} uses {{{e.args[0]}}}, which is not a parameter: "
                            f"use one of {', '.join(sorted(values))}") from None
        except (ValueError, IndexError) as e:
            raise UserError(f"name template {template!r} is not a valid format string ({e})") from None
        parts = [p for p in text.replace("\\", "/").split("/") if p.strip()]
        if not parts:
            raise UserError(f"name template {template!r} gives an empty folder name: include a parameter, "
                            f"e.g. '{{notebook}}/{{method}}'")
    return "/".join(_safe_component(p) for p in parts)


def _repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".git").exists() or (d / "pyproject.toml").exists():
            return d
    return None


def _find_notebook(path: str, base_dirs: Sequence[Path], where: str) -> Path:
    p = Path(path).expanduser()
    tried = [p] if p.is_absolute() else [d / p for d in base_dirs]
    for t in tried:
        if t.is_file():
            return t.resolve()
    raise UserError(f"{where}: notebook {path!r} not found (looked in {', '.join(str(t) for t in dict.fromkeys(tried))}): "
                    f"give a path relative to the grid file or the repository root")


def load_grid(grid_path_or_dict: str | os.PathLike | Mapping | Sequence) -> tuple[dict | list, Path | None]:
    """Read a grid: a YAML file's contents (with the file's folder) or an already parsed dict/list."""
    if isinstance(grid_path_or_dict, (Mapping, list, tuple)):
        return grid_path_or_dict, None
    import yaml

    path = Path(grid_path_or_dict)
    if not path.is_file():
        raise UserError(f"grid file {path} does not exist: pass the path of a YAML grid, e.g. grids/quick.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"grid file {path} is not valid YAML{at} ({problem}): fix the syntax there") from None
    if data is None:
        raise UserError(f"grid file {path} is empty: add 'notebook:', 'parameters:' and 'grid:' (or a 'runs:' list)")
    return data, path.resolve().parent


def expand_grid(grid_path_or_dict, *, base_dir: str | os.PathLike | None = None) -> list[RunSpec]:
    """Expand a grid (YAML path, dict, or list of entries) into runs: the Cartesian product of each entry's
    ``grid`` values over its base ``parameters``. Raises ``UserError`` naming the bad key."""
    data, grid_dir = load_grid(grid_path_or_dict)
    label = str(grid_path_or_dict) if grid_dir is not None else "grid"
    if isinstance(data, Mapping) and "runs" in data:
        extra = [k for k in data if k != "runs"]
        if extra:
            raise UserError(f"{label}: unknown top-level key(s) {', '.join(map(str, extra))} next to 'runs': "
                            f"put them inside each entry's 'parameters'")
        entries = data["runs"]
        if isinstance(entries, Mapping):
            entries = [entries]
        where = "runs"
    elif isinstance(data, Mapping):
        entries, where = [data], None
    elif isinstance(data, (list, tuple)):
        entries, where = list(data), "runs"
    else:
        raise UserError(f"{label}: expected a mapping with 'notebook:' or a 'runs:' list, got {type(data).__name__}")
    if not isinstance(entries, (list, tuple)) or not entries:
        raise UserError(f"{label}: 'runs' must be a non-empty list of entries with 'notebook:'")

    bases = [Path(base_dir)] if base_dir is not None else []
    if grid_dir is not None:
        bases.append(grid_dir)
        root = _repo_root(grid_dir)
        if root is not None:
            bases.append(root)
    bases += [Path.cwd()]
    pkg_root = _repo_root(Path(__file__).resolve().parent)
    if pkg_root is not None:
        bases.append(pkg_root)

    specs: list[RunSpec] = []
    for i, entry in enumerate(entries):
        at = f"{label}: {where}[{i}]" if where else label
        specs += _expand_entry(entry, at, bases)

    seen: dict[str, RunSpec] = {}
    for s in specs:
        key = s.name.lower()
        if key in seen:
            raise UserError(f"two runs share the folder {s.name!r} ({seen[key].parameters} and {s.parameters}): "
                            f"give the entries different 'name' templates or grid keys")
        seen[key] = s
    return specs


def _expand_entry(entry, at: str, bases: Sequence[Path]) -> list[RunSpec]:
    if not isinstance(entry, Mapping):
        raise UserError(f"{at}: each entry must be a mapping with 'notebook:', got {type(entry).__name__}")
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:
        raise UserError(f"{at}: unknown key(s) {', '.join(map(str, unknown))}: an entry has only "
                        f"{', '.join(ENTRY_KEYS)}")
    if "notebook" not in entry or not isinstance(entry["notebook"], str) or not entry["notebook"].strip():
        raise UserError(f"{at}.notebook is missing: give the notebook's path, e.g. notebooks/04_prune_blip2.ipynb")
    notebook = _find_notebook(entry["notebook"], bases, f"{at}.notebook")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise UserError(f"{at}.parameters must be a mapping name: value, got {type(params).__name__}")
    grid = entry.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise UserError(f"{at}.grid must be a mapping name: [values], got {type(grid).__name__}")
    for k in list(params) + list(grid):
        if not isinstance(k, str) or not k.isidentifier():
            raise UserError(f"{at}: parameter name {k!r} is not a Python identifier: rename it as in the "
                            f"notebook's parameters cell")
        if k in RESERVED:
            raise UserError(f"{at}: {k} is set by the runner (each run's folder): remove it from the grid file")
    _check_parameter_names(list(params) + [k for k in grid if k not in params], notebook, entry["notebook"], at)
    for k, vals in grid.items():
        if not isinstance(vals, (list, tuple)):
            raise UserError(f"{at}.grid.{k} must be a list of values, got {vals!r}: write {k}: [{_value_text(vals)}]")
        if not vals:
            raise UserError(f"{at}.grid.{k} is an empty list, so the grid has no runs: give at least one value")
    if "SEEDS" in params:  # refused before anything runs, as the notebook would refuse it
        check_seeds(params["SEEDS"], f"{at}.parameters.SEEDS")
    for v in grid.get("SEEDS") or []:
        check_seeds(v, f"{at}.grid.SEEDS")
    template = entry.get("name")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{at}.name must be a string template such as '{{notebook}}/{{method}}-{{sparsity}}'")
    resources = entry.get("slurm")
    if resources is not None:
        from .cluster import SlurmOptions, entry_options

        entry_options(SlurmOptions(), resources, at)  # checked now, applied when submitted to Slurm
        resources = dict(resources)
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        varying = dict(zip(keys, combo))
        p = {**params, **varying}
        out.append(RunSpec(name=run_name(notebook.stem, varying, p, template), notebook=notebook,
                           parameters=p, varying=varying, slurm=resources))
    return out


_PARAMS_CACHE: dict[tuple[str, int], dict[str, dict]] = {}


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, dict]:
    """The parameters of a notebook's ``parameters`` cell: ``papermill.inspect_notebook``'s ``{name: {"name",
    "inferred_type_name", "default", "help"}}`` (cached per file and modification time). Raises ``UserError``
    when the notebook has no cell tagged ``parameters``, where papermill would inject the values at the top
    and nothing would read them."""
    path = Path(notebook).resolve()
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _PARAMS_CACHE:
        import nbformat
        import papermill as pm

        nb = nbformat.read(path, as_version=4)
        if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
            raise UserError(f"{path.name} has no cell tagged 'parameters', so a grid cannot set anything in it: "
                            f"tag the cell that assigns its parameters (jupytext: '# %% tags=[\"parameters\"]')")
        _PARAMS_CACHE[key] = pm.inspect_notebook(str(path))
    return _PARAMS_CACHE[key]


def _check_parameter_names(names: Sequence[str], notebook: Path, given: str, at: str) -> None:
    """Refuse, before anything runs, a grid parameter the notebook's parameters cell does not assign: papermill
    would inject it and nothing would read it."""
    import difflib

    have = notebook_parameters(notebook)
    unknown = [k for k in names if k not in have]
    if not unknown:
        return
    known = [k for k in have if k not in RESERVED]
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1, cutoff=0.6) or [c for c in known if c.lower() == k.lower()]
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    what = "is not a parameter" if len(unknown) == 1 else "are not parameters"
    raise UserError(f"{at}: {', '.join(hints)} {what} of {given} (its parameters: {', '.join(known)}): fix the "
                    f"name, or add it to the notebook's parameters cell")


# --------------------------------------------------------------------------------------------- kernel

_KERNEL_CACHE: dict[tuple, str] = {}


def _spec_uses_this_python(argv: Sequence[str]) -> bool:
    """Whether a kernel spec's command starts this interpreter (the same environment, not just the same binary).

    ``python``/``python3``/``python3.X`` are replaced by ``sys.executable`` by jupyter_client; an absolute path
    counts when it lies in the same ``bin`` folder as ``sys.executable`` (symlinks not resolved: a venv's
    python links to the base interpreter but is a different environment).
    """
    if not argv:
        return False
    exe = argv[0]
    if exe in {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}:
        return True
    if not os.path.isabs(exe):
        return False
    here = Path(os.path.abspath(sys.executable))
    there = Path(os.path.abspath(exe))
    return there == here or (there.parent == here.parent and there.name.startswith("python"))


def resolve_kernel(kernel_name: str | None = None, *, prefix: str | os.PathLike | None = None) -> str:
    """The Jupyter kernel to run notebooks with, in the current interpreter's environment.

    An explicit ``kernel_name`` must exist. Otherwise ``python3`` is used when its spec starts this Python;
    if it starts another one (a user-wide spec shadowing the venv's), an ``ecoflap`` kernel spec pointing at
    ``sys.executable`` is installed on demand with ipykernel under ``prefix`` (default ``sys.prefix``, i.e.
    the virtualenv's ``share/jupyter``), at most once per process.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    specs = ksm.find_kernel_specs()
    if kernel_name is not None:
        if kernel_name not in specs:
            raise UserError(f"Jupyter kernel {kernel_name!r} not found (have: {', '.join(sorted(specs)) or 'none'}): "
                            f"omit --kernel to use this Python, or install it with "
                            f"'python -m ipykernel install --sys-prefix --name {kernel_name}'")
        return kernel_name
    prefix = str(prefix or sys.prefix)
    key = (sys.executable, prefix)
    if key in _KERNEL_CACHE:
        return _KERNEL_CACHE[key]
    for name in ("python3", KERNEL_NAME):
        if name in specs:
            try:
                if _spec_uses_this_python(ksm.get_kernel_spec(name).argv):
                    _KERNEL_CACHE[key] = name
                    return name
            except NoSuchKernel:  # pragma: no cover - listed but not loadable
                pass
    from ipykernel.kernelspec import install

    try:
        install(kernel_name=KERNEL_NAME, display_name=f"Python ({Path(sys.prefix).name}, ecoflap)", prefix=prefix)
    except OSError as e:
        raise UserError(f"the python3 Jupyter kernel runs another Python than {sys.executable} and a kernel for "
                        f"this one could not be installed under {prefix} ({e}): run '{sys.executable} -m "
                        f"ipykernel install --user --name {KERNEL_NAME}' and pass --kernel {KERNEL_NAME}") from None
    try:
        argv = KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv
    except NoSuchKernel:
        argv = []
    if not _spec_uses_this_python(argv):
        raise UserError(f"could not make a Jupyter kernel for {sys.executable}: another '{KERNEL_NAME}' kernel "
                        f"spec shadows the one installed under {prefix}; pass --kernel NAME of a kernel for this "
                        f"Python")
    _KERNEL_CACHE[key] = KERNEL_NAME
    return KERNEL_NAME


# -------------------------------------------------------------------------------------------- running

@dataclass
class RunOutcome:
    """What happened to one run: ``status`` is ``done``, ``skipped`` (already complete), ``failed``, or, with
    ``--executor slurm``, ``pending`` (its job is queued or running) or ``missing`` (``--collect``: no job yet)."""

    spec: RunSpec
    run_dir: Path
    status: str
    error: str | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class GridResult:
    """A batch: each run's outcome, the results table of ``out_dir`` and the summary files written."""

    out_dir: Path
    runs: list[RunOutcome]
    results: Any = None  # pandas.DataFrame
    table: str = ""
    files: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    @property
    def executed(self) -> list[str]:
        return [r.name for r in self.runs if r.status != "skipped"]

    @property
    def skipped(self) -> list[str]:
        return [r.name for r in self.runs if r.status == "skipped"]

    @property
    def failed(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.status == "failed"]

    @property
    def pending(self) -> list[RunOutcome]:
        """Runs whose Slurm job is queued or running (``--no-wait``, ``--collect``), or never submitted."""
        return [r for r in self.runs if r.status in ("pending", "missing")]

    @property
    def ok(self) -> bool:
        return not self.failed


def is_complete(run_dir: str | os.PathLike) -> bool:
    """A run folder is complete when it holds ``results.json`` and the ``.complete`` marker (written last)."""
    d = Path(run_dir)
    return (d / COMPLETE).is_file() and (d / RESULTS).is_file()


def _first_line(e: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(e, PapermillExecutionError):
        text = f"{e.ename}: {e.evalue}"
    else:
        text = f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def check_results(obj: Any, path: str | os.PathLike = RESULTS) -> list[dict]:
    """Validate a results.json body: one record or a list of records in the house schema
    ``{"model", "method", "sparsity", "task", "metrics": {...}, "resources": {...}, "config": {...}}``, with an
    optional ``"intervals": {metric: [low, high]}``."""
    records = obj if isinstance(obj, list) else [obj]
    if not records:
        raise UserError(f"{path} holds an empty list: write at least one result record")
    for i, r in enumerate(records):
        where = f"{path}" + (f"[{i}]" if isinstance(obj, list) else "")
        if not isinstance(r, Mapping):
            raise UserError(f"{where} is not a record (a JSON object): write {{'model', 'method', 'sparsity', "
                            f"'task', 'metrics'}}")
        if not isinstance(r.get("metrics"), Mapping):
            raise UserError(f"{where} has no 'metrics' object: put the measured numbers under 'metrics'")
        for k in ("resources", "config"):
            if k in r and r[k] is not None and not isinstance(r[k], Mapping):
                raise UserError(f"{where}.{k} must be an object, got {type(r[k]).__name__}")
        iv = r.get("intervals")
        if iv is not None:
            if not isinstance(iv, Mapping):
                raise UserError(f"{where}.intervals must be an object {{metric: [low, high]}}, got {type(iv).__name__}")
            for m, pair in iv.items():
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)):
                    raise UserError(f"{where}.intervals.{m} must be [low, high] (two numbers), got {pair!r}")
    return [dict(r) for r in records]


def _prepare_run_dir(run_dir: Path, out_dir: Path, keep: Sequence[str] = ()) -> None:
    """Empty a stale run folder (ours: stamped, or already empty); refuse to touch anything else. Entries named
    in ``keep`` stay (a Slurm job keeps its ``slurm.json`` and log link, written at submission)."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} exists and is not a folder: move it away or choose another --out")
        contents = [p for p in run_dir.iterdir() if p.name not in keep]
        if contents and not (run_dir / STAMP).is_file():
            raise UserError(f"{run_dir} holds files that this runner did not write: move them away or choose "
                            f"another --out")
        assert not contents or out_dir in run_dir.parents
        for p in contents:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


#: seconds a notebook's kernel may take to answer its first request (papermill's default is 60). On a 2-core
#: machine running other notebooks and tests, a kernel once took longer than 60 s to start (session 8, `make test`:
#: "Kernel didn't respond in 60 seconds" in tests/test_cluster.py). The Ctrl-C test's timeout that session 8 blamed
#: on 300 s happened again at 60 s (session 9, under load), so the two are unrelated.
KERNEL_START_TIMEOUT = 300


def _execute(spec: RunSpec, run_dir: Path, out_dir: Path, *, kernel_name: str, timeout: float | None,
             keep: Sequence[str] = ()) -> RunOutcome:
    import papermill as pm

    _prepare_run_dir(run_dir, out_dir, keep)
    started = time.time()
    write_json_atomic(run_dir / STAMP, {"name": spec.name, "notebook": str(spec.notebook),
                                        "parameters": spec.parameters, "kernel": kernel_name,
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))})
    try:
        pm.execute_notebook(
            str(spec.notebook), str(run_dir / spec.notebook.name),
            parameters={**spec.parameters, "OUT_DIR": str(run_dir)},
            kernel_name=kernel_name, cwd=str(spec.notebook.parent), progress_bar=False,
            execution_timeout=int(math.ceil(timeout)) if timeout else None, start_timeout=KERNEL_START_TIMEOUT,
        )
        res = run_dir / RESULTS
        if not res.is_file():
            raise UserError(f"the notebook finished but wrote no {RESULTS} in OUT_DIR: save results there")
        try:
            check_results(json.loads(res.read_text()), res.relative_to(out_dir))
        except json.JSONDecodeError as e:
            raise UserError(f"{res.relative_to(out_dir)} is not valid JSON ({e})") from None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a failing run must not stop the batch
        err = _first_line(e)
        write_text_atomic(run_dir / "error.txt", f"{err}\n\n{e}\n")
        return RunOutcome(spec, run_dir, "failed", err, time.time() - started)
    seconds = time.time() - started
    write_json_atomic(run_dir / COMPLETE, {"name": spec.name, "seconds": round(seconds, 3),
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return RunOutcome(spec, run_dir, "done", None, seconds)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Intra-op threads each of ``jobs`` concurrent notebooks gets: an equal share of the cores, at least one.

    Oversubscription is what this prevents: two kernels that each start torch's default thread pool on two
    cores spin-wait against each other (NOTES.md session 3: a 30-second test took over 5 minutes)."""
    return max(1, (available_cores() if cores is None else cores) // max(1, jobs))


def _limit_threads(threads: int) -> None:
    """Worker initializer: the kernels it starts inherit this environment, so torch, OpenMP and MKL inside
    them use ``threads`` threads. A thread count the user exported is kept. Ctrl-C is left to the main
    process (:func:`_execute_in_parallel` stops the workers; their kernels exit with their parent)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def run_grid(grid_path_or_dict, out_dir: str | os.PathLike = "runs", *, kernel_name: str | None = None,
             progress: bool = True, timeout: float | None = None, summary: bool = True,
             jobs: int = 1, executor: str = "local", slurm=None, wait: bool = True,
             collect: bool = False) -> GridResult:
    """Run every point of a grid with papermill, skipping complete runs, then write the results table.

    Each run's notebook gets ``OUT_DIR`` (its folder under ``out_dir``) and its parameters; see the module
    docstring for the resume rules. Failing runs are recorded (first line of the error) and the batch goes
    on. ``timeout`` limits each cell (seconds). ``kernel_name`` defaults to a kernel of this Python
    (:func:`resolve_kernel`). With ``summary`` (default) ``results.csv``, ``results.md`` and
    ``figures/<model>_<task>_<metric>.png`` are written and the table and failures printed.

    ``jobs`` > 1 runs that many notebooks at once, in grid order as workers free up, each kernel with
    :func:`threads_per_job` threads. Small models use two threads poorly: on 2 cores two one-thread runs of
    notebooks 01 and 05 took 150 s together where one after the other at two threads took 226 s (NOTES.md
    session 5). The runs of one grid must not write to each other's files (each writes only its ``OUT_DIR``).

    ``executor="slurm"`` submits each run as a Slurm job through submitit (``slurm``: a
    ``cluster.SlurmOptions``; a grid entry's own ``slurm:`` resources go on top), with the same run folders,
    markers and resume rules (``cluster.py``). ``wait=False`` returns once the jobs are submitted (their runs
    read ``pending``); ``collect=True`` submits nothing and summarises what is complete, listing the runs
    still pending and those whose jobs ended without finishing (``failed``, with the reason).
    """
    from tqdm.auto import tqdm

    if executor not in ("local", "slurm"):
        raise UserError(f"unknown executor {executor!r}: use --executor local (this machine) or slurm (a Slurm "
                        f"cluster, through submitit)")
    if not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"jobs must be a whole number >= 1, got {jobs!r}: pass --jobs 1 to run one notebook at "
                        f"a time")
    if executor == "local" and slurm is not None:
        raise UserError("Slurm options were given with --executor local: add --executor slurm, or drop them")
    if executor == "slurm" and jobs != 1:
        raise UserError("--jobs sets local parallelism; with --executor slurm use --array-parallelism")
    specs = expand_grid(grid_path_or_dict)
    out = Path(out_dir).expanduser().resolve()
    if executor == "slurm" or collect:
        from .cluster import SlurmOptions, entry_options

        base = slurm if slurm is not None else SlurmOptions()
        options = {s.name: entry_options(base, s.slurm, s.name) for s in specs}  # all checked before submitting
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, RunOutcome] = {}
    todo = []
    for spec in specs:
        if is_complete(out / spec.name):
            done[spec.name] = RunOutcome(spec, out / spec.name, "skipped")
        else:
            todo.append(spec)
    bar = tqdm(total=len(specs), initial=len(done), desc="runs", unit="run", disable=None if progress else True)
    if collect:
        _collect_states(todo, out, done)
    elif todo and executor == "slurm":
        _run_on_slurm(todo, out, done, bar, options=options, kernel=resolve_kernel(kernel_name), timeout=timeout,
                      wait=wait)
    elif todo:
        kernel = resolve_kernel(kernel_name)
        if jobs == 1 or len(todo) == 1:
            for spec in todo:
                bar.set_postfix_str(spec.name, refresh=True)
                done[spec.name] = _execute(spec, out / spec.name, out, kernel_name=kernel, timeout=timeout)
                bar.update()
        else:
            _execute_in_parallel(todo, out, done, bar, kernel=kernel, timeout=timeout, jobs=jobs)
    bar.close()
    result = GridResult(out_dir=out, runs=[done[s.name] for s in specs])
    if summary:
        df = collect_results(out)
        result.results = df
        result.files, result.figures, result.table = write_summary(out, df)
        print(report_text(result))
    return result


def run_job(spec: RunSpec, run_dir: str, out_dir: str, kernel_name: str, timeout: float | None,
            threads: int | None) -> RunOutcome:
    """What one Slurm job runs: the notebook of ``spec`` into ``run_dir`` (:func:`_execute`, keeping the job's
    ``slurm.json`` and log link), with ``threads`` intra-op threads (the job's CPUs)."""
    from .cluster import JOB_FILE, LOG_LINK

    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
    return _execute(spec, Path(run_dir), Path(out_dir), kernel_name=kernel_name, timeout=timeout,
                    keep=(JOB_FILE, LOG_LINK))


def _job_outcome(tracked, spec: RunSpec, run_dir: Path) -> RunOutcome:
    """The outcome of a run whose Slurm job has ended: what the job returned, else a failure with the reason."""
    returned, why = tracked.ended(run_dir, is_complete(run_dir))
    if isinstance(returned, RunOutcome):
        return returned
    if why is None:
        return RunOutcome(spec, run_dir, "done")
    return RunOutcome(spec, run_dir, "failed", why)


def _collect_states(todo: Sequence[RunSpec], out: Path, done: dict) -> None:
    """``--collect``: the state of each run that is not complete, submitting nothing: ``pending`` while its
    recorded job is queued or running, ``failed`` (with the reason) when that job ended without finishing,
    ``missing`` when no job was ever recorded for it."""
    from .cluster import Tracked, read_job

    for spec in todo:
        run_dir = out / spec.name
        rec = read_job(run_dir)
        if rec is None:
            err = run_dir / "error.txt"
            if err.is_file():
                done[spec.name] = RunOutcome(spec, run_dir, "failed", err.read_text().splitlines()[0])
            else:
                done[spec.name] = RunOutcome(spec, run_dir, "missing", "not submitted yet")
            continue
        t = Tracked(rec)
        if t.state() == "alive":
            done[spec.name] = RunOutcome(spec, run_dir, "pending", f"job {rec.job_id}")
        else:
            done[spec.name] = _job_outcome(t, spec, run_dir)


def _run_on_slurm(todo: Sequence[RunSpec], out: Path, done: dict, bar, *, options: Mapping, kernel: str,
                  timeout: float | None, wait: bool) -> None:
    """Submit the runs of ``todo`` that no live job is already doing (one job each, arrays per resources),
    then, with ``wait``, follow every job until it ends and record its outcome."""
    from .cluster import Tracked, read_job, submit

    follow: dict[str, Tracked] = {}
    fresh = []
    for spec in todo:
        run_dir = out / spec.name
        rec = read_job(run_dir)
        if rec is not None and Tracked(rec).state() == "alive":
            follow[spec.name] = Tracked(rec)  # submitted by an earlier call: never twice
            continue
        _prepare_run_dir(run_dir, out)
        write_json_atomic(run_dir / STAMP, {"name": spec.name, "notebook": str(spec.notebook),
                                            "parameters": spec.parameters, "kernel": kernel, "executor": "slurm",
                                            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        fresh.append((spec, run_dir))
    by_name = {s.name: s for s in todo}
    # Slurm throttles an array itself (%array_parallelism); submitit's local cluster starts every job at once,
    # so there the jobs are handed over as earlier ones end, array_parallelism at a time.
    local = bool(fresh) and all(options[s.name].cluster == "local" for s, _ in fresh)
    slots = min(options[s.name].array_parallelism for s, _ in fresh) if local and wait else len(fresh)

    def hand_over():
        n = max(0, slots - len(follow)) if local and wait else len(fresh)
        batch, fresh[:] = fresh[:n], fresh[n:]
        if batch:
            follow.update(submit(run_job, batch, lambda s: options[s.name], out, kernel_name=kernel, timeout=timeout))

    hand_over()
    if not wait:
        for name, t in follow.items():
            done[name] = RunOutcome(by_name[name], out / name, "pending", f"job {t.record.job_id}")
        return
    poll = 0.5 if local or all(t.record.cluster == "local" for t in follow.values()) else 30.0
    while follow:
        bar.set_postfix_str(f"{len(follow)} job(s) queued or running", refresh=True)
        for name in [n for n, t in follow.items() if t.state() == "ended"]:
            done[name] = _job_outcome(follow.pop(name), by_name[name], out / name)
            bar.update()
        hand_over()
        if follow:
            time.sleep(poll)


def _execute_in_parallel(todo: Sequence[RunSpec], out: Path, done: dict, bar, *, kernel: str,
                         timeout: float | None, jobs: int) -> None:
    """Run ``todo`` in a pool of ``min(jobs, len(todo))`` processes (spawned: no torch state forked), filling
    ``done`` as runs finish; a worker's unexpected error (not a failing notebook, which ``_execute`` records)
    propagates, as it would when running one at a time.

    Ctrl-C stops the batch at once: no further run starts, the workers are terminated, and their kernels,
    which watch their parent process (ipykernel's parent poller), exit with them. The runs they were doing
    keep no ``.complete`` marker, so the next call redoes them and skips the finished ones."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(jobs, len(todo))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_limit_threads, initargs=(threads_per_job(workers),))
    try:
        running = {pool.submit(_execute, spec, out / spec.name, out, kernel_name=kernel, timeout=timeout): spec
                   for spec in todo}
        shown = None
        while running:
            now = ", ".join(sorted(s.name for f, s in running.items() if f.running()))[:80]
            if now != shown:
                bar.set_postfix_str(now, refresh=True)
                shown = now
            # a timeout, so that the main thread wakes every second and a Ctrl-C is acted on even when it woke
            # another thread of this process (the pool's manager or feeder thread)
            finished, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                spec = running.pop(fut)
                done[spec.name] = fut.result()
                bar.update()
    except BaseException:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.terminate()
        for p in processes:
            p.join(10)
        raise
    pool.shutdown(wait=True)


def report_text(result: GridResult) -> str:
    """The end-of-batch report: counts, the results table, where the figures are, the failed runs, and (Slurm)
    the runs still pending with where their logs are."""
    n = len(result.runs)
    done = sum(r.status == "done" for r in result.runs)
    lines = [f"{n} run(s): {done} done, {len(result.skipped)} skipped (already complete), {len(result.failed)} "
             f"failed" + (f", {len(result.pending)} pending" if result.pending else "")]
    if result.table:
        lines += ["", result.table, ""]
    if result.files:
        lines.append("wrote " + ", ".join(str(p) for p in result.files))
    if result.figures:
        lines.append(f"{len(result.figures)} figure(s) in {result.out_dir / 'figures'}")
    if result.failed:
        lines.append(f"{len(result.failed)} failed run(s) (no {COMPLETE} marker; run the grid again to retry):")
        for r in result.failed:
            lines.append(f"  {r.name}: {r.error}  [{r.run_dir / r.spec.notebook.name}]")
    if result.pending:
        lines.append(f"{len(result.pending)} run(s) not finished yet (collect later with the same command and "
                     f"--collect; a run's Slurm logs are in its slurm/ folder):")
        for r in result.pending:
            lines.append(f"  {r.name}: {r.status} ({r.error})")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- results
# What the summary shows, and why it is true: every table cell and figure point is a ``records.points`` point.
# Records are told apart by the fields that say what they are (``records.annotate``): a fine-tuned model is its
# own row and series (``wanda · FT 30 steps``), never a one-shot point; 07's intermediate curve points stay in
# results.csv and the list of all records only; records of one point from several seeds are their mean with
# min–max over seeds; the dense model is one row unless runs measured different dense numbers.

def metric_columns(df) -> list[str]:
    """The metric columns of a results frame (everything but run/core/label/seed/resources/config/intervals
    columns)."""
    return [c for c in df.columns if is_metric_column(c)]


def collect_results(out_dir: str | os.PathLike = "runs"):
    """Every complete run's ``results.json`` under ``out_dir`` as one DataFrame (see :func:`records_frame`),
    with a ``run`` column (the run folder), ``label`` and ``seed`` (what each record is, ``records.annotate``),
    sorted by model, task, method, sparsity."""
    from .records import annotate

    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not a folder of runs: run a grid into it first")
    records, names = [], []
    for marker in sorted(out.rglob(COMPLETE)):
        d = marker.parent
        if not is_complete(d):
            continue
        path = d / RESULTS
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}): delete {marker} and run the grid again") from None
        for rec in check_results(body, path):
            records.append(rec)
            names.append(d.relative_to(out).as_posix())
    df = annotate(records_frame(records, runs=names))
    cols = ["run", *CORE_COLUMNS, "label", "seed"]
    df = df[cols + [c for c in df.columns if c not in cols]]
    return sort_results(df)


def sort_results(df):
    """Sort a results frame by model, task, method, sparsity (missing values last)."""
    if df.empty:
        return df.reset_index(drop=True)
    key = lambda s: s.astype(float) if s.name == "sparsity" else s.astype(str)
    return df.sort_values(["model", "task", "method", "sparsity"], key=key, na_position="last",
                          kind="stable").reset_index(drop=True)


def results_markdown(df, *, floatfmt: str = ".4f") -> str:
    """Markdown table: model, task, method, then ``label`` where some record's label is not its method (a
    fine-tuned record, a curve point: ``records.annotate``), sparsity, ``seed`` where records carry one, then the
    metric columns; a value with a 95 % interval (the record's ``"intervals"``) reads ``value [low, high]``."""
    from .intervals import format_interval
    from .records import annotate
    from .report import format_table

    if df.empty:
        return "(no complete runs)"
    df = annotate(df)
    metrics = metric_columns(df)
    kinds = ["label"] if (df["label"].astype(str) != df["method"].astype(str)).any() else []
    seeds = ["seed"] if df["seed"].notna().any() else []
    cols = ["model", "task", "method", *kinds, "sparsity", *seeds, *metrics]
    bounds = {c: b for c in metrics if (b := interval_bounds(df, c)) is not None}
    rows = []
    for i, rec in zip(df.index, df[cols].to_dict("records")):
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        for c, (low, high) in bounds.items():
            v = row.get(c)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and low.notna()[i] and high.notna()[i]:
                row[c] = format_interval(v, (low[i], high[i]), floatfmt)
        rows.append(row)
    return format_table(rows, cols, floatfmt=floatfmt)


def _summary_groups(df):
    """(model, task, its frame, the row fields of its table and figures: ``records.summary_rows``) for each model
    and task whose records span two or more sparsities (the others, e.g. notebook 02's scores at sparsity 0 by
    sample count, have no table by sparsity to show)."""
    import pandas as pd

    from .records import summary_rows

    keys = [df["model"].fillna("model").astype(str), df["task"].fillna("task").astype(str)]
    for (model, task), sub in df.groupby(keys, sort=False):
        if pd.to_numeric(sub["sparsity"], errors="coerce").nunique() >= 2:
            yield model, task, sub, summary_rows(sub)


def headline_tables(df, *, floatfmt: str = ".2f") -> str:
    """For each (model, task) whose records span several sparsities: its main metric with one row per kind of
    model (the method; ``wanda · FT 30 steps`` for a fine-tuned one; a row per run where several runs measure it
    at one sparsity; one dense row unless runs measured different dense numbers) and one column per sparsity,
    dense in column 0; several seeds read as their mean (min–max over seeds) [item interval]
    (``report.headline_markdown``, which the notebooks' closing tables use too)."""
    from .records import annotate
    from .report import headline_markdown

    if df.empty:
        return "(no complete runs)"
    df = annotate(df)
    parts = [headline_markdown(sub, floatfmt=floatfmt, min_columns=2, rows=rows)
             for _, _, sub, rows in _summary_groups(df)]
    return "\n\n".join(p for p in parts if p) or "(no run spans several sparsities)"


def write_summary(out_dir: str | os.PathLike, df=None) -> tuple[list[Path], list[Path], str]:
    """Write ``results.csv`` (every record, with its ``label`` and ``seed``), ``results.md`` (headline tables, then
    every record) and ``figures/<model>_<task>_<metric>.png`` (:func:`summary_figure`) in ``out_dir``,
    atomically. Returns (files, figures, the headline tables in Markdown). Records that cannot be told apart
    or compared (``records.points``) are a UserError, before anything is written."""
    from .records import annotate

    out = Path(out_dir)
    if df is None:
        df = collect_results(out)
    df = annotate(df)
    headline = headline_tables(df)
    figures = _summary_figures(df)
    write_text_atomic(out / "results.csv", df.to_csv(index=False))
    write_text_atomic(out / "results.md", "## Headline\n\n" + headline + "\n\n## All records\n\n"
                      + results_markdown(df) + "\n")
    return [out / "results.csv", out / "results.md"], _save_figures(out, figures), headline


def summary_figure(df, model: str, task: str, metric: str, *, rows: Sequence[str] | None = None):
    """The summary figure of one (model, task, metric) as a matplotlib ``Figure``, or None where its records do
    not span two sparsities or hold no pruned model (``rows``: the series' fields, by default
    ``records.summary_rows``): the metric against sparsity, one series per kind of model,
    a single-sparsity series as a marker, seeds as their mean with a bar over their range, the dense model as a
    star, 95 % item intervals as error bars (``plots.metric_vs_sparsity``); perplexity on a log scale."""
    import pandas as pd
    from matplotlib.figure import Figure

    from . import plots
    from .records import annotate, points, summary_rows

    df = annotate(df)
    sub = df[(df["model"].astype(str) == model) & (df["task"].astype(str) == task)]
    if (metric not in sub.columns or sub[metric].map(lambda v: isinstance(v, bool)).any()
            or pd.to_numeric(sub["sparsity"], errors="coerce").nunique() < 2):
        return None
    values = pd.to_numeric(sub[metric], errors="coerce")
    if values.isna().all():
        return None
    sub = sub.assign(**{metric: values})
    rows = rows or summary_rows(sub)
    pts = points(sub, metric, column="sparsity", rows=rows)
    x = pd.to_numeric(pts["at"], errors="coerce")
    if x.nunique() < 2 or pts["dense"].all():
        return None
    fig = Figure(figsize=(5.5 + (2.5 if pts["row"].nunique() > 4 else 0.0), 3.8))  # room for the legend
    ax = fig.add_subplot()
    plots.metric_vs_sparsity(ax, sub, metric, rows=rows)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{model} · {task}")
    return fig


def _summary_figures(df) -> list[tuple[str, Any]]:
    """(file stem, Figure) for each (model, task, numeric metric) that has a summary figure."""
    import matplotlib as mpl

    from . import plots

    figures = []
    if df.empty:
        return figures
    with mpl.rc_context():
        plots.set_style()
        for model, task, sub, rows in _summary_groups(df):
            for metric in metric_columns(sub):
                fig = summary_figure(sub, model, task, metric, rows=rows)
                if fig is not None:
                    figures.append((f"{model}_{task}_{metric}", fig))
    return figures


def _save_figures(out_dir: Path, figures) -> list[Path]:
    from . import plots

    return [plots.save(fig, out_dir, stem) for stem, fig in figures]


def summary_figures(out_dir: str | os.PathLike, df) -> list[Path]:
    """Write every summary figure (:func:`summary_figure`) to ``out_dir/figures/<model>_<task>_<metric>.png``;
    returns their paths."""
    from .records import annotate

    return _save_figures(Path(out_dir), _summary_figures(annotate(df)) if not df.empty else [])
