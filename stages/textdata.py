"""Text for calibration and evaluation.

A local file (the DVC-tracked copies in data/) is read with pruning.data.read_documents,
the reader the library and the benchmarks use, so every consumer sees the same
documents and evaluate scores the same token stream as bench/. Any other `path` is
an HF dataset name, loaded with `datasets` (its config name, data_files and split),
the papers' own route (e.g. allenai/c4 with data_files en/c4-train.00000-of-01024.json.gz).
"""
from __future__ import annotations

from pathlib import Path

from pruning.data import TEXT_SUFFIXES, calibration_windows, read_documents
from pruning.settings import SettingsError

from .params import ParamError


def _is_local(spec: dict) -> bool:
    return Path(spec["path"]).suffix in TEXT_SUFFIXES


def _hub_error(key: str, spec: dict, err: Exception) -> ParamError:
    return ParamError(f"{key}.path", f"cannot load the dataset {spec['path']!r} (name {spec.get('name')!r}, split "
                                     f"{spec.get('split')!r}): {type(err).__name__}: {err}. Without network it must be "
                                     f"in the local datasets cache; or give a local .jsonl/.parquet/.txt file")


def load_texts(key: str, spec: dict) -> list[str]:
    """The `text_field` of a data spec (see params.check_data_spec) as strings."""
    field = spec["text_field"]
    if _is_local(spec):
        try:
            return read_documents(spec["path"], field)
        except SettingsError as err:
            raise err.within(*key.split(".")) from None
    from datasets import load_dataset
    try:
        dataset = load_dataset(spec["path"], spec.get("name"), data_files=spec.get("data_files"),
                               split=spec["split"])
    except Exception as err:  # datasets raises many kinds (offline, missing config or split)
        raise _hub_error(key, spec, err) from None
    if field not in dataset.column_names:
        raise ParamError(f"{key}.text_field", f"{spec['path']} has no column {field!r} "
                                              f"(columns: {', '.join(dataset.column_names)})")
    texts = list(dataset[field])
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise ParamError(f"{key}.path", f"{spec['path']} ({spec['split']}) holds no text in {field!r}")
    return texts


def check_source(key: str, spec: dict) -> None:
    """Check that a data spec can be read and has text in its field, cheaply (the
    preflight): a local file is read whole (a fraction of a second for the project's
    data); for a dataset name only its builder's features are asked for."""
    field = spec["text_field"]
    if _is_local(spec):
        load_texts(key, spec)
        return
    from datasets import load_dataset_builder
    try:
        builder = load_dataset_builder(spec["path"], spec.get("name"), data_files=spec.get("data_files"))
    except Exception as err:
        raise _hub_error(key, spec, err) from None
    features = builder.info.features
    if features is not None and field not in features:  # features are known only for some datasets
        raise ParamError(f"{key}.text_field", f"{spec['path']} has no column {field!r} "
                                              f"(columns: {', '.join(features)})")


def calibration_ids(documents: list[str], tokenizer, c: dict, bos_id: int | None = None):
    """The calibration windows of a checked calibrate section (params.check_calibrate):
    the calibrate stage and the Python API cut them the same way. bos_id: each window
    starts with it (models that need one, pruning.data.window_bos_id)."""
    try:
        return calibration_windows(documents, tokenizer, c["nsamples"], c["seqlen"], c["seed"], bos_id=bos_id)
    except SettingsError as err:
        raise err.within("calibrate") from None
