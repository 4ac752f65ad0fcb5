"""Stage `convert`: the 2:4 (N:M) conversion.

For an N:M prune.pattern, writes the pruned model in the packed N:M format
(pruning.packing: only the kept values plus in-group indices) to artifacts/converted;
packing refuses a layer that is not N:M-valid. convert.format picks the values:
`packed` keeps the model's dtype, `packed-fp8` stores e4m3 values with one scale per
output channel (evaluate then scores the FP8-rounded weights). An unstructured
model has no packed format: the stage passes the weights through (evaluate and
report read artifacts/pruned directly), writes a note saying so, and logs it.
A packed folder carries its own model card (README.md) saying how to load it:
transformers' from_pretrained cannot, pruning.packing.load_packed_model can.
"""
from __future__ import annotations

from pruning.settings import SettingsError, parse_pattern

from .artifact_io import read_json, write_json
from .modelio import load_dense, load_tokenizer
from .params import check_convert, load_params, section
from .hashing import hash_tree
from .model_card import CardFacts, source_facts, write_card
from .paths import (CONVERT_JSON, CONVERT_METRICS, CONVERTED_DIR, MODEL_DIR, MODEL_SOURCE_JSON, PRUNE_LOG,
                    PRUNED_DIR)
from .runtime import main_wrapper, say

STAGE = "convert"


def run() -> None:
    params = load_params()
    pattern = section(params, "prune")["pattern"]
    try:
        nm = parse_pattern(pattern)
    except SettingsError as err:
        raise err.within("prune") from None
    weight_format = check_convert(params)["format"]

    CONVERTED_DIR.mkdir(parents=True, exist_ok=True)
    if nm is None:
        note = {"packed": False, "pattern": pattern, "weights": str(PRUNED_DIR),
                "reason": "unstructured sparsity has no packed format; the pruned weights pass through unchanged"}
        write_json(CONVERTED_DIR / CONVERT_JSON, note)
        write_json(CONVERT_METRICS, {"packed": False})
        say(STAGE, f"pattern {pattern!r}: nothing to pack, passing {PRUNED_DIR} through")
        return

    from pruning.packing import save_packed_model

    # Pack the layers pruned with this pattern; layers a per-layer override gave
    # another pattern stay dense.
    log = read_json(PRUNED_DIR / PRUNE_LOG)
    names = [layer["name"] for layer in log["layers"] if layer["pattern"] == pattern]
    model = load_dense(PRUNED_DIR, "cpu")
    entry = save_packed_model(model, load_tokenizer(PRUNED_DIR), CONVERTED_DIR, pattern, layer_names=names,
                              weight_format=weight_format)
    size = entry["size"]
    source = read_json(MODEL_DIR / MODEL_SOURCE_JSON)
    write_card(CONVERTED_DIR, CardFacts(**source_facts(source),
                                        lineage={f"packed from `{PRUNED_DIR}` sha256": f"`{hash_tree(PRUNED_DIR)}`"}),
               packing=entry)
    write_json(CONVERTED_DIR / CONVERT_JSON, {"packed": True, "format": weight_format, "pattern": pattern,
                                              "weights": str(CONVERTED_DIR), "packed_layers": len(names),
                                              "dense_layers": len(log["layers"]) - len(names)})
    write_json(CONVERT_METRICS, {"packed": True, "format": weight_format, "packed_layers": len(names), **size})
    say(STAGE, f"packed {len(names)} layers as {pattern} ({weight_format}): linear weights "
               f"{size['packed_bytes'] / 2**20:.1f} MiB instead of {size['dense_bytes'] / 2**20:.1f} MiB dense "
               f"({size['fp16_size_ratio']:.4f}x of fp16) -> {CONVERTED_DIR}")


if __name__ == "__main__":
    main_wrapper(STAGE, run)
