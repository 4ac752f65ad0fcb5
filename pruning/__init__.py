"""ADMM pruning of causal LMs: pure torch + transformers (no prefect, no dvc).

Layer level:  prune_layer, admm_update, validate_settings.
Model level:  PruneSpec + prune_model (block-sequential), capture_block_inputs.
Evaluation:   perplexity; data windows in pruning.data; models in pruning.models.
"""
from .admm import AdmmSystem, admm_solve
from .gram import GramCollector
from .layer import METHODS, admm_update, prune_layer, validate_settings
from .masks import is_nm_valid, parse_pattern
from .perplexity import perplexity
from .discovery import check_prunable, decoder_layers, prunable_linear_names
from .runner import BlockInputs, PruneResult, PruneSpec, capture_block_inputs, prune_model

__all__ = ["AdmmSystem", "admm_solve", "GramCollector", "METHODS", "admm_update", "prune_layer",
           "validate_settings", "is_nm_valid", "parse_pattern", "perplexity", "BlockInputs",
           "PruneResult", "PruneSpec", "capture_block_inputs", "decoder_layers",
           "prunable_linear_names", "check_prunable", "prune_model"]
