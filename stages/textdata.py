"""Text for calibration and evaluation, loaded with HF `datasets`.

A local file (the DVC-tracked copies in data/) goes through the matching builder
(json / parquet / text); any other `path` is an HF dataset name, loaded with its
config name, data_files and split, the papers' own route (e.g. allenai/c4 with
data_files en/c4-train.00000-of-01024.json.gz).
"""
from __future__ import annotations

from pathlib import Path

from .params import ParamError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def load_texts(key: str, spec: dict) -> list[str]:
    """The `text_field` column of a data spec (see params.check_data_spec) as strings."""
    from datasets import load_dataset

    path = spec["path"]
    builder = _BUILDERS.get(Path(path).suffix)
    if builder is not None:
        # Local files form a single "train" split whatever the file holds.
        dataset = load_dataset(builder, data_files=str(path), split="train")
    else:
        dataset = load_dataset(path, spec.get("name"), data_files=spec.get("data_files"), split=spec["split"])
    field = spec["text_field"]
    if field not in dataset.column_names:
        raise ParamError(f"{key}.text_field", f"{path} has no column {field!r} (columns: {dataset.column_names})")
    return list(dataset[field])
