"""Text in, token windows out: the papers' calibration and evaluation protocol.

Models that need a BOS token at the start of every window (window_bos: Gemma) get
windows of one BOS and seqlen - 1 text tokens; the others get seqlen text tokens,
as in the papers. calibration_windows and split_windows both take that bos_id, so
calibration and evaluation follow the same rule.

read_documents is the one reader of local text files: it uses only the standard
library (and pyarrow for parquet), so the library and the benchmarks run without
`datasets`, and the pipeline's stages read local files with it too, so evaluate and
bench score the same token stream. (An HF dataset *name* is the stages' business.)
Bad or empty data is a SettingsError naming "path" or "text_field".
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from .settings import SettingsError

if TYPE_CHECKING:  # torch is imported where windows are made: reading text needs none
    import torch

TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
# Gemma is trained with <bos> first in every sequence: without it Gemma-3-270M's
# perplexity is several times higher (15.7 vs 212 on one sentence, measured here).
BOS_WINDOW_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def _records(path: Path):
    """(line number, object) of a .jsonl file, or of a .json list of objects."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except ValueError as err:
            raise SettingsError(("path",), f"{path} is not valid JSON ({err})") from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((number, json.loads(line)))
            except ValueError as err:
                raise SettingsError(("path",), f"{path} line {number} is not a JSON object ({err}); "
                                               f"expected one JSON object a line") from None
    return out


def _field_of(records, path: Path, field: str) -> list:
    values = []
    for number, record in records:
        if not isinstance(record, dict):
            raise SettingsError(("path",), f"{path} record {number} is {type(record).__name__}, not an object "
                                           f"with a {field!r} field")
        if field not in record:
            raise SettingsError(("text_field",), f"{path} has no field {field!r} (record {number} has: "
                                                 f"{', '.join(map(str, record)) or 'no fields'})")
        values.append(record[field])
    return values


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """Documents from .jsonl (one JSON object a line), .json (a list of objects, or
    JSON lines), .parquet (a text column) or .txt (one line a document, its one field
    is 'text'; blank lines dropped)."""
    path = Path(path)
    if path.suffix not in TEXT_SUFFIXES:
        raise SettingsError(("path",), f"expected a {', '.join(TEXT_SUFFIXES)} file, got {str(path)!r}")
    if not path.is_file():
        raise SettingsError(("path",), f"{path} does not exist (DVC-tracked data: run `dvc pull --allow-missing`)")
    if path.suffix == ".txt":
        if field != "text":
            raise SettingsError(("text_field",), f"{path} is a plain text file: its one field is 'text', "
                                                 f"not {field!r}")
        documents = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:  # ParquetFile, not read_table: read_table imports pandas (a second or two)
            table = pq.ParquetFile(path)
            names = table.schema_arrow.names
        except Exception as err:  # pyarrow raises several kinds for a damaged file
            raise SettingsError(("path",), f"{path} is not a readable parquet file ({err})") from None
        if field not in names:
            raise SettingsError(("text_field",), f"{path} has no column {field!r} (columns: {', '.join(names)})")
        documents = table.read(columns=[field]).column(field).to_pylist()
    else:
        documents = _field_of(_records(path), path, field)
    bad = next((i for i, d in enumerate(documents) if not isinstance(d, str)), None)
    if bad is not None:
        raise SettingsError(("text_field",), f"{path}: field {field!r} of document {bad + 1} is "
                                             f"{documents[bad]!r}, not text")
    if not any(d.strip() for d in documents):
        raise SettingsError(("path",), f"{path} holds no text ({len(documents)} documents, all empty); an "
                                       f"interrupted download leaves such a file: fetch it again "
                                       f"(`dvc pull --allow-missing`) or point at another file")
    return documents


def window_bos(config) -> bool:
    """Whether every window of this model must start with the BOS token."""
    return getattr(config, "model_type", None) in BOS_WINDOW_MODEL_TYPES


def window_bos_id(config, tokenizer) -> int | None:
    """The token every window starts with, or None (windows are plain text tokens)."""
    if not window_bos(config):
        return None
    if tokenizer.bos_token_id is None:
        raise SettingsError(("tokenizer",), f"a {config.model_type} model needs a BOS token at the start of "
                                            f"every window, but its tokenizer has none")
    return tokenizer.bos_token_id


def _text_tokens(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """ids without the BOS the tokenizer put first (bos_id windows add their own)."""
    if bos_id is not None and ids.shape[1] and ids[0, 0] == bos_id:
        return ids[:, 1:]
    return ids


def _with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    import torch
    return torch.cat([torch.full_like(windows[:, :1], bos_id), windows], dim=1)


def calibration_windows(documents: list[str], tokenizer, nsamples: int, seqlen: int,
                        seed: int = 0, bos_id: int | None = None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens: each from a random document longer than
    seqlen, at a random offset (the SparseGPT/Wanda/ADMM papers' C4 rule). With
    bos_id, each window is bos_id and seqlen - 1 text tokens."""
    if not any(d.strip() for d in documents):
        raise SettingsError(("data",), f"no calibration text ({len(documents)} documents, all empty)")
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}  # most documents are too short and drawn again
    import torch

    width = seqlen if bos_id is None else seqlen - 1  # text tokens a window
    windows = []
    for _ in range(nsamples):
        for _attempt in range(100 * len(documents)):
            index = rng.randint(0, len(documents) - 1)
            if index not in tokenized:
                tokenized[index] = _text_tokens(tokenizer(documents[index], return_tensors="pt").input_ids, bos_id)
            ids = tokenized[index]
            if ids.shape[1] > width:
                break
        else:
            longest = max(ids.shape[1] for ids in tokenized.values())
            raise SettingsError(("seqlen",), f"no calibration document is longer than {seqlen} tokens (the "
                                             f"longest of {len(tokenized)} tried has {longest}); lower seqlen or "
                                             f"use longer documents")
        start = rng.randint(0, ids.shape[1] - width - 1)
        windows.append(ids[:, start:start + width])
    return _with_bos(torch.cat(windows, dim=0), bos_id)


def wikitext2_ids(lines: list[str], tokenizer) -> torch.Tensor:
    """WikiText-2 test: lines joined with blank lines, tokenised once. Shape (1, T)."""
    return tokenizer("\n\n".join(lines), return_tensors="pt").input_ids


def c4_validation_ids(documents: list[str], tokenizer, seqlen: int, nwindows: int = 256,
                      bos_id: int | None = None) -> torch.Tensor:
    """C4 validation: first 1100 documents joined by a space, first nwindows*seqlen tokens
    (with bos_id: the text tokens of nwindows windows, nwindows*(seqlen - 1))."""
    ids = _text_tokens(tokenizer(" ".join(documents[:1100]), return_tensors="pt").input_ids, bos_id)
    return ids[:, : nwindows * (seqlen if bos_id is None else seqlen - 1)]


def split_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                  bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens, tail dropped. Shape (n, seqlen). With
    bos_id, each window is bos_id and the next seqlen - 1 text tokens."""
    ids = _text_tokens(ids, bos_id)
    width = seqlen if bos_id is None else seqlen - 1
    n = ids.shape[1] // width
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SettingsError(("seqlen",), f"the text has {ids.shape[1]} tokens, fewer than one window of {seqlen}; "
                                         f"lower seqlen or use more text")
    return _with_bos(ids[0, : n * width].reshape(n, width), bos_id)
