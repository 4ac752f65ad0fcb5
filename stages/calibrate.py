"""Stage `calibrate`: calibration windows and the inputs of decoder block 0.

Windows follow the papers' C4 rule (calibrate.nsamples windows of calibrate.seqlen
tokens, each from a random document longer than seqlen, at a random offset, seed
calibrate.seed). Block-0 inputs and the per-block call arguments (RoPE, masks) are
captured once here, so prune starts at block 0 without running the embeddings, and
re-pruning with new settings reuses them.
"""
from __future__ import annotations

import torch

from .artifact_io import write_json, write_tensors
from .block_inputs import save_block_inputs
from .modelio import imported_context, load_dense, load_tokenizer, window_bos_id
from .params import check_calibrate, load_params
from .paths import CALIB_IDS, CALIB_INPUTS, CALIB_META, CALIBRATION_DIR, MODEL_DIR
from .runtime import main_wrapper, resolve_device, say
from .textdata import calibration_ids, load_texts

STAGE = "calibrate"


def run() -> None:
    params = load_params()
    c = check_calibrate(params, context=imported_context())  # seqlen vs context before any work
    device = resolve_device(params["model"]["device"])

    from pruning.runner import capture_block_inputs

    documents = load_texts("calibrate.data", c["data"])
    tokenizer = load_tokenizer()
    bos_id = window_bos_id(tokenizer)
    say(STAGE, f"{c['nsamples']} windows x {c['seqlen']} tokens from {len(documents)} documents "
               f"of {c['data']['path']} (seed {c['seed']})" + ("; each starts with BOS" if bos_id is not None else ""))
    ids = calibration_ids(documents, tokenizer, c, bos_id)

    offload = params["model"].get("offload", False)
    # With offload the runner moves one block at a time to the device.
    model = load_dense(MODEL_DIR, "cpu" if offload else device)
    with torch.no_grad():
        inputs = capture_block_inputs(model, ids, device=device, progress=True, offload=offload,
                                      batch_size=params["model"].get("batch_size", 8))
    CALIBRATION_DIR.mkdir(parents=True, exist_ok=True)
    write_tensors(CALIBRATION_DIR / CALIB_IDS, {"input_ids": ids})
    structure = save_block_inputs(CALIBRATION_DIR / CALIB_INPUTS, inputs)
    write_json(CALIBRATION_DIR / CALIB_META, {
        "nsamples": c["nsamples"], "seqlen": c["seqlen"], "seed": c["seed"], "data": c["data"],
        "documents": len(documents), "window_bos": bos_id is not None, "device": device,
        "dtype": str(inputs.hidden.dtype),
        "hidden_shape": list(inputs.hidden.shape), **structure,
    })
    say(STAGE, f"block-0 inputs {tuple(inputs.hidden.shape)} -> {CALIBRATION_DIR}")


if __name__ == "__main__":
    main_wrapper(STAGE, run)
