"""ADMM pruning of causal LMs: pure torch + transformers (no prefect, no dvc).

Layer level:  prune_layer, admm_update, validate_settings.
Model level:  PruneSpec + prune_model (block-sequential), capture_block_inputs.
Settings:     pruning.settings (torch-free): the typed settings model and its resolver.
Evaluation:   perplexity; data windows in pruning.data; models in pruning.models.

The names below are loaded on first use (PEP 562): importing one submodule, e.g.
pruning.settings for a settings check, does not import torch or the rest.
"""
from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "AdmmSystem": "admm", "admm_solve": "admm",
    "GramCollector": "gram",
    "METHODS": "layer", "admm_update": "layer", "prune_layer": "layer", "validate_settings": "layer",
    "is_nm_valid": "masks", "parse_pattern": "masks",
    "perplexity": "perplexity",
    "BlockInputs": "runner", "PruneResult": "runner", "PruneSpec": "runner", "capture_block_inputs": "runner",
    "prune_model": "runner",
    "check_prunable": "discovery", "decoder_layers": "discovery", "prunable_linear_names": "discovery",
    "LayerSettings": "settings", "PruneSettings": "settings", "SettingsError": "settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pruning' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    # Importing the submodule pruning.perplexity binds it as the package attribute
    # `perplexity`, over the function of that name: keep the function (the module
    # stays in sys.modules["pruning.perplexity"]).
    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
