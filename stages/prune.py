"""Stage `prune`: block-sequential pruning into artifacts/pruned.

Reads the imported model and the calibration artifact, prunes every decoder block
with the prune.* settings (per-block / per-layer overrides, an optional user mask
that gets the ADMM update), and writes the assembled pruned model. Finished blocks
go to a fingerprinted block store outside DVC's outputs (see block_store.py), so a
killed run resumes at its first unfinished block and a change that touches only
blocks k onward reuses blocks 0..k-1.
"""
from __future__ import annotations

import statistics
from dataclasses import fields

import torch

from pruning.settings import PruneSettings, SettingsError

from .artifact_io import read_json, read_tensors, write_csv, write_json
from .block_inputs import load_block_inputs
from .block_store import FingerprintBlockStore, block_fingerprints
from .hashing import hash_tree, library_fingerprint
from .modelio import load_dense, load_tokenizer
from .params import check_prune, load_params, prune_settings
from .paths import (CALIB_IDS, CALIB_INPUTS, CALIB_META, CALIBRATION_DIR, MODEL_DIR,
                    PRUNE_LAYERS_PLOT, PRUNE_LOG, PRUNE_METRICS, PRUNED_DIR, work_cache)
from .runtime import main_wrapper, peak_memory_mib, resolve_device, say

STAGE = "prune"


def load_user_masks(path: str) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) keyed by full layer name, with or without '.weight';
    PruneSpec.validate checks their names and shapes against the model."""
    return {key.removesuffix(".weight"): tensor.to(torch.bool) for key, tensor in read_tensors(path).items()}


def build_spec(settings: PruneSettings, masks):
    from pruning.runner import PruneSpec
    return PruneSpec(**{f.name: getattr(settings, f.name) for f in fields(PruneSettings)}, masks=masks)


def run() -> None:
    params = load_params()
    p = check_prune(params)
    device = resolve_device(params["model"]["device"])

    from pruning.models import export_model
    from pruning.discovery import block_linears, check_prunable, decoder_layers, layers_prefix
    from pruning.runner import prune_model

    calibration = read_json(CALIBRATION_DIR / CALIB_META)
    offload = params["model"].get("offload", False)  # memory only: not part of the block fingerprint
    model = load_dense(MODEL_DIR, "cpu" if offload else device)
    try:
        check_prunable(model)
    except ValueError as err:
        raise SettingsError(("model", "source"), str(err).partition(": ")[2]) from None
    masks = load_user_masks(p["mask_file"]) if p.get("mask_file") else None
    n_blocks = len(decoder_layers(model))
    spec = build_spec(prune_settings(params), masks)
    try:
        spec.validate(model, mask_path=("mask_file",))
    except SettingsError as err:
        raise err.within("prune") from None

    # Everything a block's result depends on; see block_store.py for the chaining.
    prefix = layers_prefix(model) + "."
    # The batch size changes fp rounding (GEMM shapes), so results are keyed on it.
    batch_size = params["model"].get("batch_size", 8)
    base = {"model": hash_tree(MODEL_DIR), "calibration": hash_tree(CALIBRATION_DIR),
            "code": library_fingerprint(STAGE), "torch": torch.__version__, "device": torch.device(device).type,
            "batch_size": batch_size}
    ids = read_tensors(CALIBRATION_DIR / CALIB_IDS)["input_ids"]
    inputs = load_block_inputs(CALIBRATION_DIR / CALIB_INPUTS, calibration, device)
    spec.apply_owl(model, inputs, batch_size=batch_size)  # OWL's block sparsities are part of the keys
    settings = [spec.block_settings(i, list(block_linears(block)), prefix)
                for i, block in enumerate(decoder_layers(model))]
    store = FingerprintBlockStore(work_cache() / "blocks", block_fingerprints(base, settings),
                                  log=lambda msg: say(STAGE, msg))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    say(STAGE, f"{p['method']} at sparsity {p['sparsity']} ({p['pattern']}) on {device}, "
               f"{n_blocks} blocks, {ids.shape[0]} x {ids.shape[1]} calibration tokens")
    result = prune_model(model, ids, spec, device=device, store=store, progress=True, inputs=inputs,
                         offload=offload, batch_size=batch_size)
    memory = peak_memory_mib(device)
    if result.reused_blocks:
        say(STAGE, f"reused blocks {result.reused_blocks} from the block store; computed {result.computed_blocks}")

    export_model(model, load_tokenizer(MODEL_DIR), PRUNED_DIR)
    # The artifact holds only what follows from its inputs (no timings, no "which
    # blocks were reused"): an identical re-prune then leaves it byte-identical and
    # DVC skips everything downstream. Run facts go to metrics/prune.json.
    write_json(PRUNED_DIR / PRUNE_LOG, {
        "method": p["method"], "sparsity": p["sparsity"], "pattern": p["pattern"], "device": device,
        "block_settings": settings, "fingerprints": store.fingerprints,
        "layers": [{k: v for k, v in layer.items() if k != "seconds"} for layer in result.layers],
    })
    errors = [layer["rel_error"] for layer in result.layers]
    write_json(PRUNE_METRICS, {
        "prune_seconds": round(result.seconds, 3), **memory,
        "phase_seconds": {k: round(v, 3) for k, v in result.phase_seconds.items()}, "blocks": n_blocks,
        "reused_blocks": result.reused_blocks, "computed_blocks": result.computed_blocks,
        "mean_rel_error": statistics.fmean(errors), "max_rel_error": max(errors),
    })
    write_csv(PRUNE_LAYERS_PLOT, [
        {"index": i, "block": layer["block"], "layer": layer["name"], "method": layer["method"],
         "pattern": layer["pattern"], "sparsity": round(layer["sparsity"], 6),
         "rel_error": layer["rel_error"], "seconds": round(layer["seconds"], 4)}
        for i, layer in enumerate(result.layers)])
    say(STAGE, f"pruned in {result.seconds:.1f} s, peak RSS {memory['peak_rss_mib']:.0f} MiB -> {PRUNED_DIR}")


if __name__ == "__main__":
    main_wrapper(STAGE, run)
