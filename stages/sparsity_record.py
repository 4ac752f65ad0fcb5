"""`sparsity_config` in a pruned model's config.json: what was done to its weights.

Written by the one pruning path (stages/pruner.py) onto model.config, so every
folder saved from the model carries it (the prune stage's artifact, reports/model,
the packed folder, a model saved from the Python API); the model card
(stages/model_card.py) reads it back, so card and config cannot disagree.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from pruning.settings import PruneSettings, layer_settings

CONFIG_KEY = "sparsity_config"


def sparsity_config(settings: PruneSettings, layers: list[dict]) -> dict:
    """The settings asked for (the default level) and the sparsity measured in the
    pruned layers (embeddings and lm_head are never pruned). Only what follows from
    the inputs, so an identical re-prune writes identical bytes."""
    default = layer_settings(settings.method, settings.sparsity, settings.pattern, settings.options)
    measured = [layer["sparsity"] for layer in layers]
    return {
        "tool": "admm-prune",
        "method": default.method, "sparsity": default.sparsity, "pattern": default.pattern,
        "options": default.as_dict()["options"],
        "varies_by_layer": bool(settings.block_overrides or settings.layer_overrides
                                or getattr(settings, "masks", None)),
        "pruned_layers": len(layers),
        "measured_sparsity": {"mean_over_layers": round(statistics.fmean(measured), 6),
                              "min": round(min(measured), 6), "max": round(max(measured), 6)},
    }


def read_sparsity_config(model_dir: str | Path) -> dict:
    """The `sparsity_config` entry of a model folder's config.json."""
    path = Path(model_dir) / "config.json"
    entry = json.loads(path.read_text(encoding="utf-8")).get(CONFIG_KEY)
    if not isinstance(entry, dict):
        raise ValueError(f"{path} has no {CONFIG_KEY!r} entry: not a model pruned by admm-prune")
    return entry
