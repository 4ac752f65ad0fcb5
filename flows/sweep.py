"""The sweep flow: models x methods x sparsities, each run in its own workspace,
in parallel on a Dask cluster, every run recorded as a DVC experiment.

Each run gets a private workspace (flows/experiment.py: a git worktree of HEAD
sharing the main workspace's DVC cache, remotes and work cache; its own
params.yaml, dvc.lock and outputs, so runs never share a workspace) with the main
workspace's current params.yaml plus the run's overrides. It runs the stages one by one (`dvc repro --single-item`), then `dvc exp save`;
worktrees share the repository's refs, so the experiment appears in the main
workspace's `dvc exp show`. The worktree is removed afterwards.

Progress: each run logs "started", every stage's outcome (with the stage's own
output) and "finished" or "failed at stage X" to its Prefect task log (shown on the
console of the process that runs it); the flow prints each run as it completes.
A failed run does not stop the others; it gets a "failed" row. At the end the
table and a perplexity-vs-sparsity plot per model go to sweeps/<stamp>/ and to
Prefect artifacts (see sweep_report.py).

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
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from stages.params import load_params
from stages.preflight import check_all

from .artifacts import publish_markdown_file
from .dvc_runner import STAGES, repro_stage
from .experiment import experiment_workspace, work_env
from .history import save_run
from .params_edit import apply_overrides, parse_assignment
from .pipeline import log_stage_output
from .sweep_report import SWEEPS_DIR, slug, table_row, write_sweep_outputs


def combinations(models, methods, sparsities) -> list[dict]:
    return [{"model.source": m, "prune.method": meth, "prune.sparsity": s}
            for m, meth, s in itertools.product(models, methods, sparsities)]


@contextlib.contextmanager
def run_workspace(repo: Path, params_text: str, sets: list[str]):
    """A private workspace (flows/experiment.py) with the run's overrides applied."""
    with experiment_workspace(repo, params_text) as worktree:
        apply_overrides(worktree / "params.yaml", [parse_assignment(s) for s in sets])
        yield worktree


def run_combination(repo: Path, params_text: str, sets: list[str], name: str, threads: int, logger) -> dict:
    """One sweep run, stage by stage, logging its progress to `logger` (the task's
    run logger: its records carry the run's name); raises on a failed stage after
    logging which stage failed."""
    start = time.perf_counter()
    logger.info("started: %s", " ".join(sets))
    stage = "setup"
    try:
        with run_workspace(repo, params_text, sets) as worktree:
            env = {**work_env(repo),
                   # Parallel runs share the cores: oversubscribed OpenMP threads spin and
                   # slow small kernels down by orders of magnitude.
                   "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            runs = []
            for stage in STAGES:
                logger.info("stage %s ...", stage)
                runs.append(repro_stage(worktree, stage, env=env, echo=False))
                log_stage_output(logger, runs[-1])
            stage = "dvc exp save"
            saved = save_run(worktree, name, serialize_on=repo / ".dvc" / "tmp" / "admm-prune-exp-save.lock")
            metrics = json.loads((worktree / "metrics" / "eval.json").read_text())
    except Exception as err:
        logger.error("failed at stage %s after %.0f s: %s", stage, time.perf_counter() - start,
                     str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise
    seconds = round(time.perf_counter() - start, 1)
    ran = [r.stage for r in runs if not r.cached]
    logger.info("finished in %.0f s; ran %s; wikitext2 ppl %.3f (dense %s)", seconds,
                ", ".join(ran) or "nothing", metrics["wikitext2_ppl"], metrics.get("dense_wikitext2_ppl"))
    return {"status": "finished", "experiment": name if saved else None, "ran": ran, "metrics": metrics,
            "seconds": seconds}


@task(name="sweep-run", cache_policy=NO_CACHE, persist_result=False, task_run_name="{name}")
def sweep_run(repo: str, params_text: str, sets: list[str], name: str, threads: int) -> dict:
    return run_combination(Path(repo), params_text, sets, name, threads, get_run_logger())


def plan_runs(ws: Path, grid: list[dict], sets: list[str] | None, stamp: str) -> list[dict]:
    """Name, overrides and resolved params of every run; every combination's params
    are checked before anything is submitted."""
    planned = []
    for combo in grid:
        run_sets = list(sets or []) + [f"{k}={v}" for k, v in combo.items()]
        params = apply_overrides(ws / "params.yaml", [parse_assignment(s) for s in run_sets], write=False)[0]
        with contextlib.chdir(ws):
            check_all(params)
        name = f"sweep-{slug(combo['model.source'])}-{slug(combo['prune.method'])}-{slug(combo['prune.sparsity'])}-{stamp}"
        planned.append({"name": name, "sets": run_sets, "params": params})
    return planned


def _outcome(future) -> dict:
    """The run's result, or a failed outcome carrying the first line of its error."""
    try:
        return future.result()
    except Exception as err:  # the run's own log says where it failed
        return {"status": "failed", "error": (str(err).splitlines() or [type(err).__name__])[0][:200]}


@flow(name="admm-prune-sweep", log_prints=True)
def sweep_flow(workspace: str = ".", models: list[str] | None = None, methods: list[str] | None = None,
               sparsities: list[float] | None = None, sets: list[str] | None = None,
               threads_per_run: int = 1) -> list[dict]:
    """Run every combination; return the table rows (see sweep_report.COLUMNS)."""
    ws = Path(workspace).resolve()
    base = load_params(ws / "params.yaml")
    grid = combinations(models or [base["model"]["source"]], methods or [base["prune"]["method"]],
                        sparsities or [base["prune"]["sparsity"]])
    stamp = time.strftime("%m%d%H%M%S")
    planned = plan_runs(ws, grid, sets, stamp)
    params_text = (ws / "params.yaml").read_text(encoding="utf-8")
    out_dir = ws / SWEEPS_DIR / stamp
    print(f"sweep {stamp}: {len(planned)} runs; progress per run below, results -> {out_dir}")
    futures = {sweep_run.submit(str(ws), params_text, run["sets"], run["name"], threads_per_run): run
               for run in planned}
    outcomes = {}
    for done, future in enumerate(as_completed(list(futures)), 1):
        run = futures[future]
        outcomes[run["name"]] = outcome = _outcome(future)
        detail = (f"wikitext2 ppl {outcome['metrics']['wikitext2_ppl']:.3f}, {outcome['seconds']:.0f} s"
                  if outcome["status"] == "finished" else outcome["error"])
        print(f"[{done}/{len(planned)}] {run['name']}: {outcome['status']} ({detail})")
    rows = [table_row(run["name"], run["params"], outcomes[run["name"]]) for run in planned]
    publish_sweep(out_dir, rows)
    return rows


def publish_sweep(out_dir: Path, rows: list[dict]) -> None:
    """sweeps/<stamp>/ files, then the same table and plots as Prefect artifacts."""
    written = write_sweep_outputs(out_dir, rows)
    create_table_artifact(key="admm-prune-sweep", table=rows, description=f"sweep results ({out_dir})")
    publish_markdown_file("admm-prune-sweep-plots", written["markdown"],
                          description=f"perplexity vs sparsity per model ({out_dir})")
    print(f"sweep results: {written['csv']}, plots: {', '.join(p.name for p in written['plots']) or 'none'}")
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
