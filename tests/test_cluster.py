"""``runs --executor slurm`` (cluster.py) through submitit's local cluster: real job processes, with the same
submission, pickles, result files and logs as on Slurm. The notebook is tests/fixtures/toy_results.ipynb (stdlib
only; FAIL=True raises, SLEEP waits, COUNTER_FILE counts executions). What would reach ``sbatch`` is read from
the sbatch file submitit itself writes."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from ecoflap_utils import cli, cluster, runs
from ecoflap_utils.errors import UserError

TOY = Path(__file__).parent / "fixtures" / "toy_results.ipynb"
LOCAL = cluster.SlurmOptions(cluster="local", gpus=0, cpus=1, time="00:10:00", array_parallelism=2)


def toy_grid(path: Path, counter: Path, *, broken: bool = True, sleep: float = 0.0) -> Path:
    text = f"""
runs:
  - notebook: {TOY}
    parameters: {{model: toy, task: cls, COUNTER_FILE: "{counter}", SLEEP: {sleep}}}
    grid: {{method: [wanda, magnitude], sparsity: [0.3]}}
    slurm: {{time: "00:05:00"}}
"""
    if broken:
        text += f"""  - notebook: {TOY}
    name: "{{notebook}}/broken"
    parameters: {{model: toy, task: cls, FAIL: true, COUNTER_FILE: "{counter}"}}
