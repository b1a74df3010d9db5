"""The papermill batch runner (runs.py), its CLI (cli_runs.py) and the figure helpers (plots.py).

The notebook runs use tests/fixtures/toy_results.ipynb (stdlib only): its metrics are a known function of the
parameters, it appends a line to COUNTER_FILE each time it executes, and FAIL=True makes it raise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ecoflap_utils import plots, runs
from ecoflap_utils.cli_runs import add_runs_parser
from ecoflap_utils.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
TOY = FIXTURES / "toy_results.ipynb"
FACTOR = {"wanda": 1.0, "magnitude": 2.0, "sparsegpt": 0.5}


def expected_metrics(method, sparsity):
    f = FACTOR.get(method, 0.0)
    return {"accuracy": round(0.9 - f * sparsity ** 2, 6), "loss": round(1.0 + f * sparsity, 6)}


def write_grid(path: Path, counter: Path) -> Path:
    path.write_text(f"""
runs:
  - notebook: {os.path.relpath(TOY, path.parent)}
    parameters: {{model: toy, task: cls, COUNTER_FILE: "{counter}"}}
    grid:
      method: [wanda, magnitude]
      sparsity: [0.3, 0.6]
  - notebook: {TOY}
    name: "{{notebook}}/broken"
    parameters: {{model: toy, task: cls, FAIL: true, COUNTER_FILE: "{counter}"}}
  - notebook: {TOY}
    name: "{{notebook}}/dense"
    parameters: {{model: toy, task: cls, method: dense, sparsity: 0.0, COUNTER_FILE: "{counter}"}}
