"""Where every artifact lives, relative to the workspace root (DVC runs stages there).

dvc.yaml is the one definition: each constant below is looked up among the outs,
metrics and plots a stage declares there, so a stage, the flows that read its
outputs and the stage graph cannot disagree about a location. Only the files
inside an artifact directory (which DVC does not see) are named here.

The same file defines which library code each stage depends on (its deps), which
keys the block store and the dense-evaluation memo: see stage_code.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the workspace this code belongs to
PIPELINE_FILE = ROOT / "dvc.yaml"
PARAMS_FILE = Path("params.yaml")


def read_pipeline(path: Path) -> dict:
    """The stages of a dvc.yaml: the one reader of that file (flows/plan.py reads a
    workspace's copy through it too)."""
    from ruamel.yaml import YAML
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: stages/ must sit in the workspace next to dvc.yaml")
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))["stages"]


def entries(stage_def: dict, kind: str = "outs") -> list[str]:
    """The paths or keys of one kind (outs, metrics, plots, deps, params) in one stage's
    definition; items may be `path` or `{path: options}`."""
    out = []
    for item in stage_def.get(kind) or []:
        out.extend(item.keys() if isinstance(item, dict) else [item])
    return out


@functools.cache
def pipeline() -> dict:
    """The stages of this code's dvc.yaml (parsed once)."""
    return read_pipeline(PIPELINE_FILE)


def declared(stage: str, kind: str = "outs") -> list[str]:
    """The paths of one kind (outs, metrics, plots, deps) a stage declares in dvc.yaml."""
    return entries(pipeline()[stage], kind)


def _only(stage: str, kind: str) -> Path:
    paths = declared(stage, kind)
    if len(paths) != 1:
        raise ValueError(f"dvc.yaml: stage {stage!r} declares {len(paths)} {kind}, expected one: {paths}")
    return Path(paths[0])


def stage_code(stage: str, package: str = "pruning") -> list[Path]:
    """The .py files of `package` that `stage` declares as deps (relative to ROOT).
    tests/test_layering.py checks that they cover everything the stage imports."""
    return [Path(d) for d in declared(stage, "deps") if d.startswith(package + "/") and d.endswith(".py")]


MODEL_DIR = _only("model", "outs")              # HF dir (safetensors + config + tokenizer)
CALIBRATION_DIR = _only("calibrate", "outs")    # token ids + block-0 inputs
PRUNED_DIR = _only("prune", "outs")             # the assembled pruned model (HF dir)
CONVERTED_DIR = _only("convert", "outs")        # packed N:M model, or a pass-through note

PRUNE_METRICS = _only("prune", "metrics")
CONVERT_METRICS = _only("convert", "metrics")
EVAL_METRICS = _only("evaluate", "metrics")
PRUNE_LAYERS_PLOT = _only("prune", "plots")
EVAL_LAYERS_PLOT = _only("evaluate", "plots")
METRICS_DIR = EVAL_METRICS.parent
PLOTS_DIR = EVAL_LAYERS_PLOT.parent
REPORT_DIR = Path(os.path.commonpath(declared("report", "outs")))  # report.md, run_meta.json, plots/, model/

# Files inside artifact directories.
MODEL_SOURCE_JSON = "source.json"        # where the model came from
CALIB_IDS = "input_ids.safetensors"
CALIB_INPUTS = "block_inputs.safetensors"
CALIB_META = "calibration.json"
PRUNE_LOG = "prune_log.json"             # per-layer settings and stats of the pruned model
CONVERT_JSON = "convert.json"            # whether convert packed the model or passed it through
REPORT_MD = "report.md"


def work_cache() -> Path:
    """Root of the caches that live outside DVC's declared outputs (block store,
    dense-evaluation memo). Git-ignored; sweeps point several workspaces at one
    root through ADMM_PRUNE_WORK_CACHE so they share results."""
    return Path(os.environ.get("ADMM_PRUNE_WORK_CACHE", ".cache"))
