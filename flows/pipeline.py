"""The pipeline flow: one Prefect task per DVC stage, run in dependency order.

Each task reproduces one stage through DVC (flows/dvc_runner.WorkspaceSession), so
DVC alone decides whether the stage is skipped, restored from its run-cache or run (Prefect's own caching is off:
its input hashing is unstable for our artifacts and it cannot see a deleted output).
A failed stage is retried; the flow logs which stages ran and which came from the
cache, and publishes the metrics table and the Markdown report (its plots embedded)
as Prefect artifacts. Each stage's own output goes to its task's log.
The whole run holds the workspace lock and DVC's repository lock, so a second
pipeline or a plain `dvc repro` is refused instead of interleaving with ours
(flows/workspace.py). A deployment (scheduled) run is `isolated`: it runs in a
private workspace (flows/experiment.py) and never edits the user's.
"""
from __future__ import annotations

from . import prefect_env  # noqa: F401  (settings before prefect is imported)

import logging
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler

from stages.paths import REPORT_DIR, REPORT_MD

from .artifacts import publish_markdown_file
from .dvc_runner import StageRun, active_session, readable_output
from .experiment import experiment_workspace, work_env
from .workspace import experiment_name, run_pipeline, summary_table


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=3,
      task_run_name="{stage}")
def stage_task(stage: str, workspace: str, force: bool = False) -> dict:
    run = active_session(workspace).repro(stage, force=force)
    log_stage_output(get_run_logger(), run)
    return run.as_dict()


def log_stage_output(logger, run: StageRun) -> None:
    """The stage's own output (DVC's decision, the stage's perplexities, timings and
    what it reused or restored, progress bars in their final state) in the task's
    log, then the one-line summary on `logger` (the run logger: console and API)."""
    lines = readable_output(run.output)
    if lines:
        api_only_logger().info("output of stage %s:\n%s", run.stage, "\n".join(lines))
    logger.info("stage %s: %s (%.1f s)", run.stage, describe(run), run.seconds)


def api_only_logger() -> logging.Logger:
    """A logger whose records reach the Prefect API (the current task's log in the UI)
    but not the console: the console already showed the stage's output live."""
    logger = logging.getLogger("admm_prune.stage_output")
    if not logger.handlers:
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def describe(run: StageRun) -> str:
    return {"ran": "ran", "skipped": "cached (unchanged, skipped)",
            "restored": "cached (restored from the DVC run-cache)"}[run.outcome]


def publish(workspace: Path, runs: list[dict]) -> None:
    table = summary_table(workspace)
    if table:
        create_table_artifact(key="admm-prune-metrics", table=table,
                              description=f"dense vs pruned ({workspace})")
    report = workspace / REPORT_DIR / REPORT_MD
    if report.is_file():
        publish_markdown_file("admm-prune-report", report, description=f"pipeline report ({workspace})")
    create_table_artifact(key="admm-prune-stages", table=runs, description="what DVC did with each stage")


@flow(name="admm-prune-pipeline", log_prints=True)
def pipeline_flow(workspace: str = ".", sets: list[str] | None = None, profile: str | None = None,
                  retries: int = 1, force: list[str] | None = None, experiment: str | None = None,
                  isolated: bool = False) -> dict:
    """Run the DVC pipeline in `workspace`, stage by stage. `sets` are key=value
    overrides written into params.yaml first (like `dvc exp run -S`); `experiment`
    names the DVC experiment the run is saved as (None: not saved). isolated: run in
    a private copy of the workspace and always save it (deployments, schedules)."""
    logger = get_run_logger()
    ws = Path(workspace).resolve()
    one = stage_task.with_options(retries=retries)
    if not isolated:
        result = run_pipeline(ws, sets, profile, one, tuple(force or ()), experiment, log=logger.info)
        return _finish(logger, ws, result)
    with experiment_workspace(ws) as private:
        result = run_pipeline(private, sets, profile, one, tuple(force or ()), experiment or experiment_name(),
                              log=logger.info, env=work_env(ws))
        return _finish(logger, private, result)


def _finish(logger, ws: Path, result: dict) -> dict:
    logger.info("stages that ran: %s; from cache: %s", ", ".join(result["ran"]) or "none",
                ", ".join(result["cached"]) or "none")
    if result["saved"]:
        logger.info(result["saved"])
    publish(ws, result["stages"])
    return {**result, "table": summary_table(ws)}
