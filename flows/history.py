"""Past runs side by side, from DVC's experiment records.

Every `admm-prune run` that ran a stage ends with `dvc exp save`, and every sweep
run too, so `dvc exp show` holds each run's params.yaml and metrics; this module
turns its JSON into one compact table of the params and numbers people compare.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from stages.paths import EVAL_METRICS, PRUNE_METRICS

from .dvc_runner import run_dvc

PARAM_COLUMNS = ("model.source", "calibrate.nsamples", "calibrate.seqlen", "prune.method", "prune.sparsity",
                 "prune.pattern")
METRIC_COLUMNS = ((EVAL_METRICS.as_posix(), "wikitext2_ppl"), (EVAL_METRICS.as_posix(), "c4_ppl"),
                  (EVAL_METRICS.as_posix(), "sparsity"), (PRUNE_METRICS.as_posix(), "prune_seconds"))


def save_run(workspace: str | Path, name: str | None = None, serialize_on: Path | None = None) -> str | None:
    """Record the workspace as a DVC experiment; None (with the reason printed) if
    it cannot be (no git commit yet, for instance).

    serialize_on: a lock file shared by workspaces of one repository (sweep
    worktrees): `dvc exp save` goes through the repository-wide ref refs/exps/stash,
    and two saves at once fail on its lock, so they take turns."""
    args = ["exp", "save", "--include-untracked", "dvc.lock"] + (["--name", name] if name else [])
    with _exclusive(serialize_on):
        code, output = run_dvc(args, workspace, echo=False)
    if code != 0:
        errors = [line for line in output.splitlines() if line.startswith("ERROR")] or [f"exit {code}"]
        print(f"note: run not recorded in `dvc exp show`: {errors[0]}")
        return None
    return output.strip().splitlines()[-1]


@contextlib.contextmanager
def _exclusive(path: Path | None):
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocking: wait for the other save
        yield


def _dig(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _row(label: str, entry: dict) -> dict:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    metrics = data.get("metrics") or {}
    row = {"run": label, "created": (data.get("timestamp") or "")[:16]}
    row.update({key: _dig(params, key) for key in PARAM_COLUMNS})
    for path, key in METRIC_COLUMNS:
        row[key] = ((metrics.get(path) or {}).get("data") or {}).get(key)
    return row


def past_runs(workspace: str | Path, all_commits: bool = False) -> list[dict]:
    code, output = run_dvc(["exp", "show", "--json"] + (["--all-commits"] if all_commits else []),
                           workspace, echo=False)
    start = output.find("[")
    if code != 0 or start < 0:
        raise RuntimeError(f"dvc exp show failed: {output.strip()[-500:]}")
    rows = []
    for baseline in json.loads(output[start:]):
        label = "workspace" if baseline["rev"] == "workspace" else (baseline.get("name") or baseline["rev"][:7])
        rows.append(_row(label, baseline))
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            rows.append(_row(f"  {rev.get('name') or rev['rev'][:7]}", rev))
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)"
    columns = list(rows[0])

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
