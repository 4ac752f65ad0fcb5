"""The per-block result store that makes pruning resumable and incremental.

Block i's result depends on the model, the calibration data, the code, and the
settings of blocks 0..i (earlier blocks' pruning changes block i's inputs). Its
key is a chained fingerprint: fp(-1) = hash(model, calibration, code, device),
fp(i) = hash(fp(i-1), settings of block i). So a run killed in block k finds
blocks 0..k-1 under unchanged keys and resumes at k, and a change to block k's
settings only changes the keys of blocks k onward.

The store lives outside prune's declared DVC outputs (DVC deletes those before a
stage runs, and `persist` would disable its run-cache). Each entry is two files:
`<fp>.safetensors` (the block's pruned linear weights) and `<fp>.json` (its stats
and the sha256 of the tensor file). The JSON is written last and acts as the
commit marker; a missing, truncated or altered entry is reported, deleted and
recomputed, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .hashing import hash_json, sha256_file

STORE_FORMAT = 1


def block_fingerprints(base: dict, block_settings: list[dict]) -> list[str]:
    """fp(i) for every block: a hash chain over the base and per-block settings."""
    previous = hash_json({"format": STORE_FORMAT, **base})
    out = []
    for settings in block_settings:
        previous = hash_json({"previous": previous, "block": settings})
        out.append(previous)
    return out


class FingerprintBlockStore:
    """pruning.runner.BlockStore backed by files named by block fingerprints."""

    def __init__(self, root: str | Path, fingerprints: list[str], log=None):
        self.root = Path(root)
        self.fingerprints = fingerprints
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, index: int) -> tuple[Path, Path]:
        key = self.fingerprints[index]
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
        tensors_path, meta_path = self._paths(index)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            data = tensors_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise ValueError("tensor file does not match its recorded sha256")
            state = load_safetensors_bytes(data)
            stats = meta["stats"]
        except Exception as err:  # any damage means: do not trust, recompute
            self.log(f"block store: entry for block {index} ({meta_path.stem[:12]}) is damaged ({err}); "
                     f"recomputing it")
            for path in (meta_path, tensors_path):
                path.unlink(missing_ok=True)
            return None
        return state, stats

    def save(self, index: int, state: dict[str, torch.Tensor], stats: list[dict]) -> None:
        tensors_path, meta_path = self._paths(index)
        tmp = tensors_path.with_name(f"{tensors_path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, tensors_path)
        meta_tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps({"block": index, "sha256": digest, "stats": stats}, default=float))
        os.replace(meta_tmp, meta_path)  # the entry exists from this rename on
