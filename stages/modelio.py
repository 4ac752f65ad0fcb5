"""Loading the pipeline's model artifacts back (dense HF directories)."""
from __future__ import annotations

from pathlib import Path

from .artifact_io import read_json
from .paths import MODEL_DIR, MODEL_SOURCE_JSON


def load_dense(path: str | Path, device: str):
    """A model directory written by export_model, in the dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: input artifact missing (run its stage: `dvc repro`)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    return model.to(device).eval()


def load_tokenizer(path: str | Path = MODEL_DIR):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def window_bos_id(tokenizer, path: str | Path = MODEL_DIR) -> int | None:
    """The BOS token every calibration and evaluation window starts with, for models
    that need one (pruning.data.window_bos), else None. Calibrate and evaluate both ask
    here, so they cut windows by the same rule."""
    from transformers import AutoConfig

    from pruning.data import window_bos_id as bos_for
    return bos_for(AutoConfig.from_pretrained(str(path)), tokenizer)


def imported_context() -> int:
    """The imported model's maximum context (from its source record: no weights read)."""
    return int(read_json(MODEL_DIR / MODEL_SOURCE_JSON)["max_context"])
