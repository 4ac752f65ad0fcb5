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

The owner is the whole process tree: every running stage also holds
`.dvc/tmp/admm-prune-stage.lock` for its life. A stage left running by a pipeline
whose process was killed therefore still holds the workspace, and a new pipeline
is refused until it ends (taking the pipeline lock checks the stage lock too).
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


def stage_lock_path(workspace: str | Path = ".") -> Path:
    return Path(workspace) / ".dvc" / "tmp" / "admm-prune-stage.lock"


def _try_flock(path: Path, holder: dict):
    """The open, exclusively locked file with `holder` written into it, or None when
    another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder))
    handle.flush()
    return handle


def _holder(purpose: str, token: str = "") -> dict:
    return {"pid": os.getpid(), "token": token, "purpose": purpose,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def stage_still_running(workspace: str | Path = ".") -> dict | None:
    """The holder of the stage lock when a stage process is alive in the workspace."""
    path = stage_lock_path(workspace)
    handle = _try_flock(path, {})
    if handle is None:
        return read_holder(path)
    handle.close()
    return None


class WorkspaceLock:
    """Exclusive, non-blocking: acquiring a held lock raises PipelineBusy at once."""

    def __init__(self, workspace: str | Path = ".", purpose: str = "pipeline"):
        self.workspace = Path(workspace)
        self.path = lock_path(workspace)
        self.purpose = purpose
        self.token = secrets.token_hex(8)
        self._handle = None

    def acquire(self) -> "WorkspaceLock":
        handle = _try_flock(self.path, _holder(self.purpose, self.token))
        if handle is None:
            raise PipelineBusy(
                f"another pipeline is running in this workspace ({describe(read_holder(self.path))}); "
                f"wait for it to finish or stop it; runs are never interleaved")
        orphan = stage_still_running(self.workspace)
        if orphan is not None:
            handle.close()
            raise PipelineBusy(
                f"a stage is still running in this workspace ({describe(orphan)}), left behind by a "
                f"pipeline that was stopped; wait for it to end or stop it (kill {orphan.get('pid')})")
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


_held: list = []   # open lock files this stage process holds until it exits


def guard_stage(stage: str) -> None:
    """Called first by every stage. Inside our own pipeline: go on. Otherwise take the
    pipeline lock for the life of this process, or refuse if another pipeline holds
    it. Either way the stage holds the stage lock while it lives."""
    token = os.environ.get(TOKEN_ENV)
    if not (token and read_holder(lock_path()).get("token") == token):
        _held.append(WorkspaceLock(purpose=f"dvc stage {stage}").acquire()._handle)
    handle = _try_flock(stage_lock_path(), _holder(f"stage {stage}", token or ""))
    if handle is None:
        raise PipelineBusy(f"another stage is running in this workspace ({describe(read_holder(stage_lock_path()))})")
    _held.append(handle)
