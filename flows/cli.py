"""`admm-prune`: the command a user reaches for first.

  admm-prune run [--set key=value ...] [--profile paper]   run the pipeline (Prefect flow over DVC)
  admm-prune plan [--set key=value ...]                     which stages would run, and why
  admm-prune runs                                           past runs' params and metrics side by side
  admm-prune sweep --sparsities 0.5,0.6 --methods wanda,admm-grad
  admm-prune serve --cron "0 3 * * *"                       scheduled re-runs (Prefect deployment)
  admm-prune publish ORG/NAME [--private]                   upload reports/model to the Hugging Face hub
  admm-prune restore                                        back to the last finished run (after a failure)

Every command works on the workspace given by -C (default: the current directory).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.params import ParamError
from stages.paths import EVAL_METRICS, REPORT_DIR, REPORT_MD, ROOT
from stages.workspace_lock import PipelineBusy

from .dvc_runner import StageFailed
from .inputs import InputChanged
from .params_edit import known_profiles

EXIT_PARAMS, EXIT_BUSY, EXIT_STAGE = 2, 3, 1


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    return [float(part) for part in _csv(text)]


def _profiles() -> str:
    """For --help: the profiles of this code's workspace (-C is not parsed yet)."""
    return ", ".join(known_profiles(ROOT)) or "none found"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="admm-prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-C", "--workspace", default=".", help="the workspace (where dvc.yaml is)")
    sub = parser.add_subparsers(dest="command", required=True)

    profiles = _profiles()

    def overrides(p):
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param in params.yaml, e.g. prune.sparsity=0.6 (repeatable)")
        p.add_argument("--profile", help=f"apply params-<PROFILE>.yaml first ({profiles}; default = back to the "
                                         "project's defaults)")

    run = sub.add_parser("run", help="run the pipeline; DVC skips what is up to date")
    overrides(run)
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage even if DVC thinks it is up to date (repeatable)")
    run.add_argument("--retries", type=int, default=1, help="retries of a failed stage (default 1)")
    run.add_argument("--no-prefect", action="store_true",
                     help="run the stages through DVC without the Prefect flow (no local API server)")
    run.add_argument("--no-save", action="store_true", help="do not record the run with `dvc exp save`")
    run.add_argument("--name", help="the DVC experiment name (default run-<date>-<time>)")

    plan = sub.add_parser("plan", help="show which stages would run and why, without running")
    overrides(plan)

    runs = sub.add_parser("runs", help="past runs' params and metrics side by side (from dvc exp show)")
    runs.add_argument("--all-commits", action="store_true", help="include experiments of every commit")

    sweep = sub.add_parser("sweep", help="models x methods x sparsities in parallel (Dask), one DVC experiment each")
    sweep.add_argument("--models", type=_csv, help="comma-separated model sources (default: params.yaml's)")
    sweep.add_argument("--methods", type=_csv, help="comma-separated methods (default: params.yaml's)")
    sweep.add_argument("--sparsities", type=_floats, help="comma-separated sparsities (default: params.yaml's)")
    sweep.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="an override applied to every run (repeatable)")
    sweep.add_argument("--workers", type=int, default=2, help="local Dask worker processes (default 2)")
    sweep.add_argument("--dask-address", help="use this Dask scheduler (e.g. tcp://host:8786) instead of a local cluster")

    serve = sub.add_parser("serve", help="serve a cron-scheduled deployment of the pipeline flow")
    serve_arguments(serve)

    publish = sub.add_parser("publish", help="upload the pruned model folder to the Hugging Face hub "
                                             "(token: HF_TOKEN or `hf auth login`)")
    publish.add_argument("repo_id", help="the hub repository, e.g. my-org/smollm2-135m-admm-grad-50")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--folder", default=str(REPORT_DIR / "model"),
                         help="the folder to upload, relative to the workspace (default: %(default)s; "
                              "artifacts/converted for the packed N:M model)")

    sub.add_parser("restore", help="put back params.yaml, dvc.lock and the outputs of the last finished run")
    return parser


