#!/usr/bin/env python
"""The prune stage at two commits, back to back, on the same inputs (issue 9, item 6).

    python bench/stage_ab.py --before b295bc5 --after HEAD --methods admm-grad,sparsegpt --threads 2

Needs the model and calibration artifacts in this workspace (`dvc repro calibrate`).
Each commit is checked out into a temporary git worktree that gets copies of those
artifacts and of data/, so both prune the same block-0 inputs. Runs alternate
(before, after, before, after, ...) so drift in machine load hits both sides alike.
Each run: `python -m stages.prune`, then convert and evaluate (pruned model only),
with an empty block store, OMP/MKL threads and torch threads set to --threads.

Recorded per run: wall seconds of the prune stage, its CPU seconds (user + sys of
the process: less sensitive than wall time to other work on a shared machine), the
stage's own prune_seconds (and phase_seconds where the commit writes them), and the
pruned WikiText-2 / C4 perplexities. Results go to bench/results/stage_ab.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, ResultFile

OUT = REPO / "bench" / "results" / "stage_ab.json"
KEY = ("commit", "method", "threads", "repeat")


def sh(args, cwd, env=None) -> str:
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def checkout(rev: str, root: Path) -> tuple[str, Path]:
    commit = sh(["git", "rev-parse", "--short=12", rev], REPO)
    path = root / commit
    if not path.exists():
        sh(["git", "worktree", "add", "--detach", str(path), commit], REPO)
        for name in ("artifacts/model", "artifacts/calibration"):
            shutil.copytree(REPO / name, path / name)
        for f in (REPO / "data").glob("*"):
            if f.is_file() and not (path / "data" / f.name).exists():
                shutil.copy2(f, path / "data" / f.name)
    return commit, path


def set_params(workspace: Path, method: str) -> None:
    """prune.method and evaluate.dense in the commit's own params.yaml (line edits, so
    each commit keeps its own keys and comments)."""
    lines = (workspace / "params.yaml").read_text().splitlines()
    section = None
    for i, line in enumerate(lines):
        if line and not line.startswith(" ") and line.endswith(":"):
            section = line[:-1]
        key = line.strip().split(":")[0]
        if section == "prune" and key == "method" and line.startswith("  method"):
            lines[i] = f"  method: {method}"
        if section == "evaluate" and key == "dense" and line.startswith("  dense"):
            lines[i] = "  dense: false"
    (workspace / "params.yaml").write_text("\n".join(lines) + "\n")


def run_stage(workspace: Path, stage: str, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for `python -m stages.<stage>`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=workspace, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{workspace.name}: stages.{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--methods", default="admm-grad,sparsegpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not (REPO / "artifacts" / "calibration").is_dir():
        raise SystemExit("artifacts/calibration missing: run `dvc repro calibrate` first")

    results = ResultFile(args.out, KEY)
    root = Path(tempfile.gettempdir()) / "stage-ab"
    sides = [checkout(rev, root) for rev in (args.before, args.after)]
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            for commit, workspace in sides:
                if results.has(commit=commit, method=method, threads=args.threads, repeat=repeat):
                    continue
                set_params(workspace, method)
                cache = Path(tempfile.mkdtemp(prefix="stage-ab-cache-"))
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                       "ADMM_PRUNE_WORK_CACHE": str(cache), "TQDM_DISABLE": "1", "PYTHONPATH": str(workspace)}
                wall, cpu = run_stage(workspace, "prune", env)
                run_stage(workspace, "convert", env)
                run_stage(workspace, "evaluate", env)
                shutil.rmtree(cache, ignore_errors=True)
                prune = json.loads((workspace / "metrics" / "prune.json").read_text())
                evaluation = json.loads((workspace / "metrics" / "eval.json").read_text())
                record = {"commit": commit, "side": "before" if commit == sides[0][0] else "after",
                          "method": method, "threads": args.threads, "repeat": repeat,
                          "prune_stage_wall_s": round(wall, 2), "prune_stage_cpu_s": round(cpu, 2),
                          "prune_seconds": prune["prune_seconds"], "phase_seconds": prune.get("phase_seconds"),
                          "wikitext2_ppl": evaluation["wikitext2_ppl"], "c4_ppl": evaluation["c4_ppl"],
                          "load_avg_1min": round(os.getloadavg()[0], 2)}
                results.add(record)
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
