"""The Prefect side: the pipeline flow over the DVC stages, retries, artifacts, the
sweep on a local Dask cluster, the scheduled deployment, and the CLI around them.

Prefect gets its own PREFECT_HOME (set before prefect is imported) and a temporary
local API server; tiny-random-llama in a temporary git + DVC repo does the work.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

from pipeline_support import dvc, make_repo, workspace_env  # noqa: E402

STAGES = ["model", "calibrate", "prune", "convert", "evaluate", "report"]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """A temporary Prefect API server and database for this module, stopped at its end
    (rather than at interpreter exit, after pytest has closed the output streams)."""
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=None):  # None: the 120 s set above
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flows")
    with pytest.MonkeyPatch.context() as patch:
        # The flow runs DVC in subprocesses that inherit this environment.
        for key, value in workspace_env(tmp).items():
            patch.setenv(key, value)
        yield make_repo(tmp)


def task_logs(flow_run_id=None, task_names=None) -> dict[str, str]:
    """Prefect's stored log text per task run name (the flow's own records under
    "flow"), for one flow run or for the named task runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId,
                                                LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName)
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        if flow_run_id:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        else:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=task_names)))
            log_filter = LogFilter(task_run_id=LogFilterTaskRunId(any_=[r.id for r in runs]))
        names = {r.id: r.name for r in runs}
        logs = []
        while batch := client.read_logs(log_filter, offset=len(logs), limit=200):
            logs += batch
    out: dict[str, list[str]] = {}
    for log in logs:
        out.setdefault(names.get(log.task_run_id, "flow"), []).append(log.message)
    return {name: "\n".join(messages) for name, messages in out.items()}


@pytest.mark.slow
def test_pipeline_flow_runs_the_dag_and_reports_which_stages_were_cached(repo):
    """Also: each stage's own output lands in its task's log (red if only the summary
    line does), and the report artifact carries its plots inline (red if it keeps
    the relative image paths Prefect's UI cannot load)."""
    from flows.pipeline import pipeline_flow

    state = pipeline_flow(str(repo), return_state=True)
    first = state.result()
    assert first["ran"] == STAGES and first["cached"] == []
    logs = task_logs(state.state_details.flow_run_id)
    assert "[evaluate] wikitext2 ppl" in logs["evaluate"] and "stage evaluate: ran" in logs["evaluate"]
    assert "[prune] pruned in" in logs["prune"] and "prune: 100%" in logs["prune"]
    assert "[evaluate]" not in logs["prune"] and "git add" not in logs["prune"]

    second = pipeline_flow(str(repo), sets=["evaluate.max_windows=1"])
    assert second["params_changes"] == ["evaluate.max_windows: 2 -> 1"]
    assert second["ran"] == ["evaluate", "report"]
    assert second["cached"] == ["model", "calibrate", "prune", "convert"]
    assert {r["stage"]: r["outcome"] for r in second["stages"]}["prune"] == "skipped"

    state = pipeline_flow(str(repo), sets=["evaluate.max_windows=2"], return_state=True)  # back: DVC restores
    third = state.result()
    assert third["ran"] == []
    assert {r["stage"]: r["outcome"] for r in third["stages"]}["evaluate"] == "restored"
    assert "Stage 'evaluate' is cached - skipping run, checking out outputs" in \
        task_logs(state.state_details.flow_run_id)["evaluate"]

    from prefect.artifacts import Artifact
    metrics = Artifact.get("admm-prune-metrics")
    assert metrics is not None and "WikiText-2 perplexity" in str(metrics.data)
    report = Artifact.get("admm-prune-report")
    assert report is not None and "| WikiText-2 perplexity |" in str(report.data)
    assert "![layer_error.png](data:image/png;base64," in str(report.data) and "](plots/" not in str(report.data)


@pytest.mark.slow
def test_a_failed_stage_is_retried(repo, monkeypatch):
    import flows.pipeline as pipeline
    from flows.dvc_runner import StageFailed, WorkspaceSession

    attempts = []
    real = WorkspaceSession.repro

    def flaky(session, stage, force=False):
        attempts.append(stage)
        if stage == "convert" and attempts.count("convert") == 1:
            raise StageFailed("convert", 1, "simulated crash")
        return real(session, stage, force)

    monkeypatch.setattr(WorkspaceSession, "repro", flaky)
    result = pipeline.pipeline_flow(str(repo), retries=1)
    assert attempts.count("convert") == 2
    assert [r["stage"] for r in result["stages"]] == STAGES

    def broken(session, stage, force=False):
        attempts.append(stage)
        raise StageFailed(stage, 1, "simulated crash")

    attempts.clear()
    monkeypatch.setattr(WorkspaceSession, "repro", broken)
    with pytest.raises(StageFailed):
        pipeline.pipeline_flow(str(repo), retries=0)
    assert attempts == ["model"]  # no retry asked for, and nothing after the failed stage