""")
    return path


def executions(counter: Path) -> list[str]:
    return [ln.split("\t")[0] for ln in counter.read_text().splitlines()] if counter.exists() else []


GRID_RUNS = ["method=wanda,sparsity=0.3", "method=wanda,sparsity=0.6", "method=magnitude,sparsity=0.3",
             "method=magnitude,sparsity=0.6", "broken", "dense"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    counter = root / "counter.txt"
    grid = write_grid(root / "grid.yaml", counter)
    result = runs.run_grid(grid, root / "out", progress=False)
    return root, grid, counter, result


# ------------------------------------------------------------------------------------------- grid expansion

def test_grid_product_expands_to_named_runs():
    specs = runs.expand_grid({"notebook": str(TOY), "parameters": {"model": "m", "sparsity": 0.1},
                              "grid": {"method": ["wanda", "sparsegpt"], "sparsity": [0.5, 0.7, 1e-05]}})
    assert len(specs) == 6
    assert [s.name for s in specs][:3] == ["toy_results/method=wanda,sparsity=0.5",
                                           "toy_results/method=wanda,sparsity=0.7",
                                           "toy_results/method=wanda,sparsity=1e-05"]
    assert {(s.parameters["method"], s.parameters["sparsity"]) for s in specs} == {
        (m, p) for m in ("wanda", "sparsegpt") for p in (0.5, 0.7, 1e-05)}
    assert all(s.parameters["model"] == "m" and s.notebook == TOY.resolve() for s in specs)
    # a bare entry without a grid is one run
    (one,) = runs.expand_grid({"notebook": str(TOY)})
    assert one.name == "toy_results/default" and one.parameters == {}


def test_run_names_are_filesystem_safe_and_templated():
    (s,) = runs.expand_grid({"notebook": str(TOY), "grid": {"model": ["Salesforce/blip2 opt:2.7b"],
                                                            "task": [["vision", "lm"]]}})
    assert s.name == "toy_results/model=Salesforce_blip2_opt_2.7b,task=vision+lm"
    assert "/" not in s.name.split("/", 1)[1]
    (t,) = runs.expand_grid({"notebook": str(TOY), "name": "../{notebook}/{method}-s{sparsity}",
                             "parameters": {"method": "wanda"}, "grid": {"sparsity": [0.5]}})
    assert t.name == "_/toy_results/wanda-s0.5"  # no escaping out_dir with '..'
    with pytest.raises(UserError, match=r"share the folder"):
        runs.expand_grid({"runs": [{"notebook": str(TOY), "name": "x", "grid": {"sparsity": [0.1, 0.2]}}]})
    with pytest.raises(UserError, match=r"\{seed\}"):
        runs.expand_grid({"notebook": str(TOY), "name": "{seed}", "grid": {"sparsity": [0.1]}})


@pytest.mark.parametrize("text, match", [
    ("notebook: [unclosed\n", r"not valid YAML at line \d+"),
    ("runs:\n  - notebook: NB\n    grids: {sparsity: [0.5]}\n", r"runs\[0\].*unknown key.*grids"),
    ("runs:\n  - notebook: NB\n  - notebook: NB\n    grid: {sparsity: 0.5}\n", r"runs\[1\]\.grid\.sparsity must be a list"),
    ("notebook: NB\ngrid: {sparsity: []}\n", r"grid\.sparsity is an empty list"),
    ("notebook: NB\nparameters: {OUT_DIR: x}\n", r"OUT_DIR is set by the runner"),
    ("notebook: no_such_notebook.ipynb\n", r"notebook 'no_such_notebook.ipynb' not found"),
    ("parameters: {a: 1}\n", r"notebook is missing"),
    ("", r"is empty"),
    ("runs: []\nextra: 1\n", r"unknown top-level key.*extra"),
])
def test_bad_grid_files_raise_user_errors_naming_the_key(tmp_path, text, match):
    grid = tmp_path / "bad.yaml"
    grid.write_text(text.replace("NB", str(TOY)))
    parser = argparse.ArgumentParser()
    add_runs_parser(parser.add_subparsers())
    args = parser.parse_args(["runs", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(UserError, match=match):
        args.func(args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.ipynb"))


def test_unknown_parameter_is_refused_before_anything_runs(tmp_path, capsys):
    """A parameter the notebook's parameters cell does not assign (papermill would inject it and nothing would
    read it) stops the grid when it is expanded: one line naming the entry, the name, the notebook and a guess."""
    counter = tmp_path / "counter.txt"
    grid = tmp_path / "typo.yaml"
    grid.write_text(f"runs:\n  - notebook: {TOY}\n    grid: {{sparsity: [0.5]}}\n"
                    f"  - notebook: {TOY}\n    parameters: {{model: toy, COUNTER_FILE: '{counter}', CALIBRATION: x}}\n"
                    f"    grid: {{sparsty: [0.3, 0.6]}}\n")
    parser = argparse.ArgumentParser()
    add_runs_parser(parser.add_subparsers())
    args = parser.parse_args(["runs", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(UserError) as err:
        args.func(args)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{grid}: runs[1]: 'CALIBRATION', 'sparsty' (did you mean 'sparsity'?) are not parameters "
                          f"of {TOY} (its parameters: model, task, method, sparsity, FAIL, COUNTER_FILE, SLEEP, SEEDS): fix the name"), msg
    assert not (tmp_path / "out").exists() and not counter.exists()  # nothing ran, nothing was written
    with pytest.raises(UserError, match=r"^grid: 'Sparsity' \(did you mean 'sparsity'\?\) is not a parameter of"):
        runs.expand_grid({"notebook": str(TOY), "parameters": {"Sparsity": 0.5}})
    assert set(runs.notebook_parameters(TOY)) == {"OUT_DIR", "model", "task", "method", "sparsity", "FAIL", "COUNTER_FILE", "SLEEP", "SEEDS"}


def test_notebook_without_a_parameters_cell_is_refused(tmp_path):
    import nbformat

    nb = nbformat.read(TOY, as_version=4)
    for c in nb.cells:
        c.metadata.pop("tags", None)
    nbformat.write(nb, tmp_path / "untagged.ipynb")
    with pytest.raises(UserError, match=r"untagged.ipynb has no cell tagged 'parameters'"):
        runs.expand_grid({"notebook": str(tmp_path / "untagged.ipynb"), "parameters": {"model": "m"}})


def test_missing_grid_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        runs.run_grid(tmp_path / "nope.yaml", tmp_path / "out", progress=False)


def test_notebook_path_relative_to_grid_file(tmp_path):
    sub = tmp_path / "grids"
    sub.mkdir()
    shutil.copy(TOY, tmp_path / "nb.ipynb")
    (sub / "g.yaml").write_text("notebook: ../nb.ipynb\ngrid: {sparsity: [0.5]}\n")
    (s,) = runs.expand_grid(sub / "g.yaml")
    assert s.notebook == (tmp_path / "nb.ipynb").resolve()


# ---------------------------------------------------------------------------------------------- kernels

def test_kernel_is_one_of_this_python():
    from jupyter_client.kernelspec import KernelSpecManager

    name = runs.resolve_kernel()
    argv = KernelSpecManager().get_kernel_spec(name).argv
    assert runs._spec_uses_this_python(argv)
    with pytest.raises(UserError, match="kernel 'no-such-kernel' not found"):
        runs.resolve_kernel("no-such-kernel")


def test_kernel_spec_for_another_python_is_replaced(tmp_path, monkeypatch):
    fake = tmp_path / "fake" / "kernels" / "python3"
    fake.mkdir(parents=True)
    (fake / "kernel.json").write_text(json.dumps({"argv": ["/opt/other/bin/python3", "-m", "ipykernel_launcher",
                                                           "-f", "{connection_file}"],
                                                  "display_name": "other", "language": "python"}))
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(tmp_path / "fake"), str(prefix / "share" / "jupyter")]))
    from jupyter_client.kernelspec import KernelSpecManager

    assert not runs._spec_uses_this_python(KernelSpecManager().get_kernel_spec("python3").argv)
    name = runs.resolve_kernel(prefix=prefix)
    assert name == runs.KERNEL_NAME
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert runs.resolve_kernel(prefix=prefix) == name  # cached: installed at most once


# ------------------------------------------------------------------------------------------- batch runs

def test_batch_runs_every_point_into_its_own_folder(batch):
    root, _, counter, result = batch
    out = root / "out" / "toy_results"
    assert result.executed == [f"toy_results/{n}" for n in GRID_RUNS] and result.skipped == []
    assert sorted(executions(counter)) == sorted(GRID_RUNS)  # each notebook ran once
    for n in GRID_RUNS:
        d = out / n
        assert (d / "toy_results.ipynb").is_file()  # executed notebook kept
        assert runs.is_complete(d) == (n != "broken")
        if n != "broken":
            rec = json.loads((d / "results.json").read_text())
            assert rec["config"]["out_dir"] == str(d)  # OUT_DIR injected = the run folder
            assert rec["config"]["cwd"] == "fixtures"  # run from the notebook's folder
            assert rec["metrics"] == expected_metrics(rec["method"], rec["sparsity"])


def test_failing_run_is_listed_and_does_not_stop_the_batch(batch, capsys):
    root, _, _, result = batch
    assert not result.ok
    (failed,) = result.failed
    assert failed.name == "toy_results/broken"
    assert failed.error == "RuntimeError: told to fail (FAIL=True, method=wanda)"
    broken = root / "out" / "toy_results" / "broken"
    assert not (broken / runs.COMPLETE).exists() and not (broken / "results.json").exists()
    assert "told to fail" in (broken / "error.txt").read_text()
    assert runs.is_complete(root / "out" / "toy_results" / "dense")  # the run after it still ran
    assert "toy_results/broken: RuntimeError: told to fail" in runs.report_text(result)


def test_results_table_csv_md_and_figures(batch):
    root, _, _, result = batch
    out = root / "out"
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 5 and "broken" not in " ".join(df["run"])
    assert list(df.columns[:5]) == ["run", "model", "method", "sparsity", "task"]
    for row in df.itertuples():
        exp = expected_metrics(row.method, row.sparsity)
        assert row.accuracy == pytest.approx(exp["accuracy"], abs=1e-12)
        assert row.loss == pytest.approx(exp["loss"], abs=1e-12)
    assert df["resources.seconds"].tolist() == [0.01] * 5
    text = (out / "results.md").read_text()
    head, full = text.split("## All records")
    # headline: toy/cls's main metric (its first metric, accuracy) by method and sparsity, dense in column 0
    hl = [[c.strip() for c in ln.strip("|").split("|")] for ln in head.splitlines() if ln.startswith("|")]
    assert hl[0] == ["method", "0", "0.3", "0.6"]
    assert hl[2:] == [["dense", f"{expected_metrics('dense', 0.0)['accuracy']:.2f}", "", ""]] + [
        [m, "", f"{expected_metrics(m, 0.3)['accuracy']:.2f}", f"{expected_metrics(m, 0.6)['accuracy']:.2f}"]
        for m in ("magnitude", "wanda")]
    assert result.table.strip() == head.replace("## Headline", "").strip()
    md = [ln for ln in full.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in md[0].strip("|").split("|")] == ["model", "task", "method", "sparsity",
                                                                 "accuracy", "loss"]
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in md[2:]]
    assert [(r[2], r[3]) for r in body] == [("dense", "0.0000"), ("magnitude", "0.3000"), ("magnitude", "0.6000"),
                                           ("wanda", "0.3000"), ("wanda", "0.6000")]
    assert body[2][4] == f"{expected_metrics('magnitude', 0.6)['accuracy']:.4f}"
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["toy_cls_accuracy.png", "toy_cls_loss.png"]
    assert [p.name for p in result.figures] == figs
    assert (out / "figures" / "toy_cls_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.results.equals(runs.collect_results(out))


def test_rerun_skips_complete_runs_and_redoes_incomplete_ones(batch, tmp_path):
    root, grid, counter, _ = batch
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    redo = out / "toy_results" / "method=magnitude,sparsity=0.3"
    (redo / runs.COMPLETE).unlink()  # as if killed after results.json but before the marker
    (redo / "stale.txt").write_text("from an interrupted attempt")
    kept = out / "toy_results" / "method=wanda,sparsity=0.6"
    kept_marker = (kept / runs.COMPLETE).read_text()
    before = len(executions(counter))

    result = runs.run_grid(grid, out, progress=False)

    assert sorted(result.executed) == ["toy_results/broken", "toy_results/method=magnitude,sparsity=0.3"]
    assert len(result.skipped) == 4
    assert sorted(executions(counter)[before:]) == ["broken", "method=magnitude,sparsity=0.3"]
    assert runs.is_complete(redo) and not (redo / "stale.txt").exists()  # partial folder cleaned, not trusted
    assert json.loads((redo / "results.json").read_text())["config"]["out_dir"] == str(redo.resolve())
    assert (kept / runs.COMPLETE).read_text() == kept_marker  # untouched
    assert len(result.results) == 5


def test_parallel_jobs_overlap_share_the_cores_and_keep_grid_order(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runs, "available_cores", lambda: 4)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
runs:
  - notebook: {TOY}
    parameters: {{model: toy, task: cls, method: wanda, SLEEP: 3}}
    grid: {{sparsity: [0.1, 0.2, 0.3]}}
  - notebook: {TOY}
    name: "{{notebook}}/broken"
    parameters: {{FAIL: true}}
""")
    result = runs.run_grid(grid, tmp_path / "out", progress=False, summary=False, jobs=2)

    names = ["sparsity=0.1", "sparsity=0.2", "sparsity=0.3", "broken"]
    assert [r.name for r in result.runs] == [f"toy_results/{n}" for n in names]  # grid order, not finish order
    assert [r.status for r in result.runs] == ["done", "done", "done", "failed"]
    assert result.failed[0].error == "RuntimeError: told to fail (FAIL=True, method=wanda)"
    cfg = [json.loads((tmp_path / "out" / "toy_results" / n / "results.json").read_text())["config"]
           for n in names[:3]]
    assert [c["omp_threads"] for c in cfg] == ["2"] * 3  # 4 cores shared by 2 kernels
    (s1, f1), (s2, f2), (s3, _) = [(c["started"], c["finished"]) for c in cfg]
    assert s2 < f1 and s1 < f2  # the first two ran at the same time
    assert s3 >= min(f1, f2)  # and the third waited for a free worker: never more than 2 at once


