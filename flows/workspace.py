"""What a pipeline run does to its workspace, independent of Prefect: write the
overrides into params.yaml, check every param, run the stages in order."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from stages.preflight import check_all
from stages.paths import EVAL_METRICS

from .dvc_runner import STAGES
from .params_edit import apply_overrides, parse_assignment, profile_overrides


def _assignments(workspace: Path, sets: list[str] | None, profile: str | None) -> list:
    assignments = profile_overrides(profile, workspace) if profile else []
    return assignments + [parse_assignment(s) for s in sets or []]


def preflight(workspace: Path, sets: list[str] | None, profile: str | None) -> tuple[dict, list[str]]:
    """The params a run would use (params.yaml with --profile then --set applied in
    memory), checked in full: stages.preflight.check_all, i.e. the static checks and the
    preflight against the data, the device and the model's config. Writes nothing;
    raises ParamError naming the key. Returns (params, changes)."""
    params, changes = apply_overrides(workspace / "params.yaml", _assignments(workspace, sets, profile), write=False)
    with contextlib.chdir(workspace):  # data paths in params are relative to the workspace
        check_all(params)
    return params, changes


def prepare_params(workspace: Path, sets: list[str] | None, profile: str | None) -> list[str]:
    """Write --profile then --set values into params.yaml once they pass the preflight,
    so a bad value never reaches params.yaml. Raises ParamError (naming the key)."""
    _, changes = preflight(workspace, sets, profile)
    if changes:
        apply_overrides(workspace / "params.yaml", _assignments(workspace, sets, profile))
    return changes


def run_stages(workspace: Path, token: str, run_one, force: tuple[str, ...] = ()) -> list[dict]:
    """run_one(stage, workspace, token, force) for every stage, in dependency order."""
    return [run_one(stage, str(workspace), token, stage in force) for stage in STAGES]


def summary_table(workspace: Path) -> list[dict]:
    """Dense vs pruned rows from metrics/eval.json (empty before the first run)."""
    path = workspace / EVAL_METRICS
    if not path.is_file():
        return []
    ev = json.loads(path.read_text())
    return [{"metric": "WikiText-2 perplexity", "dense": ev.get("dense_wikitext2_ppl"), "pruned": ev["wikitext2_ppl"]},
            {"metric": "C4 perplexity", "dense": ev.get("dense_c4_ppl"), "pruned": ev["c4_ppl"]},
            {"metric": "sparsity (pruned linears)", "dense": 0.0, "pruned": ev["sparsity"]}]
