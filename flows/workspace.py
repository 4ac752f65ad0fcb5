"""What a pipeline run does to its workspace, independent of Prefect: write the
overrides into params.yaml, check every param, run the stages in order."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from stages.params import check_all

from .dvc_runner import STAGES
from .params_edit import apply_overrides, parse_assignment, profile_overrides


def prepare_params(workspace: Path, sets: list[str] | None, profile: str | None) -> list[str]:
    """Write --profile then --set values into params.yaml; check every param.
    Raises ParamError (naming the key) before any stage runs."""
    assignments = profile_overrides(profile, workspace) if profile else []
    assignments += [parse_assignment(s) for s in sets or []]
    # Check the result first, so a bad value never reaches params.yaml.
    params, changes = apply_overrides(workspace / "params.yaml", assignments, write=False)
    with contextlib.chdir(workspace):  # data paths in params are relative to the workspace
        check_all(params)
    if changes:
        apply_overrides(workspace / "params.yaml", assignments)
    return changes


def run_stages(workspace: Path, token: str, run_one, force: tuple[str, ...] = ()) -> list[dict]:
    """run_one(stage, workspace, token, force) for every stage, in dependency order."""
    return [run_one(stage, str(workspace), token, stage in force) for stage in STAGES]


def summary_table(workspace: Path) -> list[dict]:
    """Dense vs pruned rows from metrics/eval.json (empty before the first run)."""
    path = workspace / "metrics" / "eval.json"
    if not path.is_file():
        return []
    ev = json.loads(path.read_text())
    return [{"metric": "WikiText-2 perplexity", "dense": ev.get("dense_wikitext2_ppl"), "pruned": ev["wikitext2_ppl"]},
            {"metric": "C4 perplexity", "dense": ev.get("dense_c4_ppl"), "pruned": ev["c4_ppl"]},
            {"metric": "sparsity (pruned linears)", "dense": 0.0, "pruned": ev["sparsity"]}]