def serve_arguments(serve: argparse.ArgumentParser) -> None:
    """`serve` takes what `run` takes, applied by every scheduled run."""
    serve.add_argument("--cron", default="0 3 * * *", help='cron schedule (default "0 3 * * *")')
    serve.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a param in params.yaml at every scheduled run, e.g. "
                            "model.source=<new model> (repeatable)")
    serve.add_argument("--profile", help=f"apply params-<PROFILE>.yaml at every scheduled run ({_profiles()})")
    serve.add_argument("--force", action="append", default=[], metavar="STAGE",
                       help="rerun this stage at every scheduled run even if DVC thinks it is up to date, "
                            "e.g. `model` for a model directory whose contents change (repeatable)")
    serve.add_argument("--name", default="admm-prune-scheduled", help="deployment name")


# ---------------------------------------------------------------- output

def result_table(workspace: Path) -> str:
    """The dense vs pruned table printed at the end of a run."""
    path = workspace / EVAL_METRICS
    if not path.is_file():
        return ""
    ev = json.loads(path.read_text())

    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [("WikiText-2 perplexity", cell(ev.get("dense_wikitext2_ppl")), cell(ev["wikitext2_ppl"])),
            ("C4 perplexity", cell(ev.get("dense_c4_ppl")), cell(ev["c4_ppl"])),
            ("sparsity (pruned linears)", "0", cell(ev["sparsity"], 4))]
    lines = [f"{'':<28}{'dense':>12}{'pruned':>12}"]
    lines += [f"{name:<28}{dense:>12}{pruned:>12}" for name, dense, pruned in rows]
    lines.append(f"({ev['wikitext2_windows']} WikiText-2 and {ev['c4_windows']} C4 windows of {ev['seqlen']} tokens; "
                 f"{'full protocol' if ev.get('protocol') == 'full' else 'evaluation subset'})")
    return "\n".join(lines)


def stage_summary(runs: list[dict]) -> str:
    labels = {"ran": "ran", "skipped": "cached (unchanged)", "restored": "cached (restored from run-cache)"}
    return "\n".join(f"  {r['stage']:<10} {labels[r['outcome']]:<34} {r['seconds']:>6.1f} s" for r in runs)


# ---------------------------------------------------------------- commands

def cmd_run(args, workspace: Path) -> int:
    # Before params.yaml is written, before the workspace lock and before Prefect is
    # imported: a bad setting or an input edited in place fails here in seconds and
    # changes no file.
    from .workspace import experiment_name, planned_params
    planned_params(workspace, args.sets, args.profile)
    experiment = None if args.no_save else (args.name or experiment_name())
    if args.no_prefect:
        result = run_without_prefect(workspace, args.sets, args.profile, tuple(args.force), experiment)
    else:
        from .pipeline import pipeline_flow
        result = pipeline_flow(str(workspace), sets=args.sets, profile=args.profile, retries=args.retries,
                               force=args.force, experiment=experiment)
    print("\nstages:")
    print(stage_summary(result["stages"]))
    if result["saved"]:
        print(result["saved"] + "  (see `admm-prune runs`)")
    print()
    print(result_table(workspace))
    print(f"\nreport: {workspace / REPORT_DIR / REPORT_MD}   pruned model: {workspace / REPORT_DIR / 'model'}")
    if result["params_changes"]:
        print(params_kept_note(result["params_changes"]))
    return 0


def params_kept_note(changes: list[str]) -> str:
    """Like `dvc exp run -S`, a run leaves its params in params.yaml: say so, and how
    to go back."""
    return ("\nparams.yaml keeps this run's values (" + "; ".join(changes) + "), so the next plain run "
            "uses them too.\nBack to the project's defaults: admm-prune run --profile default")


