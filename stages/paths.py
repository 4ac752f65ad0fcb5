"""Where every artifact lives, relative to the workspace root (DVC runs stages there).

dvc.yaml names the same paths; keeping them in one module means a stage and the
flows that read its outputs cannot disagree about a location.
"""
from __future__ import annotations

import os
from pathlib import Path

PARAMS_FILE = Path("params.yaml")

MODEL_DIR = Path("artifacts/model")            # model stage: HF dir (safetensors + config + tokenizer)
CALIBRATION_DIR = Path("artifacts/calibration")  # calibrate stage: token ids + block-0 inputs
PRUNED_DIR = Path("artifacts/pruned")          # prune stage: the assembled pruned model (HF dir)
CONVERTED_DIR = Path("artifacts/converted")    # convert stage: packed N:M model, or a pass-through note

METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORT_DIR = Path("reports")

PRUNE_METRICS = METRICS_DIR / "prune.json"
CONVERT_METRICS = METRICS_DIR / "convert.json"
EVAL_METRICS = METRICS_DIR / "eval.json"
PRUNE_LAYERS_PLOT = PLOTS_DIR / "prune_layers.csv"
EVAL_LAYERS_PLOT = PLOTS_DIR / "eval_layers.csv"

# Files inside artifact directories.
MODEL_SOURCE_JSON = "source.json"        # where the model came from
CALIB_IDS = "input_ids.safetensors"
CALIB_INPUTS = "block_inputs.safetensors"
CALIB_META = "calibration.json"
PRUNE_LOG = "prune_log.json"             # per-layer settings and stats of the pruned model
CONVERT_JSON = "convert.json"            # whether convert packed the model or passed it through


def work_cache() -> Path:
    """Root of the caches that live outside DVC's declared outputs (block store,
    dense-evaluation memo). Git-ignored; sweeps point several workspaces at one
    root through ADMM_PRUNE_WORK_CACHE so they share results."""
    return Path(os.environ.get("ADMM_PRUNE_WORK_CACHE", ".cache"))
