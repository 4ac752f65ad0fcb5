"""What a pipeline run does to its workspace, independent of Prefect.

One run, in order, all of it under our workspace lock and DVC's repository lock
(flows/dvc_runner.WorkspaceSession), so no other writer gets in between:
1. the params it will use (params.yaml with --profile then --set applied in
   memory), checked in full, and the inputs edited in place (flows/inputs.py);
2. params.yaml written (the workspace keeps the run's params, like `dvc exp run -S`);
3. the stages, one at a time, through DVC;
4. the run saved as a DVC experiment, and its params.yaml and dvc.lock kept as the
   workspace's last good state, which `admm-prune restore` brings back after a
   failed run.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.paths import EVAL_METRICS
from stages.preflight import check_all
from stages.runtime import EXPERIMENT_ENV
from stages.workspace_lock import TOKEN_ENV, WorkspaceLock

from .dvc_runner import STAGES, open_session
from .history import save_run
from .inputs import check_tracked_data, stages_to_force
from .params_edit import apply_overrides, parse_assignment, profile_overrides

LAST_GOOD = Path(".dvc") / "tmp" / "admm-prune-last-good"
KEPT_FILES = ("params.yaml", "dvc.lock")


@dataclass
class Plan:
    params: dict
    changes: list[str]                                  # params.yaml edits, as "key: old -> new"
    forced: dict[str, str] = field(default_factory=dict)  # stage -> why it must rerun


def _assignments(workspace: Path, sets: list[str] | None, profile: str | None) -> list:
    assignments = profile_overrides(profile, workspace) if profile else []
    return assignments + [parse_assignment(s) for s in sets or []]


def planned_params(workspace: Path, sets: list[str] | None, profile: str | None) -> Plan:
    """The params a run would use, checked in full (stages.preflight.check_all: the
    static checks and the preflight against the data, the device and the model's
    config), and the inputs edited in place. Writes nothing; raises ParamError
    naming the key, or InputChanged naming the file."""
    params, changes = apply_overrides(workspace / "params.yaml", _assignments(workspace, sets, profile), write=False)
    with contextlib.chdir(workspace):  # data paths in params are relative to the workspace
        check_all(params)
    check_tracked_data(workspace)
    return Plan(params, changes, stages_to_force(workspace, params))


def experiment_name() -> str:
    return time.strftime("run-%y%m%d-%H%M%S")


def run_pipeline(workspace: Path, sets: list[str] | None, profile: str | None, run_one,
                 force: tuple[str, ...] = (), experiment: str | None = None, log=print,
                 env: dict | None = None) -> dict:
    """The whole run (see the module doc). run_one(stage, workspace, force) runs one
    stage in the open session and returns its StageRun.as_dict(). `experiment` names
    the DVC experiment the run is saved as (None: not saved); env: more environment
    for the stages."""
    with WorkspaceLock(workspace, purpose="admm-prune pipeline") as lock:
        with open_session(workspace, env={**(env or {}), TOKEN_ENV: lock.token, EXPERIMENT_ENV: experiment or ""}):
            plan = planned_params(workspace, sets, profile)
            if plan.changes:
                apply_overrides(workspace / "params.yaml", _assignments(workspace, sets, profile))
            for change in plan.changes:
                log(f"params.yaml: {change}")
            for stage, reason in plan.forced.items():
                log(f"{stage}: forced, {reason}")
            forced = set(force) | set(plan.forced)
            runs = [run_one(stage, str(workspace), stage in forced) for stage in STAGES]
        ran = [r["stage"] for r in runs if not r["cached"]]
        # Every run that changed the workspace (a stage ran or came back from the
        # run-cache) is recorded, so each appears in `admm-prune runs` with its own
        # params and metrics. `dvc exp save` takes DVC's lock itself: after the
        # session, still under ours.
        changed = any(r["outcome"] != "skipped" for r in runs)
        saved = save_run(workspace, experiment) if experiment and changed else None
        keep_good_state(workspace)
    return {"workspace": str(workspace), "params_changes": plan.changes, "stages": runs, "ran": ran,
            "cached": [r["stage"] for r in runs if r["cached"]], "saved": saved, "experiment": experiment}


def keep_good_state(workspace: Path) -> None:
    """params.yaml and dvc.lock of a finished run: with the DVC cache, all it takes to
    bring the workspace back (`admm-prune restore`)."""
    target = workspace / LAST_GOOD
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        if (workspace / name).is_file():
            shutil.copy2(workspace / name, target / name)


def has_good_state(workspace: Path) -> bool:
    return all((workspace / LAST_GOOD / name).is_file() for name in KEPT_FILES)


def restore_good_state(workspace: Path) -> list[str]:
    """Put back the last good run's params.yaml and dvc.lock, then its outputs from the
    DVC cache (`dvc checkout`), under both locks. Returns the files put back."""
    if not has_good_state(workspace):
        raise FileNotFoundError(f"no finished run recorded in {workspace / LAST_GOOD}: nothing to restore")
    with WorkspaceLock(workspace, purpose="admm-prune restore"), open_session(workspace) as session:
        for name in KEPT_FILES:
            shutil.copy2(workspace / LAST_GOOD / name, workspace / name)
        session.repo._reset()
        session.repo.checkout(force=True)
    return list(KEPT_FILES)


def summary_table(workspace: Path) -> list[dict]:
    """Dense vs pruned rows from metrics/eval.json (empty before the first run)."""
    path = workspace / EVAL_METRICS
    if not path.is_file():
        return []
    ev = json.loads(path.read_text())
    return [{"metric": "WikiText-2 perplexity", "dense": ev.get("dense_wikitext2_ppl"), "pruned": ev["wikitext2_ppl"]},
            {"metric": "C4 perplexity", "dense": ev.get("dense_c4_ppl"), "pruned": ev["c4_ppl"]},
            {"metric": "sparsity (pruned linears)", "dense": 0.0, "pruned": ev["sparsity"]}]
