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


@pytest.mark.slow
def test_pipeline_flow_runs_the_dag_and_reports_which_stages_were_cached(repo):
    from flows.pipeline import pipeline_flow

    first = pipeline_flow(str(repo))
    assert first["ran"] == STAGES and first["cached"] == []

    second = pipeline_flow(str(repo), sets=["evaluate.max_windows=1"])
    assert second["params_changes"] == ["evaluate.max_windows: 2 -> 1"]
    assert second["ran"] == ["evaluate", "report"]
    assert second["cached"] == ["model", "calibrate", "prune", "convert"]
    assert {r["stage"]: r["outcome"] for r in second["stages"]}["prune"] == "skipped"

    third = pipeline_flow(str(repo), sets=["evaluate.max_windows=2"])  # back: DVC restores, nothing runs
    assert third["ran"] == []
    assert {r["stage"]: r["outcome"] for r in third["stages"]}["evaluate"] == "restored"

    from prefect.artifacts import Artifact
    metrics = Artifact.get("admm-prune-metrics")
    assert metrics is not None and "WikiText-2 perplexity" in str(metrics.data)
    report = Artifact.get("admm-prune-report")
    assert report is not None and "| WikiText-2 perplexity |" in str(report.data)


@pytest.mark.slow
def test_a_failed_stage_is_retried(repo, monkeypatch):
    import flows.pipeline as pipeline
    from flows.dvc_runner import StageFailed, repro_stage

    attempts = []

    def flaky(workspace, stage, **kwargs):
        attempts.append(stage)
        if stage == "convert" and attempts.count("convert") == 1:
            raise StageFailed("convert", 1, "simulated crash")
        return repro_stage(workspace, stage, **kwargs)

    monkeypatch.setattr(pipeline, "repro_stage", flaky)
    result = pipeline.pipeline_flow(str(repo), retries=1)
    assert attempts.count("convert") == 2
    assert [r["stage"] for r in result["stages"]] == STAGES

    def broken(workspace, stage, **kwargs):
        attempts.append(stage)
        raise StageFailed(stage, 1, "simulated crash")

    attempts.clear()
    monkeypatch.setattr(pipeline, "repro_stage", broken)
    with pytest.raises(StageFailed):
        pipeline.pipeline_flow(str(repo), retries=0)
    assert attempts == ["model"]  # no retry asked for, and nothing after the failed stage


@pytest.mark.slow
def test_sweep_runs_each_combination_in_its_own_workspace_on_dask(repo, capsys):
    from flows.cli import main
    from flows.sweep import run_sweep

    dvc(repo, "repro")  # the main workspace has run once (a no-op after the tests above)
    results = run_sweep(str(repo), sparsities=[0.3, 0.6], workers=2)
    assert sorted(r["sparsity"] for r in results) == pytest.approx([0.3, 0.6], abs=1e-3)
    for r in results:
        assert r["experiment"], r
        assert "model" not in r["ran"]  # restored from the shared run-cache, not recomputed

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    names = {exp["revs"][0]["name"] for base in shown for exp in base.get("experiments") or []}
    assert {r["name"] for r in results} <= names

    capsys.readouterr()
    assert main(["-C", str(repo), "runs"]) == 0
    table = capsys.readouterr().out
    assert all(r["name"] in table for r in results) and "wikitext2_ppl" in table


def test_deployment_runs_the_pipeline_on_a_cron_schedule(repo):
    from flows.deploy import build_deployment

    deployment = build_deployment(str(repo), cron="0 4 * * 1", sets=["model.source=tiny-random-llama"])
    assert [s.schedule.cron for s in deployment.schedules] == ["0 4 * * 1"]
    assert deployment.parameters["workspace"] == str(repo.resolve())
    assert deployment.parameters["sets"] == ["model.source=tiny-random-llama"]
    assert deployment.entrypoint.endswith("flows/pipeline.py:pipeline_flow")


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
