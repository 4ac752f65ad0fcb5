"""A scheduled deployment of the pipeline flow, for teams that re-run it when a new
model appears.

`admm-prune serve --cron "0 3 * * *" --set model.source=<new model>` serves a
deployment that runs the pipeline on that schedule with those overrides. Every
scheduled run is isolated: it runs in a private worktree (flows/experiment.py)
that shares the workspace's DVC cache, is saved as a DVC experiment (so it shows
in `admm-prune runs`), and never edits the user's params.yaml or outputs. Because
DVC decides what reruns, a scheduled run on an unchanged model and unchanged
params does no work and costs seconds; pointing `model.source` at a new model
(here, or in the deployment's parameters in the Prefect UI) reruns everything
downstream of the import. Local model directories are not DVC deps (their path is
a param): give a new model a new directory, or force the import with
`--force model`.
"""
from __future__ import annotations

from . import prefect_env  # noqa: F401  (settings before prefect is imported)

from pathlib import Path

from .pipeline import pipeline_flow


def build_deployment(workspace: str = ".", cron: str = "0 3 * * *", sets: list[str] | None = None,
                     name: str = "admm-prune-scheduled", force: list[str] | None = None,
                     profile: str | None = None):
    """A RunnerDeployment of the pipeline flow with a cron schedule (not yet served)."""
    return pipeline_flow.to_deployment(
        name=name, cron=cron,
        parameters={"workspace": str(Path(workspace).resolve()), "sets": list(sets or []), "isolated": True,
                    "force": list(force or []), "profile": profile},
        description="Re-run the ADMM pruning pipeline; DVC reruns only what changed.",
        tags=["admm-prune"])


def serve(workspace: str = ".", cron: str = "0 3 * * *", sets: list[str] | None = None,
          name: str = "admm-prune-scheduled", force: list[str] | None = None, profile: str | None = None) -> None:
    """Serve the deployment in this process until interrupted (needs a Prefect API
    that outlives it: `prefect server start`, then PREFECT_API_URL)."""
    from prefect import serve as prefect_serve
    prefect_serve(build_deployment(workspace, cron, sets, name, force, profile))
