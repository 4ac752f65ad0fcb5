"""`admm-prune plan`: which stages will run, and why, without running anything.

DVC's own `dvc status` names only the first stage whose inputs changed (the later
ones change once it has run), and `dvc repro --dry` guesses wrong about the run-cache.
So the plan combines three sources: the params each stage declares in dvc.yaml,
compared with the values recorded in dvc.lock (after applying any --set overrides
in memory), `dvc status` for changed files, and the stage graph to mark what is
downstream of a stage that will run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stages.params import read_yaml
from stages.paths import entries, read_pipeline

from .dvc_runner import run_dvc

RUN, AFTER_UPSTREAM, SKIP = "run", "run if upstream output changes", "skip"


@dataclass
class StagePlan:
    stage: str
    action: str
    reasons: list[str] = field(default_factory=list)


def _get(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _diff(key: str, old, new) -> list[tuple[str, object, object]]:
    """Changed leaves, so a stage that tracks a whole section names the key that changed."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _diff(f"{key}.{k}", old.get(k, "<missing>"), new.get(k, "<missing>"))]
    return [] if old == new else [(key, old, new)]


def dvc_status(workspace: str | Path) -> dict:
    code, output = run_dvc(["status", "--json"], workspace, echo=False)
    start = output.find("{")
    if code != 0 or start < 0:
        return {}
    try:
        return json.loads(output[start:])
    except ValueError:
        return {}


def make_plan(workspace: str | Path, params: dict, forced: dict[str, str] | None = None) -> list[StagePlan]:
    """forced: {stage: reason} for stages a run forces (flows/inputs.stages_to_force)."""
    workspace = Path(workspace)
    stages = read_pipeline(workspace / "dvc.yaml")
    lock_file = workspace / "dvc.lock"
    locked = ((read_yaml(lock_file) if lock_file.is_file() else None) or {}).get("stages") or {}
    status = dvc_status(workspace)
    outs_of = {name: set(entries(s, "outs")) | set(entries(s, "metrics")) | set(entries(s, "plots"))
               for name, s in stages.items()}
    plans: list[StagePlan] = []
    running: set[str] = set()
    for name, stage in stages.items():
        reasons = [(forced or {})[name]] if name in (forced or {}) else []
        lock = locked.get(name)
        if lock is None:
            reasons.append("has not run in this workspace yet")
        else:
            recorded = (lock.get("params") or {}).get("params.yaml", {})
            for key in entries(stage, "params"):
                reasons.extend(f"param {k}: {_short(old)} -> {_short(new)}"
                               for k, old, new in _diff(key, recorded.get(key, "<missing>"), _get(params, key)))
            for entry in status.get(name, []):
                if not isinstance(entry, dict):
                    reasons.append(str(entry))
                    continue
                for kind, changed in entry.items():
                    for path, state in (changed or {}).items():
                        if path != "params.yaml":
                            reasons.append(f"{kind.replace('changed ', '')} {path} {state}")
        upstream = sorted(other for other in running if set(entries(stage, "deps")) & outs_of[other])
        if reasons:
            plans.append(StagePlan(name, RUN, reasons))
            running.add(name)
        elif upstream:
            plans.append(StagePlan(name, AFTER_UPSTREAM, [f"downstream of {', '.join(upstream)}"]))
            running.add(name)
        else:
            plans.append(StagePlan(name, SKIP, ["nothing it depends on changed"]))
    return plans


def format_plan(plans: list[StagePlan]) -> str:
    lines = []
    for plan in plans:
        if plan.action == SKIP:
            lines.append(f"{plan.stage:<10} {plan.action} ({plan.reasons[0]})")
            continue
        lines.append(f"{plan.stage:<10} {plan.action}")
        lines.extend(f"{'':<10}   - {reason}" for reason in plan.reasons)
    if any(p.action != SKIP for p in plans):
        lines.append("(a stage that would run is restored from the DVC run-cache instead when this exact "
                     "configuration ran before)")
    else:
        lines.append("everything is up to date: a run would do no work")
    return "\n".join(lines)
