"""Helpers for the pipeline tests: a throw-away git + DVC workspace running the real
stages on tiny-random-llama with synthetic text, and a way to run DVC in it.

Not a test module; the pipeline test modules import it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small enough that one full pipeline is a few seconds of compute per stage.
TINY = ["model.source=tiny-random-llama", "model.dtype=float32", "model.device=cpu",
        "calibrate.nsamples=4", "calibrate.seqlen=32", "calibrate.seed=0",
        "prune.method=admm-grad", "prune.sparsity=0.5", "prune.options={iters: 6, mask_steps: 4}",
        "evaluate.seqlen=32", "evaluate.max_windows=2", "evaluate.c4_windows=4"]

WORDS = ("the model prunes weights of every layer while the data keeps its order and a small "
         "window of text goes through each block so that errors stay low across many runs").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_data(data_dir: Path) -> None:
    """Synthetic stand-ins for the three DVC-tracked data files (same names, same formats)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "c4-train-first1000.jsonl", "w", encoding="utf-8") as f:
        for _ in range(40):
            f.write(json.dumps({"text": _text(rng, rng.randint(30, 120)), "url": "x"}) + "\n")
    (data_dir / "wikitext2-raw-test.txt").write_text(
        "\n".join(_text(rng, rng.randint(5, 40)) for _ in range(60)) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": [_text(rng, rng.randint(20, 80)) for _ in range(30)]}),
                   data_dir / "c4_validation_2k.parquet")


def workspace_env(tmp: Path) -> dict:
    """Environment for everything run in the workspace: this interpreter's `python`,
    no network, one OpenMP thread (parallel test runs on 2 cores otherwise spin),
    private caches, a git identity for `dvc exp save`."""
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf-home"), "ADMM_PRUNE_CACHE": str(tmp / "model-cache"),
        "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "pipeline test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "pipeline test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }


def make_repo(tmp: Path) -> Path:
    """A fresh git + DVC workspace with this project's stages, library, dvc.yaml and
    params.yaml (switched to the tiny profile), committed."""
    from flows.params_edit import apply_overrides, parse_assignment

    repo = tmp / "ws"
    repo.mkdir(parents=True)
    for name in ("stages", "pruning"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    write_data(repo / "data")
    apply_overrides(repo / "params.yaml", [parse_assignment(s) for s in TINY])
    (repo / ".gitignore").write_text("/.cache/\n__pycache__/\n")
    env = {**os.environ, **workspace_env(tmp)}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "pipeline test workspace"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo


def run(cmd: list[str], repo: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **workspace_env(repo.parent), **(extra_env or {})}
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)


def dvc(repo: Path, *args: str, extra_env: dict | None = None, check: bool = True) -> str:
    """Run dvc in the workspace; return stdout+stderr (fails the test on error if check)."""
    proc = run([sys.executable, "-m", "dvc", *args], repo, extra_env)
    output = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def decisions(output: str) -> dict[str, str]:
    """What DVC's own lines say about each stage: ran / skipped / restored."""
    out = {}
    for stage in re.findall(r"Running stage '([^']+)'", output):
        out[stage] = "ran"
    for stage in re.findall(r"Stage '([^']+)' didn't change, skipping", output):
        out.setdefault(stage, "skipped")
    for stage in re.findall(r"Stage '([^']+)' is cached - skipping run, checking out outputs", output):
        out.setdefault(stage, "restored")
    return out


def set_params(repo: Path, *assignments: str) -> None:
    from flows.params_edit import apply_overrides, parse_assignment
    apply_overrides(repo / "params.yaml", [parse_assignment(s) for s in assignments])


def tree_digest(path: Path) -> str:
    from stages.hashing import hash_tree
    return hash_tree(path)
