"""Shared helpers of the benchmark scripts: commit hash, device label, resumable JSON.

Imports only the standard library and torch, so the scripts run on the GPU machine
(no prefect, dvc or datasets there).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/x.py` without installing
    sys.path.insert(0, str(REPO))


def git_commit() -> str:
    """HEAD of the repository, with '+dirty' when the code under pruning/ or bench/
    differs from it (modified or untracked files).

    BENCH_COMMIT overrides it: the GPU machine gets a copy of the working tree that
    may lack .git, so the caller can pass the hash along.
    """
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
        # Changed or not-yet-committed code (results files aside) makes the hash inexact.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pruning", "bench", ":!bench/results"],
                               cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def load_records(path: str | Path) -> list[dict]:
    """Records of a results file: a list, or {"records": [...]}; [] when missing."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["records"] if isinstance(data, dict) else list(data)


def save_records(path: str | Path, records: list[dict]) -> None:
    """Write atomically (temp file + rename), so a run killed mid-write leaves the
    previous file intact and the grid can be resumed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


class ResultFile:
    """A list of records on disk, keyed by `key_fields`; add() writes at once."""

    def __init__(self, path: str | Path, key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.key_fields = key_fields
        self.records = load_records(self.path)

    def key(self, record: dict) -> tuple:
        return tuple(json.dumps(record.get(k), sort_keys=True) for k in self.key_fields)

    def has(self, **fields) -> bool:
        wanted = self.key(fields)
        return any(self.key(r) == wanted for r in self.records)

    def add(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: list[dict]) -> None:
        """Add records (each replacing the one with its key) and write the file once."""
        new = {self.key(r) for r in records}
        self.records = [r for r in self.records if self.key(r) not in new] + list(records)
        save_records(self.path, self.records)
