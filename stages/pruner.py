"""The one path from (a model, calibration windows, the prune settings) to a pruned model.

The prune stage and the Python API (stages/api.py) both call `prune`: the same
checks of params.yaml's `model` and `prune` sections, the same user-mask handling,
the same library call (pruning.runner.prune_model) and the same `sparsity_config`
written into the model's config. What differs stays with the caller: the stage
brings stored block-0 inputs and a block store (resume, reuse), the API cuts its
windows from text and keeps the model in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from pruning.settings import PruneSettings, SettingsError

from .artifact_io import read_tensors
from .params import check_prune, prune_settings
from .runtime import resolve_device
from .sparsity_record import CONFIG_KEY, sparsity_config

MODEL_DEFAULTS = {"device": "auto", "offload": False, "batch_size": 8}  # params.yaml's model keys prune reads


def load_user_masks(path: str) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) keyed by full layer name, with or without '.weight';
    PruneSpec.validate checks their names and shapes against the model."""
    return {key.removesuffix(".weight"): tensor.to(torch.bool) for key, tensor in read_tensors(path).items()}


def build_spec(settings: PruneSettings, masks):
    from pruning.runner import PruneSpec
    return PruneSpec(**{f.name: getattr(settings, f.name) for f in fields(PruneSettings)}, masks=masks)


@dataclass
class Pruned:
    spec: object           # pruning.runner.PruneSpec, validated against the model
    device: str
    result: object         # pruning.runner.PruneResult: per-layer stats, time, reused blocks
    store: object = None   # the block store used, if any


def prepare(model, params: dict, masks: dict | None = None):
    """Check the prune section (and user masks) against `model`; return the PruneSpec.
    Errors are SettingsErrors rooted in params.yaml's keys (prune.*, model.source)."""
    from pruning.discovery import check_prunable

    p = check_prune(params)
    try:
        check_prunable(model)
    except ValueError as err:
        raise SettingsError(("model", "source"), str(err).partition(": ")[2]) from None
    if masks is None and p.get("mask_file"):
        masks = load_user_masks(p["mask_file"])
    spec = build_spec(prune_settings(params), masks)
    try:
        spec.validate(model, mask_path=("mask_file",) if p.get("mask_file") else ("masks",))
    except SettingsError as err:
        raise err.within("prune") from None
    return spec


def prune(model, params: dict, calib_ids: torch.Tensor, *, masks: dict | None = None, inputs=None,
          block_store: Callable | None = None, progress: bool = True) -> Pruned:
    """Prune `model` in place with params["prune"] on `calib_ids` (N, seqlen).

    params: a params.yaml-like mapping; its `model` section gives device, offload and
    batch_size (defaults: MODEL_DEFAULTS). inputs: block-0 inputs captured earlier
    (else captured here from calib_ids). block_store(spec, device): a store of finished
    blocks (resume, reuse), or None. Sets model.config.sparsity_config."""
    from pruning.runner import prune_model

    m = {**MODEL_DEFAULTS, **(params.get("model") or {})}
    device = resolve_device(m["device"])
    spec = prepare(model, params, masks)
    # OWL's block sparsities are part of the block keys, so they are set before the store
    # is keyed; without a store, prune_model applies OWL itself.
    if block_store is not None and spec.owl and inputs is None:
        raise ValueError("prune: a block store with prune.owl needs the captured block inputs (inputs=...)")
    if inputs is not None:
        spec.apply_owl(model, inputs, batch_size=m["batch_size"])
    store = block_store(spec, device) if block_store is not None else None
    result = prune_model(model, calib_ids, spec, device=device, store=store, progress=progress, inputs=inputs,
                         offload=m["offload"], batch_size=m["batch_size"])
    setattr(model.config, CONFIG_KEY, sparsity_config(spec, result.layers))
    return Pruned(spec, device, result, store)

