"""Text in, token windows out: the papers' calibration and evaluation protocol.

Readers use only the standard library (and pyarrow for parquet) so that this runs
on a machine without `datasets`; the pipeline's stages load text with `datasets`
and hand the library plain strings.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """Documents from .jsonl (one JSON object a line), .parquet (a text column) or
    .txt (one line a document; empty lines dropped)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)[field] for line in f if line.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path, columns=[field]).column(field).to_pylist()
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"path: expected a .jsonl, .parquet or .txt file, got {str(path)!r}")


def calibration_windows(documents: list[str], tokenizer, nsamples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens: each from a random document longer than
    seqlen, at a random offset (the SparseGPT/Wanda/ADMM papers' C4 rule)."""
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}  # most documents are too short and drawn again
    windows = []
    for _ in range(nsamples):
        for _attempt in range(100 * len(documents)):
            index = rng.randint(0, len(documents) - 1)
            if index not in tokenized:
                tokenized[index] = tokenizer(documents[index], return_tensors="pt").input_ids
            ids = tokenized[index]
            if ids.shape[1] > seqlen:
                break
        else:
            raise ValueError(f"seqlen: no calibration document is longer than {seqlen} tokens")
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, start:start + seqlen])
    return torch.cat(windows, dim=0)


def wikitext2_ids(lines: list[str], tokenizer) -> torch.Tensor:
    """WikiText-2 test: lines joined with blank lines, tokenised once. Shape (1, T)."""
    return tokenizer("\n\n".join(lines), return_tensors="pt").input_ids


def c4_validation_ids(documents: list[str], tokenizer, seqlen: int, nwindows: int = 256) -> torch.Tensor:
    """C4 validation: first 1100 documents joined by a space, first nwindows*seqlen tokens."""
    ids = tokenizer(" ".join(documents[:1100]), return_tensors="pt").input_ids
    return ids[:, : nwindows * seqlen]


def split_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens, tail dropped. Shape (n, seqlen)."""
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"seqlen: the text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    return ids[0, : n * seqlen].reshape(n, seqlen)