def run_without_prefect(workspace: Path, sets, profile, force, experiment) -> dict:
    """The same stages in the same order, straight through DVC."""
    from .dvc_runner import active_session
    from .workspace import run_pipeline

    return run_pipeline(workspace, sets, profile,
                        lambda stage, ws, forced: active_session(ws).repro(stage, force=forced).as_dict(),
                        force, experiment)


def cmd_restore(args, workspace: Path) -> int:
    from .workspace import restore_good_state
    restored = restore_good_state(workspace)
    print(f"restored {', '.join(restored)} and the outputs they name from the DVC cache")
    return 0


def cmd_plan(args, workspace: Path) -> int:
    from .plan import format_plan, make_plan
    from .workspace import planned_params

    plan = planned_params(workspace, args.sets, args.profile)
    for change in plan.changes:
        print(f"with {change}")
    print(format_plan(make_plan(workspace, plan.params, plan.forced)))
    return 0


def cmd_runs(args, workspace: Path) -> int:
    from .history import format_table, past_runs
    print(format_table(past_runs(workspace, args.all_commits)))
    return 0


SWEEP_TABLE_COLUMNS = ("model", "method", "sparsity", "pattern", "dense_wikitext2_ppl", "pruned_wikitext2_ppl",
                       "dense_c4_ppl", "pruned_c4_ppl", "status", "seconds", "experiment")


def cmd_sweep(args, workspace: Path) -> int:
    from .history import format_table
    from .sweep import run_sweep
    rows = run_sweep(str(workspace), args.models, args.methods, args.sparsities, args.sets,
                     workers=args.workers, address=args.dask_address)
    print()
    print(format_table([{k: r[k] for k in SWEEP_TABLE_COLUMNS} for r in rows]))
    print("\nall runs: `admm-prune runs` or `dvc exp show`; bring one into the workspace: `dvc exp apply <name>`")
    failed = [r["run"] for r in rows if r["status"] != "finished"]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} sweep runs failed: {', '.join(failed)} "
              "(their Prefect task logs say at which stage)", file=sys.stderr)
        return EXIT_STAGE
    return 0


def cmd_serve(args, workspace: Path) -> int:
    from .deploy import serve
    serve(str(workspace), args.cron, args.sets, args.name, args.force, profile=args.profile)
    return 0


def cmd_publish(args, workspace: Path) -> int:
    from .publish import PublishError, publish
    try:
        url = publish(workspace / args.folder, args.repo_id, private=args.private)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STAGE
    print(f"published {args.folder} to {args.repo_id}: {url}")
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "runs": cmd_runs, "sweep": cmd_sweep, "serve": cmd_serve,
            "publish": cmd_publish, "restore": cmd_restore}


def restore_hint(workspace: Path) -> str:
    from .workspace import has_good_state
    if has_good_state(workspace):
        return ("the workspace now has this run's params and not all of its outputs; the last finished "
                "run (params.yaml, dvc.lock, outputs) comes back with:\n  admm-prune restore")
    return "no finished run to go back to yet; fix the cause and run again"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace = Path(args.workspace).resolve()
    if not (workspace / "dvc.yaml").is_file():
        print(f"error: {workspace} has no dvc.yaml (use -C to point at the workspace)", file=sys.stderr)
        return EXIT_PARAMS
    try:
        return COMMANDS[args.command](args, workspace)
    except ParamError as err:  # a bad setting, named by its key (pruning.settings.SettingsError)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PARAMS
    except (FileNotFoundError, InputChanged) as err:  # e.g. no params.yaml; a data file edited in place
        print(f"error: {err}", file=sys.stderr)
        return EXIT_PARAMS
    except PipelineBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUSY
    except StageFailed as err:
        print(f"error: {err}\n{restore_hint(workspace)}", file=sys.stderr)
        return EXIT_STAGE


if __name__ == "__main__":
    sys.exit(main())