"""
    path.write_text(text)
    return path


def executions(counter: Path) -> list[str]:
    return [ln.split("\t")[0] for ln in counter.read_text().splitlines()] if counter.exists() else []


@pytest.fixture(scope="module")
def slurm_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    counter = root / "counter.txt"
    grid = toy_grid(root / "grid.yaml", counter)
    result = runs.run_grid(grid, root / "out", progress=False, executor="slurm", slurm=LOCAL)
    return root, grid, counter, result


def test_each_run_is_a_job_with_its_logs_next_to_it(slurm_batch):
    root, _, counter, result = slurm_batch
    assert {r.name: r.status for r in result.runs} == {
        "toy_results/method=wanda,sparsity=0.3": "done", "toy_results/method=magnitude,sparsity=0.3": "done",
        "toy_results/broken": "failed"}
    assert sorted(executions(counter)) == ["broken", "method=magnitude,sparsity=0.3", "method=wanda,sparsity=0.3"]
    ids = set()
    for r in result.runs:
        rec = cluster.read_job(r.run_dir)
        assert rec is not None and rec.cluster == "local"
        ids.add(rec.job_id)
        logs = r.run_dir / cluster.LOG_LINK
        assert logs.is_symlink() and logs.resolve() == (root / "out" / ".slurm" / rec.job_id).resolve()
        assert (logs / f"{rec.job_id}_0_log.out").is_file()  # submitit's own log of that job
        assert (logs / f"{rec.job_id}_submitted.pkl").is_file()
    assert len(ids) == 3  # one job per run
    # each job ran in its own process, and the runs kept their folders' rules
    done = [r for r in result.runs if r.status == "done"]
    assert all(runs.is_complete(r.run_dir) for r in done)
    assert not runs.is_complete(root / "out" / "toy_results" / "broken")


def test_failing_entry_is_listed_with_its_error(slurm_batch, capsys):
    _, _, _, result = slurm_batch
    [failed] = result.failed
    assert failed.name == "toy_results/broken"
    assert failed.error == "RuntimeError: told to fail (FAIL=True, method=wanda)"
    assert "toy_results/broken: RuntimeError: told to fail" in runs.report_text(result)


def test_summary_is_written_and_a_rerun_skips_complete_runs(slurm_batch):
    root, grid, counter, result = slurm_batch
    import pandas as pd

    assert (root / "out" / "results.md").is_file()
    table = pd.read_csv(root / "out" / "results.csv").set_index("method")["accuracy"].to_dict()
    assert table == {"wanda": 0.81, "magnitude": 0.72}  # 0.9 - f * 0.3**2 of the toy notebook
    before = executions(counter)
    again = runs.run_grid(grid, root / "out", progress=False, executor="slurm", slurm=LOCAL, summary=False)
    assert sorted(again.skipped) == ["toy_results/method=magnitude,sparsity=0.3", "toy_results/method=wanda,sparsity=0.3"]
    assert executions(counter) == before + ["broken"]  # only the failed run was submitted again


def test_no_wait_then_collect_gives_the_same_summary(slurm_batch, tmp_path):
    root, _, _, _ = slurm_batch
    counter = tmp_path / "counter.txt"
    grid = toy_grid(tmp_path / "grid.yaml", counter, broken=False, sleep=2.0)
    submitted = runs.run_grid(grid, tmp_path / "out", progress=False, executor="slurm", slurm=LOCAL, wait=False)
    assert [r.status for r in submitted.runs] == ["pending", "pending"]
    deadline = time.time() + 120
    while True:
        collected = runs.run_grid(grid, tmp_path / "out", progress=False, collect=True)
        if not collected.pending or time.time() > deadline:
            break
        assert {r.status for r in collected.runs} <= {"pending", "skipped"}
        time.sleep(1.0)
    assert collected.ok and not collected.pending, runs.report_text(collected)
    # the broken run of the waited batch has no record, so its tables are those of the same two runs
    assert (tmp_path / "out" / "results.md").read_text() == (root / "out" / "results.md").read_text()
    assert sorted(executions(counter)) == ["method=magnitude,sparsity=0.3", "method=wanda,sparsity=0.3"]


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def test_a_killed_job_reads_failed_and_is_run_again(tmp_path):
    counter = tmp_path / "counter.txt"
    grid = toy_grid(tmp_path / "grid.yaml", counter, broken=False, sleep=60.0)
    grid.write_text(grid.read_text().replace("[wanda, magnitude]", "[wanda]"))
    runs.run_grid(grid, tmp_path / "out", progress=False, executor="slurm", slurm=LOCAL, wait=False,
                  summary=False)
    run_dir = tmp_path / "out" / "toy_results" / "method=wanda,sparsity=0.3"
    deadline = time.time() + 60
    while not executions(counter) and time.time() < deadline:  # the notebook has started (and sleeps)
        time.sleep(0.2)
    assert executions(counter) == ["method=wanda,sparsity=0.3"]
    rec = cluster.read_job(run_dir)
    _kill_tree(int(rec.job_id))  # what Slurm does at a time limit, without the grace signal

    collected = runs.run_grid(grid, tmp_path / "out", progress=False, collect=True, summary=False)
    [failed] = collected.failed
    assert f"job {rec.job_id} ended without finishing the run (its process was killed" in failed.error
    assert (run_dir / "error.txt").read_text().startswith(f"job {rec.job_id} ended without finishing")
    assert not runs.is_complete(run_dir) and runs.collect_results(tmp_path / "out").empty

    fast = grid.read_text().replace("SLEEP: 60.0", "SLEEP: 0.0")
    grid.write_text(fast)
    again = runs.run_grid(grid, tmp_path / "out", progress=False, executor="slurm", slurm=LOCAL, summary=False)
    assert [r.status for r in again.runs] == ["done"] and runs.is_complete(run_dir)
    assert cluster.read_job(run_dir).job_id != rec.job_id
    assert not (run_dir / "error.txt").exists()  # the stale attempt's files were cleared first


def test_a_live_job_is_never_submitted_twice(tmp_path):
    counter = tmp_path / "counter.txt"
    grid = toy_grid(tmp_path / "grid.yaml", counter, broken=False, sleep=3.0)
    grid.write_text(grid.read_text().replace("[wanda, magnitude]", "[wanda]"))
    first = runs.run_grid(grid, tmp_path / "out", progress=False, executor="slurm", slurm=LOCAL, wait=False,
                          summary=False)
    job = first.runs[0].error
    second = runs.run_grid(grid, tmp_path / "out", progress=False, executor="slurm", slurm=LOCAL, summary=False)
    assert [r.status for r in second.runs] == ["done"]
    assert executions(counter) == ["method=wanda,sparsity=0.3"]
    assert f"job {cluster.read_job(second.runs[0].run_dir).job_id}" == job


# ---------------------------------------------------------------------------------------- what sbatch gets

@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit's Slurm executor refuses to start where ``srun`` is not on the PATH; nothing is submitted here,
    so an ``srun`` that is never called is enough to read the sbatch file it would write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_an_entrys_own_resources_reach_sbatch(tmp_path, srun_on_path):
    grid = {"runs": [{"notebook": str(TOY), "parameters": {"model": "m"}, "grid": {"method": ["wanda"]},
                      "slurm": {"gpus": 2, "time": "1-02:30:00", "mem_gb": 80, "extra": {"qos": "high"}}},
                     {"notebook": str(TOY), "name": "{notebook}/clip", "parameters": {"model": "clip"}}]}
    base = cluster.slurm_options("cli", partition="gpu", cpus=10, time="04:00:00", array_parallelism=3,
                                 extra=["account=lab", "qos=low"])
    blip, clip = runs.expand_grid(grid)
    text = cluster.sbatch_text(cluster.entry_options(base, blip.slurm, blip.name), tmp_path / "%j", array=5)
    flags = {ln for ln in text.splitlines() if ln.startswith("#SBATCH")}
    assert {"#SBATCH --gpus-per-node=2", "#SBATCH --time=1590", "#SBATCH --mem=80GB", "#SBATCH --partition=gpu",
            "#SBATCH --cpus-per-task=10", "#SBATCH --qos=high", "#SBATCH --account=lab",
            "#SBATCH --array=0-4%3", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"} <= flags
    own = cluster.sbatch_text(cluster.entry_options(base, clip.slurm, clip.name), tmp_path / "%j")
    flags = {ln for ln in own.splitlines() if ln.startswith("#SBATCH")}
    assert {"#SBATCH --gpus-per-node=1", "#SBATCH --time=240", "#SBATCH --qos=low"} <= flags
    assert not any(f.startswith("#SBATCH --mem=") or f.startswith("#SBATCH --array") for f in flags)


@pytest.mark.parametrize("text,minutes", [("30", 30), ("90:30", 91), ("04:00:00", 240), ("2-0", 2880),
                                          ("1-02:30", 1590), ("0-00:00:59", 1), (15, 15)])
def test_time_limits_in_sbatch_forms(text, minutes):
    assert cluster.parse_time(text) == minutes


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,message", [
    (["--executor", "pbs"], "unknown executor 'pbs'"),
    (["--partition", "gpu"], "--partition applies to --executor slurm only"),
    (["--executor", "slurm", "--gpus", "-1"], "gpus must be >= 0"),
    (["--executor", "slurm", "--time", "4h"], "time limit '4h' does not parse"),
    (["--executor", "slurm", "--slurm-extra", "qos"], "is not KEY=VALUE"),
])
def test_bad_options_are_one_line_and_submit_nothing(tmp_path, capsys, extra, message):
    grid = toy_grid(tmp_path / "grid.yaml", tmp_path / "counter.txt")
    code = cli.main(["runs", str(grid), "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_grid_entrys_bad_resources_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"runs\[0\]\.slurm: gpus must be >= 0"):
        runs.expand_grid({"runs": [{"notebook": str(TOY), "slurm": {"gpus": -2}}]})
    with pytest.raises(UserError, match=r"unknown key\(s\) nodes"):
        runs.expand_grid({"runs": [{"notebook": str(TOY), "slurm": {"nodes": 2}}]})
