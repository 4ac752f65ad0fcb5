"""Stage `evaluate`: perplexity of the pruned (and dense) model, sparsity, N:M validity.

Protocol (DESIGN.md section 4): WikiText-2 test lines joined with "\\n\\n" and C4
validation (first 1100 documents joined by a space, first c4_windows x seqlen
tokens), each tokenised once and cut into non-overlapping windows of
evaluate.seqlen tokens, batch 1, ppl = exp(mean token NLL). evaluate.max_windows
caps the windows per dataset for a CPU-sized run (null = the full protocol); the
report labels which one was used.

The dense model's numbers do not depend on pruning, so they are memoised in the
work cache under a fingerprint of the model, the token windows, the device and
the code; changing only prune settings does not evaluate the dense model again.
"""
from __future__ import annotations

import hashlib

import torch

from .artifact_io import read_json, write_csv, write_json
from .hashing import hash_json, hash_tree, library_fingerprint
from .modelio import imported_context, load_dense, load_tokenizer, window_bos_id
from pruning.settings import SettingsError

from .params import check_evaluate, load_params
from .paths import (CONVERT_JSON, CONVERTED_DIR, EVAL_LAYERS_PLOT, EVAL_METRICS, MODEL_DIR, PRUNE_LOG,
                    PRUNED_DIR, work_cache)
from .runtime import main_wrapper, resolve_device, say
from .textdata import load_texts

STAGE = "evaluate"


def eval_windows(e: dict, tokenizer, bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """With bos_id (window_bos_id), every window is BOS and seqlen - 1 text tokens."""
    from pruning.data import c4_validation_ids, split_windows, wikitext2_ids

    wikitext = wikitext2_ids(load_texts("evaluate.wikitext2", e["wikitext2"]), tokenizer)
    c4 = c4_validation_ids(load_texts("evaluate.c4", e["c4"]), tokenizer, e["seqlen"], nwindows=e["c4_windows"],
                           bos_id=bos_id)
    try:
        return {"wikitext2": split_windows(wikitext, e["seqlen"], e["max_windows"], bos_id=bos_id),
                "c4": split_windows(c4, e["seqlen"], e["max_windows"], bos_id=bos_id)}
    except SettingsError as err:  # a text shorter than one window
        raise err.within("evaluate") from None


def perplexities(model, windows: dict[str, torch.Tensor], device: str, label: str,
                 batch_size: int) -> dict[str, float]:
    from pruning.perplexity import perplexity
    return {f"{name}_ppl": perplexity(model, w, device=device, progress=True, desc=f"{label} {name}",
                                      batch_size=batch_size)
            for name, w in windows.items()}


def dense_perplexities(windows: dict[str, torch.Tensor], device: str, batch_size: int) -> dict[str, float]:
    digest = {name: hashlib.sha256(w.numpy().tobytes()).hexdigest() for name, w in windows.items()}
    key = hash_json({"model": hash_tree(MODEL_DIR), "windows": digest, "device": torch.device(device).type,
                     "code": library_fingerprint(STAGE), "torch": torch.__version__, "batch_size": batch_size})
    memo = work_cache() / "dense-eval" / f"{key}.json"
    if memo.is_file():
        say(STAGE, f"dense perplexities reused from {memo}")
        return read_json(memo)
    result = perplexities(load_dense(MODEL_DIR, device), windows, device, "dense", batch_size)
    write_json(memo, result)
    return result


def layer_report(model, layer_patterns: dict[str, str]) -> tuple[list[dict], float, bool | None]:
    """Per-layer sparsity and N:M validity over the pruned linears only."""
    from pruning.masks import parse_pattern
    from pruning.masks import find_nm_violation
    from pruning.discovery import layer_weight, prunable_linear_names

    rows, zeros, total, valid = [], 0, 0, []
    for i, name in enumerate(prunable_linear_names(model)):
        weight = layer_weight(model.get_submodule(name)).detach()
        layer_zeros = int((weight == 0).sum())
        zeros, total = zeros + layer_zeros, total + weight.numel()
        nm = parse_pattern(layer_patterns.get(name, "unstructured"))
        ok = None if nm is None else find_nm_violation(weight, *nm) is None
        if ok is not None:
            valid.append(ok)
        rows.append({"index": i, "layer": name, "sparsity": round(layer_zeros / weight.numel(), 6),
                     "pattern": layer_patterns.get(name, "unstructured"), "nm_valid": "" if ok is None else ok})
    return rows, zeros / total, (all(valid) if valid else None)


def run() -> None:
    params = load_params()
    e = check_evaluate(params, context=imported_context())
    device = resolve_device(params["model"]["device"])

    tokenizer = load_tokenizer(MODEL_DIR)
    bos_id = window_bos_id(tokenizer)
    windows = eval_windows(e, tokenizer, bos_id)
    counts = {name: int(w.shape[0]) for name, w in windows.items()}
    say(STAGE, f"windows of {e['seqlen']} tokens: {counts}")

    batch_size = params["model"].get("batch_size", 8)
    dense = dense_perplexities(windows, device, batch_size) if e["dense"] else {}
    converted = read_json(CONVERTED_DIR / CONVERT_JSON)
    if converted["packed"]:
        from pruning.packing import load_packed_model
        say(STAGE, f"evaluating the {converted.get('format', 'packed')} model in {CONVERTED_DIR}")
        model = load_packed_model(CONVERTED_DIR, device=device)
    else:
        model = load_dense(PRUNED_DIR, device)
    pruned = perplexities(model, windows, device, "pruned", batch_size)

    log = read_json(PRUNED_DIR / PRUNE_LOG)
    rows, sparsity, nm_valid = layer_report(model, {layer["name"]: layer["pattern"] for layer in log["layers"]})
    full = e["max_windows"] is None and e["c4_windows"] == 256
    metrics = {
        **pruned, "sparsity": sparsity, "nm_valid": nm_valid,
        **{f"dense_{k}": v for k, v in dense.items()},
        "seqlen": e["seqlen"], "wikitext2_windows": counts["wikitext2"], "c4_windows": counts["c4"],
        "protocol": "full" if full else "subset", "window_bos": bos_id is not None,
        "evaluated_packed": converted["packed"],
        "evaluated_format": converted.get("format", "packed") if converted["packed"] else "dense", "device": device,
    }
    write_json(EVAL_METRICS, metrics)
    write_csv(EVAL_LAYERS_PLOT, rows)
    say(STAGE, "wikitext2 ppl {wikitext2_ppl:.3f}, c4 ppl {c4_ppl:.3f}, sparsity {sparsity:.4f}".format(**metrics))


if __name__ == "__main__":
    main_wrapper(STAGE, run)
