"""ADMM pruning of causal LMs: pure torch + transformers (no prefect, no dvc)."""
from .admm import AdmmSystem, admm_solve
from .layer import METHODS, admm_update, prune_layer, validate_settings
from .masks import is_nm_valid, parse_pattern

__all__ = ["AdmmSystem", "admm_solve", "METHODS", "admm_update", "prune_layer",
           "validate_settings", "is_nm_valid", "parse_pattern"]
