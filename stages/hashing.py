"""Content hashes of files, artifact directories and the library's code.

They key the block store and the dense-evaluation memo, and run_meta.json records
them so any number can be traced to the exact bytes that produced it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_manifest(path: str | Path) -> dict[str, str]:
    """{relative file path: sha256} for a file or every file under a directory."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: artifact missing")
    return {f.relative_to(path).as_posix(): sha256_file(f)
            for f in sorted(path.rglob("*")) if f.is_file()}


def hash_tree(path: str | Path) -> str:
    """One sha256 for a file or a directory (names and contents)."""
    return hash_json(tree_manifest(path))


def hash_json(value) -> str:
    """sha256 of a canonical JSON rendering (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_fingerprint(package_dir: str | Path) -> str:
    """sha256 over a package's .py sources: any code change invalidates cached results
    (safer than a version string someone must remember to bump)."""
    package_dir = Path(package_dir)
    return hash_json({f.relative_to(package_dir).as_posix(): sha256_file(f)
                      for f in sorted(package_dir.rglob("*.py"))})


def library_fingerprint(stage: str | None = None) -> str:
    """sha256 of the library code: with a stage, of the pruning/ files that stage
    declares as deps in dvc.yaml (the one definition of its code set, so the block
    store and DVC invalidate on the same files); without, of all of pruning/."""
    if stage is None:
        import pruning
        return code_fingerprint(Path(pruning.__file__).parent)
    from .paths import ROOT, stage_code
    return hash_json({path.as_posix(): sha256_file(ROOT / path) for path in sorted(stage_code(stage))})