@pytest.mark.slow
def test_sweep_runs_each_combination_in_its_own_workspace_on_dask(repo, capsys):
    """Also what a reader gets: the table columns, the perplexity-vs-sparsity PNG on
    disk and as an artifact, and each run's progress (started, every stage, finished)
    in its task log."""
    from flows.cli import main
    from flows.sweep import run_sweep
    from flows.sweep_report import COLUMNS

    dvc(repo, "repro")  # the main workspace has run once (a no-op after the tests above)
    rows = run_sweep(str(repo), sparsities=[0.3, 0.6], workers=2)
    assert sorted(r["achieved_sparsity"] for r in rows) == pytest.approx([0.3, 0.6], abs=1e-3)
    for r in rows:
        assert list(r) == list(COLUMNS)
        assert (r["model"], r["method"], r["pattern"], r["status"]) == ("tiny-random-llama", "admm-grad",
                                                                         "unstructured", "finished")
        assert r["experiment"] == r["run"] and r["dense_wikitext2_ppl"] > 1 and r["pruned_wikitext2_ppl"] > 1, r
        assert "model" not in r["stages_run"]  # restored from the shared run-cache, not recomputed

    (out_dir,) = (repo / "sweeps").iterdir()
    assert (out_dir / "ppl-vs-sparsity-tiny-random-llama.png").stat().st_size > 1000
    assert (out_dir / "results.csv").read_text().startswith(",".join(COLUMNS))

    from prefect.artifacts import Artifact
    assert len(Artifact.get("admm-prune-sweep").data) > 0
    assert "![ppl-vs-sparsity-tiny-random-llama](data:image/png;base64," in \
        str(Artifact.get("admm-prune-sweep-plots").data)

    logs = task_logs(task_names=[r["run"] for r in rows])
    for r in rows:
        log = logs[r["run"]]
        assert "started: " in log and "finished in" in log
        assert all(f"stage {stage}:" in log for stage in STAGES), log
        assert "[evaluate] wikitext2 ppl" in log

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    names = {exp["revs"][0]["name"] for base in shown for exp in base.get("experiments") or []}
    assert {r["run"] for r in rows} <= names

    capsys.readouterr()
    assert main(["-C", str(repo), "runs"]) == 0
    table = capsys.readouterr().out
    assert all(r["run"] in table for r in rows) and "wikitext2_ppl" in table


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Logger .admm_prune.stage_output. attempted")
def test_a_failed_sweep_run_logs_its_stage_and_becomes_a_failed_row(repo, monkeypatch):
    """Red if a failing run's log does not name the stage, or a failure is not
    turned into a 'failed' outcome for the table."""
    import flows.sweep as sweep
    from flows.dvc_runner import StageFailed, repro_stage
    from flows.sweep_report import table_row
    from stages.params import load_params

    def broken_prune(workspace, stage, **kwargs):
        if stage == "prune":
            raise StageFailed("prune", 1, "simulated crash")
        return repro_stage(workspace, stage, **kwargs)

    class Recorder:
        def __init__(self):
            self.lines = []
        info = error = lambda self, msg, *args: self.lines.append(msg % args)

    log = Recorder()
    monkeypatch.setattr(sweep, "repro_stage", broken_prune)
    with pytest.raises(StageFailed):
        sweep.run_combination(repo, (repo / "params.yaml").read_text(), ["prune.sparsity=0.4"], "sweep-x", 1, log)
    assert log.lines[0] == "started: prune.sparsity=0.4"
    assert any(line.startswith("stage calibrate: ") for line in log.lines)  # the stages before prune ran
    assert log.lines[-1].startswith("failed at stage prune after")
    assert "stage 'prune' failed (exit 1)" in log.lines[-1]

    class Failed:
        def result(self):
            raise StageFailed("prune", 1, "simulated crash")

    row = table_row("sweep-x", load_params(repo / "params.yaml"), sweep._outcome(Failed()))
    assert row["status"] == "failed" and row["pruned_wikitext2_ppl"] is None


def test_deployment_runs_the_pipeline_on_a_cron_schedule(repo):
    from flows.deploy import build_deployment

    deployment = build_deployment(str(repo), cron="0 4 * * 1", sets=["model.source=tiny-random-llama"],
                                  profile="tiny")
    assert deployment.parameters["profile"] == "tiny"  # red if serve's --profile is dropped
    assert [s.schedule.cron for s in deployment.schedules] == ["0 4 * * 1"]
    assert deployment.parameters["workspace"] == str(repo.resolve())
    assert deployment.parameters["sets"] == ["model.source=tiny-random-llama"]
    assert deployment.parameters["isolated"] is True  # scheduled runs never edit the workspace
    assert deployment.entrypoint.endswith("flows/pipeline.py:pipeline_flow")


@pytest.mark.slow
def test_a_deployment_run_is_saved_and_leaves_the_workspace_alone(repo):
    """What `prefect deployment run` does: the flow with isolated=True. Red if it
    writes the user's params.yaml or outputs, or is missing from `admm-prune runs`."""
    from flows.history import past_runs
    from flows.pipeline import pipeline_flow

    dvc(repo, "repro")
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock", "metrics/eval.json")}
    result = pipeline_flow(str(repo), sets=["prune.sparsity=0.4"], isolated=True, experiment="scheduled-x")
    assert "prune" in result["ran"] and result["saved"]
    assert {name: (repo / name).read_bytes() for name in before} == before
    rows = {row["run"].strip(): row for row in past_runs(repo)}
    assert rows["scheduled-x"]["prune.sparsity"] == 0.4
    assert rows["scheduled-x"]["wikitext2_ppl"] == result["table"][0]["pruned"]
    assert rows["workspace"]["prune.sparsity"] == 0.5


def test_cli_plan_names_the_stages_that_would_run_and_why(repo, capsys):
    from flows.cli import main

    dvc(repo, "repro")  # a workspace with dvc.lock, whatever ran before
    params = (repo / "params.yaml").read_text()
    assert main(["-C", str(repo), "plan", "--set", "prune.sparsity=0.6"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith((" ", "(", "with"))}
    assert lines["model"].startswith("model      skip") and lines["calibrate"].startswith("calibrate  skip")
    assert lines["prune"].startswith("prune      run")
    assert "param prune.sparsity: 0.5 -> 0.6" in out
    assert "downstream of prune" in out
    assert (repo / "params.yaml").read_text() == params  # plan changes nothing
