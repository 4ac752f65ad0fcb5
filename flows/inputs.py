"""Inputs edited in place, found before any stage runs.

DVC notices a changed dependency only where dvc.yaml declares one. Two inputs slip
past it otherwise:
- a DVC-tracked data file (data/*.dvc) edited in place: calibrate and evaluate
  would run on it while its .dvc file still records the old content. Such a run
  stops and names the file: the user either tracks the new content (`dvc add`)
  or gets the tracked one back (`dvc checkout`).
- a local model folder (model.source is a path, i.e. a param, not a dep) whose
  config, weights or tokenizer were replaced: DVC would call everything up to date.
  Such a run uses the new files: the `model` stage is forced and records the
  folder's new sha256 in artifacts/model/source.json.
The mask file needs nothing here: its sha256 is a param (prune.mask_sha256) that
every run refreshes before the stages (flows/params_edit.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ruamel.yaml import YAML

from pruning.settings import MODEL_ALIASES
from stages.hashing import hash_tree
from stages.paths import MODEL_DIR, MODEL_SOURCE_JSON


class InputChanged(RuntimeError):
    """A tracked input differs from what DVC recorded; the message names it and the fix."""


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tracked_files(workspace: Path) -> list[tuple[Path, Path, str]]:
    """(file, its .dvc pointer, recorded md5) for every file output of a .dvc pointer."""
    out = []
    for pointer in sorted(workspace.rglob("*.dvc")):
        if ".dvc" in pointer.relative_to(workspace).parts[:-1] or not pointer.is_file():
            continue
        for entry in (YAML(typ="safe", pure=True).load(pointer.read_text(encoding="utf-8")) or {}).get("outs") or []:
            md5 = str(entry.get("md5", ""))
            if md5 and not md5.endswith(".dir"):
                out.append((pointer.parent / entry["path"], pointer, md5))
    return out


def check_tracked_data(workspace: Path) -> None:
    """Raise InputChanged when a tracked file's content is not what its .dvc records.
    A missing file is DVC's to fetch (`dvc pull` / `dvc checkout`), not an edit."""
    for path, pointer, md5 in tracked_files(workspace):
        if path.is_file() and _md5(path) != md5:
            rel, ptr = path.relative_to(workspace), pointer.relative_to(workspace)
            raise InputChanged(
                f"{rel} was changed in place: its content is not what {ptr} records, and a run on it "
                f"would not be reproducible. Nothing ran. To use the new content: `dvc add {rel}` "
                f"(and commit {ptr}); to get the tracked content back: `dvc checkout {ptr}`")


def changed_model_folder(workspace: Path, source: str) -> str | None:
    """Why the imported model is stale, when model.source is a local folder whose
    files no longer hash to what the model stage recorded; else None."""
    if source in MODEL_ALIASES:
        return None
    folder = Path(source).expanduser()
    if not folder.is_absolute():
        folder = workspace / folder
    record_file = workspace / MODEL_DIR / MODEL_SOURCE_JSON
    if not folder.is_dir() or not record_file.is_file():
        return None
    record = json.loads(record_file.read_text(encoding="utf-8"))
    if record.get("kind") != "local" or Path(record.get("path", "")) != folder.resolve():
        return None  # another source: DVC sees the param change itself
    if record.get("sha256") == hash_tree(folder):
        return None
    return f"the files of the local model folder {folder} changed since it was imported"


def stages_to_force(workspace: Path, params: dict) -> dict[str, str]:
    """{stage: reason} for stages that must rerun although DVC sees no change."""
    reason = changed_model_folder(workspace, params["model"]["source"])
    return {"model": reason} if reason else {}
