"""Issue 11, as a hostile user tries it: concurrent writers, inputs edited in place,
a failed stage and the way back, and the record a run leaves. Each test runs the
real CLI on tiny-random-llama in a temporary git + DVC workspace.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from pipeline_support import ROOT, decisions, dvc, make_repo, run, workspace_env

pytestmark = pytest.mark.slow


def cli(repo, *args, extra_env=None):
    return run([sys.executable, "-m", "flows.cli", *args], repo, extra_env)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("guard"))
    proc = cli(repo, "run", "--no-prefect", "--name", "guard-first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return repo


def read_json(path):
    return json.loads(path.read_text())


def up_to_date(repo) -> bool:
    return "Data and pipelines are up to date" in dvc(repo, "status")


def test_a_plain_dvc_repro_during_a_run_is_refused_and_the_run_stays_consistent(repo):
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--no-prefect", "--no-save", "--force", "prune"],
                            cwd=repo, env={**os.environ, **workspace_env(repo.parent)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Running stage 'prune'" in line:
            break
    # Prune has started, four stages are to come. DVC refuses the intruder: with its
    # repository lock between our stages, with its per-path lock (outputs and deps of
    # the running stage) while a stage command runs.
    intruder = dvc(repo, "repro", check=False)
    rest = proc.stdout.read()
    assert proc.wait() == 0, "".join(seen) + rest
    assert "Unable to acquire lock" in intruder or "is busy, it is being blocked by" in intruder, intruder
    assert "Running stage" not in intruder and "is cached" not in intruder
    assert up_to_date(repo)  # dvc.lock, params and every output agree
    assert decisions(dvc(repo, "repro")) == {s: "skipped" for s in
                                             ("model", "calibrate", "prune", "convert", "evaluate", "report")}


def test_a_stage_left_running_by_a_killed_pipeline_still_holds_the_workspace(repo):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom stages.workspace_lock import _try_flock, stage_lock_path\n"
                               "h = _try_flock(stage_lock_path(sys.argv[1]), {'pid': 1, 'purpose': 'stage prune'})\n"
                               "print('held', flush=True)\nsys.stdin.read()", str(repo)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        params = (repo / "params.yaml").read_text()
        proc = cli(repo, "run", "--no-prefect", "--set", "prune.sparsity=0.6")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "a stage is still running" in proc.stderr
        assert (repo / "params.yaml").read_text() == params  # its --set was not written
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_tracked_data_file_edited_in_place_stops_the_run_before_any_stage(repo):
    data = "data/c4-train-first1000.jsonl"
    subprocess.run(["git", "rm", "-q", "--cached", data], cwd=repo, check=True)
    dvc(repo, "add", data)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "track the calibration text with DVC"], cwd=repo, check=True,
                   env={**os.environ, **workspace_env(repo.parent)})
    original = (repo / data).read_bytes()
    try:
        (repo / data).write_bytes(original + b'{"text": "an edit nobody recorded"}\n')
        for command in (["run", "--no-prefect"], ["plan"]):
            proc = cli(repo, *command)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert f"{data} was changed in place" in proc.stderr and f"dvc add {data}" in proc.stderr
            assert "Running stage" not in proc.stdout
    finally:
        (repo / data).write_bytes(original)
    assert up_to_date(repo)


def test_a_local_model_folder_changed_in_place_is_imported_again_and_recorded(repo, tmp_path):
    folder = tmp_path / "local-model"
    shutil.copytree(repo / "artifacts" / "model", folder)
    proc = cli(repo, "run", "--no-prefect", "--no-save", "--set", f"model.source={folder}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = read_json(repo / "artifacts" / "model" / "source.json")["sha256"]
    try:
        weights = load_file(folder / "model.safetensors")
        name = next(n for n in weights if n.endswith("mlp.down_proj.weight"))
        weights[name] = weights[name] * 2
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        plan = cli(repo, "plan")
        assert plan.returncode == 0, plan.stderr
        assert "the files of the local model folder" in plan.stdout
        assert plan.stdout.splitlines()[0].startswith("model      run")
        proc = cli(repo, "run", "--no-prefect", "--no-save")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Running stage 'model'" in proc.stdout
        assert read_json(repo / "artifacts" / "model" / "source.json")["sha256"] != first
    finally:  # the module's other tests expect the tiny model back
        cli(repo, "run", "--no-prefect", "--no-save", "--set", "model.source=tiny-random-llama")


def test_a_failed_stage_says_how_to_get_back_and_restore_brings_the_last_good_state(repo):
    cli(repo, "run", "--no-prefect", "--no-save")  # a finished run: the last good state
    good = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock", "metrics/eval.json")}
    report_code = repo / "stages" / "report.py"
    code = report_code.read_text()
    try:
        report_code.write_text(code.replace("def run() -> None:\n", "def run() -> None:\n    raise RuntimeError('disk full')\n"))
        proc = cli(repo, "run", "--no-prefect", "--no-save", "--set", "prune.sparsity=0.6")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "stage 'report' failed" in proc.stderr and "admm-prune restore" in proc.stderr
    finally:
        report_code.write_text(code)
    assert "0.6" in (repo / "params.yaml").read_text()  # the failed run's params stay, like `dvc exp run -S`
    proc = cli(repo, "restore")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {name: (repo / name).read_bytes() for name in good} == good
    assert up_to_date(repo)


def test_the_record_names_the_experiment_the_code_and_the_threads(repo):
    proc = cli(repo, "run", "--no-prefect", "--name", "guard-record", "--force", "report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = read_json(repo / "reports" / "run_meta.json")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert meta["experiment"] == {"name": "guard-record", "baseline": head}
    assert len(meta["code"]["flows"]) == 64
    assert meta["torch_threads"]["prune"] == 1  # OMP_NUM_THREADS=1 in the test workspace
    runs = cli(repo, "runs", "--all-commits")
    assert "guard-record" in runs.stdout and "guard-first" in runs.stdout


def test_set_keeps_nulls_and_says_how_to_go_back_to_the_defaults(repo):
    proc = cli(repo, "run", "--no-prefect", "--no-save", "--set", "evaluate.max_windows=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "params.yaml keeps this run's values" in proc.stdout
    assert "admm-prune run --profile default" in proc.stdout
    text = (repo / "params.yaml").read_text()
    assert "name: null" in text and "mask_file: null" in text
    cli(repo, "run", "--no-prefect", "--no-save", "--set", "evaluate.max_windows=2")
