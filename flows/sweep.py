"""The sweep flow: models x methods x sparsities, each run in its own workspace,
in parallel on a Dask cluster, every run recorded as a DVC experiment.

Each run gets a git worktree of HEAD in a temp dir (its own params.yaml, dvc.lock
and outputs, so runs never share a workspace), with:
- the main repository's DVC cache (`cache.dir`), so inputs check out without a
  download and stages one run already computed are restored from the run-cache;
- the main workspace's current params.yaml plus the run's overrides;
- the shared work cache (block store, dense-evaluation memo) of the main workspace;
- the DVC remote resolved to an absolute URL (relative URLs point elsewhere from a temp dir).
It runs `dvc repro`, then `dvc exp save`; worktrees share the repository's refs, so
the experiment appears in the main workspace's `dvc exp show`. The worktree is
removed afterwards.

The task runner is prefect-dask's DaskTaskRunner: a local cluster by default, or
any Dask scheduler address, which scales the sweep past one machine (its workers
need this repository at the same path, e.g. on a shared filesystem).
"""
from __future__ import annotations

from . import prefect_env  # noqa: F401  (settings before prefect is imported)

import contextlib
import itertools
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from stages.params import load_params
from stages.preflight import check_all

from .dvc_runner import repro_all, run_dvc
from .history import save_run
from .params_edit import apply_overrides, parse_assignment


def _git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40]


def _absolute_remotes(repo: Path, worktree: Path) -> None:
    """Point the worktree's DVC remotes at absolute URLs (local paths only)."""
    code, output = run_dvc(["remote", "list"], repo, echo=False)
    for line in output.splitlines() if code == 0 else []:
        parts = line.split()
        if len(parts) >= 2 and "://" not in parts[1]:
            url = (repo / ".dvc" / parts[1]).resolve()
            run_dvc(["remote", "modify", "--local", parts[0], "url", str(url)], worktree, echo=False)


def combinations(models, methods, sparsities) -> list[dict]:
    return [{"model.source": m, "prune.method": meth, "prune.sparsity": s}
            for m, meth, s in itertools.product(models, methods, sparsities)]


@task(name="sweep-run", cache_policy=NO_CACHE, persist_result=False, task_run_name="{name}")
def sweep_run(repo: str, params_text: str, sets: list[str], name: str, threads: int) -> dict:
    repo_path = Path(repo)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="admm-sweep-") as tmp:
        worktree = Path(tmp) / "ws"
        _git("worktree", "add", "--detach", str(worktree), "HEAD", cwd=repo_path)
        try:
            run_dvc(["cache", "dir", "--local", str(repo_path / ".dvc" / "cache")], worktree, echo=False)
            _absolute_remotes(repo_path, worktree)
            # Inputs only: stage outputs come from the run-cache or are computed by repro.
            pointers = [str(p.relative_to(worktree)) for p in worktree.rglob("*.dvc") if p.is_file()]
            if pointers:
                run_dvc(["checkout", *pointers], worktree, echo=False)
            (worktree / "params.yaml").write_text(params_text, encoding="utf-8")
            apply_overrides(worktree / "params.yaml", [parse_assignment(s) for s in sets])
            env = {"ADMM_PRUNE_WORK_CACHE": str(repo_path / ".cache"),
                   # Parallel runs share the cores: oversubscribed OpenMP threads spin and
                   # slow small kernels down by orders of magnitude.
                   "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            runs = repro_all(worktree, env=env, echo=False)
            saved = save_run(worktree, name, serialize_on=repo_path / ".dvc" / "tmp" / "admm-prune-exp-save.lock")
            metrics = json.loads((worktree / "metrics" / "eval.json").read_text())
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo_path,
                           capture_output=True)
    ran = [r.stage for r in runs if not r.cached]
    print(f"{name}: ran {', '.join(ran) or 'nothing'}; wikitext2 ppl {metrics['wikitext2_ppl']:.3f}")
    return {"name": name, "sets": sets, "experiment": saved, "ran": ran,
            "wikitext2_ppl": metrics["wikitext2_ppl"], "c4_ppl": metrics["c4_ppl"],
            "sparsity": metrics["sparsity"], "seconds": round(time.perf_counter() - start, 1)}


@flow(name="admm-prune-sweep", log_prints=True)
def sweep_flow(workspace: str = ".", models: list[str] | None = None, methods: list[str] | None = None,
               sparsities: list[float] | None = None, sets: list[str] | None = None,
               threads_per_run: int = 1) -> list[dict]:
    ws = Path(workspace).resolve()
    base = load_params(ws / "params.yaml")
    grid = combinations(models or [base["model"]["source"]], methods or [base["prune"]["method"]],
                        sparsities or [base["prune"]["sparsity"]])
    params_text = (ws / "params.yaml").read_text(encoding="utf-8")
    stamp = time.strftime("%m%d%H%M%S")
    futures = []
    for combo in grid:
        run_sets = list(sets or []) + [f"{k}={v}" for k, v in combo.items()]
        # Every combination's params are checked before anything is submitted.
        with contextlib.chdir(ws):
            check_all(apply_overrides(ws / "params.yaml", [parse_assignment(s) for s in run_sets], write=False)[0])
        name = f"sweep-{_slug(combo['model.source'])}-{_slug(combo['prune.method'])}-{_slug(combo['prune.sparsity'])}-{stamp}"
        futures.append(sweep_run.submit(str(ws), params_text, run_sets, name, threads_per_run))
    results = [f.result() for f in futures]
    create_table_artifact(key="admm-prune-sweep", table=results, description=f"sweep in {ws}")
    return results


def run_sweep(workspace: str = ".", models=None, methods=None, sparsities=None, sets=None,
              workers: int = 2, address: str | None = None) -> list[dict]:
    """The sweep on a local Dask cluster of `workers` processes, or on the Dask
    scheduler at `address`."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
        threads = 1
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None})
        threads = max(1, (os.cpu_count() or 1) // workers)
    return sweep_flow.with_options(task_runner=runner)(workspace, models, methods, sparsities, sets, threads)