def test_ctrl_c_stops_a_parallel_batch_at_once_and_a_rerun_resumes(tmp_path):
    """SIGINT to the batch (as Ctrl-C sends it to the terminal's process group): exit 130 within seconds with a
    one-line message, no queued run started, the kernels gone, nothing marked complete; the rerun does it all."""
    import signal
    import subprocess
    import time

    counter = tmp_path / "counter.txt"

    def grid(sleep):
        path = tmp_path / f"grid{sleep}.yaml"
        path.write_text(f"notebook: {TOY}\nparameters: {{SLEEP: {sleep}, COUNTER_FILE: '{counter}'}}\n"
                        f"grid: {{sparsity: [0.1, 0.2, 0.3]}}\n")
        return path

    # output to files, not pipes: the kernels inherit them, and the main process's exit is what is timed here.
    # The batch starts with Ctrl-C's default action and SIGINT unblocked, as from a terminal: a child inherits
    # an ignored or blocked SIGINT from its parent (here a pytest-xdist worker), and Python then never raises
    # KeyboardInterrupt (twice in session 8 and 9's make test the batch did not react to SIGINT for 60 s, with
    # its workers alive: it had not even begun to stop them).
    here = (signal.getsignal(signal.SIGINT), sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

    def as_from_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    log = tmp_path / "runs.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "ecoflap_utils", "runs", str(grid(60)), "--out",
                                 str(tmp_path / "out"), "--jobs", "2", "--no-progress"], stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=as_from_a_terminal)
    deadline = time.time() + 120
    while len(executions(counter)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(executions(counter)) == 2, log.read_text()  # both workers' kernels are running a notebook
    kernels = [int(ln.split("\t")[2]) for ln in counter.read_text().splitlines()]
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # say what was still alive before failing
        tree = subprocess.run(["ps", "-o", "pid,ppid,stat,etimes,args", "-g", str(proc.pid)], capture_output=True,
                              text=True).stdout
        status = [ln.strip() for ln in open(f"/proc/{proc.pid}/status") if ln.startswith(("Sig", "ShdPnd"))]
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the batch did not exit within 60 s of Ctrl-C; its processes:\n{tree}\nits signals: {status}; "
                    f"this test process's SIGINT handler and blocked signals: {here}\n{log.read_text()}")
    assert proc.returncode == 130 and time.time() - t0 < 20
    assert "interrupted: finished runs are kept (they hold a .complete marker); run the same command again to do " \
           "the others" in log.read_text().splitlines()  # one line (the kernels' own log lines may follow it)
    gone = time.time() + 30  # ipykernel's parent poller checks every second; a loaded machine may be slower
    while any(_alive(pid) for pid in kernels) and time.time() < gone:
        time.sleep(0.5)
    assert not [pid for pid in kernels if _alive(pid)]
    assert sorted(executions(counter)) == ["sparsity=0.1", "sparsity=0.2"]  # the queued run never started
    assert not list((tmp_path / "out").glob("*/*/" + runs.COMPLETE))

    result = runs.run_grid(grid(0), tmp_path / "out", progress=False, summary=False, jobs=2)
    assert [r.status for r in result.runs] == ["done"] * 3
    assert sorted(executions(counter)[2:]) == ["sparsity=0.1", "sparsity=0.2", "sparsity=0.3"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process that no one has reaped yet, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): trust the signal
        return True


