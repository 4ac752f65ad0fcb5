"""One pipeline at a time per workspace.

DVC locks the repository only for the duration of one `dvc` command; a pipeline run
by the flow is six commands, and a second pipeline could slip in between them and
interleave its stages with ours. The pipeline therefore holds an exclusive lock on
`.dvc/tmp/admm-prune-pipeline.lock` (per workspace, next to DVC's own lock; each
git worktree has its own) for its whole run (flock: released by the kernel when
the holder dies, so a crash never leaves a stale lock).

Stages check the lock too, so a plain `dvc repro` started while the flow runs is
refused: a stage proceeds only when the lock is free (it then holds it itself) or
when it belongs to the pipeline that launched it, which passes its token down
through the environment.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import sys
import time
from pathlib import Path


TOKEN_ENV = "ADMM_PRUNE_PIPELINE_TOKEN"


class PipelineBusy(RuntimeError):
    """Another pipeline holds this workspace."""


def lock_path(workspace: str | Path = ".") -> Path:
    return Path(workspace) / ".dvc" / "tmp" / "admm-prune-pipeline.lock"


class WorkspaceLock:
    """Exclusive, non-blocking: acquiring a held lock raises PipelineBusy at once."""

    def __init__(self, workspace: str | Path = ".", purpose: str = "pipeline"):
        self.path = lock_path(workspace)
        self.purpose = purpose
        self.token = secrets.token_hex(8)
        self._handle = None

    def acquire(self) -> "WorkspaceLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(self.path)
            handle.close()
            raise PipelineBusy(
                f"another pipeline is running in this workspace ({describe(holder)}); "
                f"wait for it to finish or stop it; runs are never interleaved") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "token": self.token, "purpose": self.purpose,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)[:300]}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None

    def __enter__(self) -> "WorkspaceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')}, {holder.get('purpose', 'pipeline')} since {holder.get('since')}: {holder.get('command', '')}"


_stage_lock: WorkspaceLock | None = None


def guard_stage(stage: str) -> None:
    """Called first by every stage. Inside our own pipeline: go on. Otherwise take the
    lock for the life of this process, or refuse if another pipeline holds it."""
    global _stage_lock
    token = os.environ.get(TOKEN_ENV)
    path = lock_path()
    if token and read_holder(path).get("token") == token:
        return
    lock = WorkspaceLock(purpose=f"dvc stage {stage}")
    lock.acquire()
    _stage_lock = lock  # held until the stage process exits
