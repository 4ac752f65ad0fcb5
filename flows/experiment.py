"""A private workspace for one run: a temporary git worktree of HEAD that shares the
main workspace's DVC cache, remotes and work cache, so a run there computes only
what the cache lacks, is saved as a DVC experiment (worktrees share the
repository's refs: it shows in the main workspace's `dvc exp show`), and never
touches the user's params.yaml, dvc.lock or outputs. Sweeps and scheduled
(deployment) runs use it.
"""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

from .dvc_runner import run_dvc


def _git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _absolute_remotes(repo: Path, worktree: Path) -> None:
    """Point the worktree's DVC remotes at absolute URLs (local paths only): relative
    URLs would point elsewhere from a temp dir."""
    code, output = run_dvc(["remote", "list"], repo, echo=False)
    for line in output.splitlines() if code == 0 else []:
        parts = line.split()
        if len(parts) >= 2 and "://" not in parts[1]:
            url = (repo / ".dvc" / parts[1]).resolve()
            run_dvc(["remote", "modify", "--local", parts[0], "url", str(url)], worktree, echo=False)


def work_env(repo: Path) -> dict:
    """Environment for stages in a private workspace: the main workspace's work cache
    (block store, dense-evaluation memo)."""
    return {"ADMM_PRUNE_WORK_CACHE": str(repo / ".cache")}


@contextlib.contextmanager
def experiment_workspace(repo: Path, params_text: str | None = None):
    """A worktree of HEAD with the main repository's DVC cache and remotes, its DVC
    inputs checked out, and params.yaml = params_text (default: the main workspace's
    current params.yaml). Removed afterwards."""
    params_text = params_text if params_text is not None else (repo / "params.yaml").read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="admm-exp-") as tmp:
        worktree = Path(tmp) / "ws"
        _git("worktree", "add", "--detach", str(worktree), "HEAD", cwd=repo)
        try:
            run_dvc(["cache", "dir", "--local", str(repo / ".dvc" / "cache")], worktree, echo=False)
            _absolute_remotes(repo, worktree)
            # Inputs only: stage outputs come from the run-cache or are computed by repro.
            pointers = [str(p.relative_to(worktree)) for p in worktree.rglob("*.dvc") if p.is_file()]
            if pointers:
                run_dvc(["checkout", *pointers], worktree, echo=False)
            (worktree / "params.yaml").write_text(params_text, encoding="utf-8")
            yield worktree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=repo, capture_output=True)