@pytest.mark.parametrize("jobs", [0, -1, 1.5])
def test_bad_jobs_is_a_user_error(tmp_path, jobs):
    with pytest.raises(UserError, match="jobs must be a whole number"):
        runs.run_grid({"notebook": str(TOY)}, tmp_path / "out", progress=False, jobs=jobs)
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes_and_foreign_folder_is_refused(tmp_path, capsys):
    counter = tmp_path / "counter.txt"
    grid = tmp_path / "ok.yaml"
    grid.write_text(f"notebook: {TOY}\nparameters: {{COUNTER_FILE: '{counter}'}}\ngrid: {{sparsity: [0.2]}}\n")
    parser = argparse.ArgumentParser()
    add_runs_parser(parser.add_subparsers())
    args = parser.parse_args(["runs", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    assert args.func(args) == 0 and executions(counter) == ["sparsity=0.2"]  # second call skips
    assert "1 skipped" in capsys.readouterr().out
    # a folder at a run's place with files the runner did not write is never deleted
    foreign = tmp_path / "out2" / "toy_results" / "sparsity=0.2"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        runs.run_grid(grid, tmp_path / "out2", progress=False)
    assert (foreign / "notes.txt").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"notebook: {TOY}\nparameters: {{FAIL: true}}\n")
    args = parser.parse_args(["runs", str(bad), "--out", str(tmp_path / "out3"), "--no-progress"])
    assert args.func(args) == 1
    assert "1 failed run(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- plots

def _fig():
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _no_overlap(fig, labels) -> bool:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in labels if t.get_visible() and t.get_text()]
    return all(not a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_metric_vs_sparsity_from_records(tmp_path):
    recs = [{"model": "m", "task": "t", "method": meth, "sparsity": s, "metrics": expected_metrics(meth, s)}
            for meth in ("wanda", "sparsegpt") for s in (0.3, 0.5, 0.7)]
    recs.append({"model": "m", "task": "t", "method": "dense", "sparsity": 0.0, "metrics": expected_metrics("x", 0)})
    fig, ax = _fig()
    plots.metric_vs_sparsity(ax, recs, "accuracy", label_map={"wanda": "Wanda"})
    assert ax.get_xlabel() == "sparsity" and ax.get_ylabel() == "accuracy"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["Wanda", "sparsegpt", "dense"]
    wanda = ax.get_lines()[0]
    assert list(wanda.get_xdata()) == [0.0, 0.3, 0.5, 0.7]  # dense point shared at sparsity 0
    assert np.allclose(wanda.get_ydata(), [0.9] + [expected_metrics("wanda", s)["accuracy"] for s in (0.3, 0.5, 0.7)])
    path = plots.save(fig, tmp_path, "acc vs sparsity/m")
    assert path == tmp_path / "figures" / "acc_vs_sparsity_m.png" and path.stat().st_size > 1000
    assert [p.name for p in (tmp_path / "figures").iterdir()] == [path.name]  # no temporary left behind
    fig, ax = _fig()
    plots.metric_vs_sparsity(ax, recs, "loss", methods=["sparsegpt"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sparsegpt", "dense"]
    # a known method keeps its colour whatever else is drawn (first plot: sparsegpt was the second line)
    sgpt_colour = ax.get_lines()[0].get_color()
    fig2, ax2 = _fig()
    plots.metric_vs_sparsity(ax2, recs, "accuracy")
    assert ax2.get_lines()[1].get_color() == sgpt_colour != ax2.get_lines()[0].get_color()
    with pytest.raises(UserError, match="metric 'bleu'.*accuracy"):
        plots.metric_vs_sparsity(ax, recs, "bleu")


def test_bar_by_group_many_blocks_thins_and_rotates_labels(tmp_path):
    names = [f"vision.blocks.{i}" for i in range(40)] + [f"lm.layers.{i}" for i in range(32)]
    groups = ["vision"] * 40 + ["language"] * 32
    vals = np.linspace(0.3, 0.7, len(names))
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = plots.bar_by_group(fig.add_subplot(), names, vals, groups=groups)
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "sparsity"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vision", "language"]
    assert len(ax.patches) == len(names)
    assert ax.patches[0].get_facecolor() != ax.patches[-1].get_facecolor()  # coloured by modality
    ticks = ax.get_xticklabels()
    assert len(ticks) <= plots.MAX_TICK_LABELS and all(t.get_rotation() == 90 for t in ticks)
    assert _no_overlap(fig, ticks)
    assert plots.save(fig, tmp_path, "sparsity_per_block").exists()
    with pytest.raises(UserError, match="one value per name"):
        plots.bar_by_group(ax, names[:3], vals)


def test_hist_and_line_by_group(tmp_path):
    rng = np.random.default_rng(0)
    fig, ax = _fig()
    plots.hist_by_group(ax, {"vision": rng.lognormal(0, 1, 5000), "language": rng.lognormal(1, 0.5, 800)},
                        xlabel="|W|", log=True)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "|W|" and ax.get_ylabel() == "fraction of values"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vision (n=5,000)", "language (n=800)"]
    fractions = [p.get_data().values for p in ax.patches]  # filled + outline stairs per group
    assert len(fractions) == 4 and all(f.sum() == pytest.approx(1.0) for f in fractions)
    assert plots.save(fig, tmp_path, "hist").exists()
    import torch

    fig, ax = _fig()
    plots.line_by_group(ax, np.arange(6), {"zeroth": torch.arange(6.0), "first": np.arange(6) ** 2},
                        xlabel="block", ylabel="score")
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "score" and ax.get_legend() is not None
    assert list(ax.get_lines()[1].get_ydata()) == [0, 1, 4, 9, 16, 25]
    with pytest.raises(UserError, match="one y per x"):
        plots.line_by_group(ax, [1, 2], {"a": [1, 2, 3]}, xlabel="x", ylabel="y")


def test_set_style_sets_readable_colourblind_defaults():
    import matplotlib as mpl

    with mpl.rc_context():
        plots.set_style()
        assert mpl.rcParams["axes.grid"] and mpl.rcParams["figure.constrained_layout.use"]
        assert mpl.rcParams["font.size"] >= 10 and mpl.rcParams["savefig.dpi"] == 150
        assert mpl.rcParams["axes.prop_cycle"].by_key()["color"][:3] == list(plots.OKABE_ITO[:3])


@pytest.mark.parametrize("seeds,message", [([], "parameters.SEEDS is []"),
                                           ([0, "a"], "parameters.SEEDS holds 'a', not an integer"),
                                           ([1, 1], "which repeats a seed")])
def test_a_bad_seed_list_is_refused_before_anything_runs(tmp_path, capsys, seeds, message):
    from ecoflap_utils import cli

    grid = tmp_path / "grid.yaml"
    grid.write_text(f"notebook: {TOY}\nparameters: {{model: toy, SEEDS: {seeds!r}}}\n")
    code = cli.main(["runs", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
