"""Running DVC from Python: one stage at a time, with its output streamed live and
parsed for what DVC decided.

DVC prints one of three lines per stage, and they are how we tell a stage that ran
from one that was skipped or restored from the run-cache:
  Running stage 'prune':
  Stage 'prune' didn't change, skipping
  Stage 'prune' is cached - skipping run, checking out outputs
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("model", "calibrate", "prune", "convert", "evaluate", "report")

RAN, SKIPPED, RESTORED = "ran", "skipped", "restored"
_OUTCOME_PATTERNS = (
    (re.compile(r"Running stage '([^']+)'"), RAN),
    (re.compile(r"Stage '([^']+)' didn't change, skipping"), SKIPPED),
    (re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs"), RESTORED),
)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")
        self.stage, self.returncode, self.tail = stage, returncode, tail


@dataclass
class StageRun:
    stage: str
    outcome: str          # ran | skipped | restored
    seconds: float
    output: str = field(default="", repr=False)  # what DVC and the stage printed

    @property
    def cached(self) -> bool:
        return self.outcome in (SKIPPED, RESTORED)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "outcome": self.outcome, "seconds": self.seconds, "cached": self.cached}


def dvc_executable() -> list[str]:
    """The dvc of this interpreter's environment, whatever PATH says."""
    return [sys.executable, "-m", "dvc"]


def stage_env(extra: dict | None = None) -> dict:
    """Environment for DVC and the stage commands it spawns: `python` in dvc.yaml must
    be this interpreter (with torch), even when the venv is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def parse_outcomes(text: str) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        for pattern, outcome in _OUTCOME_PATTERNS:
            match = pattern.search(line)
            if match and match.group(1) not in outcomes:
                outcomes[match.group(1)] = outcome
    return outcomes


def run_dvc(args: list[str], workspace: str | Path, env: dict | None = None, echo: bool = True) -> tuple[int, str]:
    """Run `dvc <args>` in the workspace; stream its output (progress bars included)
    to our stdout as it comes, and return (exit code, full output)."""
    proc = subprocess.Popen([*dvc_executable(), *args], cwd=workspace, env=stage_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks, pending = [], b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):  # whatever is there: keeps \r progress bars live
        chunks.append(chunk)
        if echo:
            pending = _echo_complete(pending + chunk)
    if echo and pending:
        _echo(pending)
    proc.wait()
    return proc.returncode, b"".join(chunks).decode("utf-8", errors="replace")


# DVC's advice after every stage (git add dvc.lock, autostage, dvc push) would be
# printed six times per run; the pipeline prints its own summary instead.
_HINTS = (b"To track the changes with git, run:", b"git add ", b"To enable auto staging, run:",
          b"dvc config core.autostage true", b"Use `dvc push` to send your updates to remote storage.",
          b"Updating lock file 'dvc.lock'", b"Generating lock file 'dvc.lock'",
          b"Data and pipelines are up to date.")


def _without_hints(data: bytes) -> tuple[bytes, bytes]:
    """(everything up to the last line end, a newline or the carriage return of a
    progress bar, minus DVC's hint lines and blank lines; the unfinished rest)."""
    cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
    if cut < 0:
        return b"", data
    kept = [line for line in data[:cut + 1].splitlines(keepends=True)
            if not (line.endswith(b"\n") and (not line.strip() or line.strip().startswith(_HINTS)))]
    return b"".join(kept), data[cut + 1:]


def _echo_complete(data: bytes) -> bytes:
    """Echo the complete lines of data without DVC's hints; return the rest."""
    kept, rest = _without_hints(data)
    _echo(kept)
    return rest


def readable_output(output: str) -> list[str]:
    """The lines worth keeping in a log: each progress bar in its final state (the
    text after its last carriage return), without DVC's hints and blank lines."""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in output.split("\n")]
    hints = tuple(hint.decode() for hint in _HINTS)
    return [line for line in lines if line.strip() and not line.strip().startswith(hints)]


def _echo(chunk: bytes) -> None:
    out = sys.stdout
    if hasattr(out, "buffer"):
        out.flush()
        out.buffer.write(chunk)
        out.buffer.flush()
    else:  # a replaced stdout (some loggers, notebooks) takes text only
        out.write(chunk.decode("utf-8", errors="replace"))
        out.flush()


def repro_stage(workspace: str | Path, stage: str, env: dict | None = None, echo: bool = True,
                force: bool = False) -> StageRun:
    """`dvc repro --single-item <stage>`: DVC skips it, restores it or runs it."""
    start = time.perf_counter()
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    code, output = run_dvc(args, workspace, env, echo)
    if code != 0:
        raise StageFailed(stage, code, "\n".join(output.strip().splitlines()[-25:]))
    outcome = parse_outcomes(output).get(stage)
    if outcome is None:
        raise StageFailed(stage, code, "DVC said neither 'Running stage', 'didn't change' nor "
                                       f"'is cached' for this stage:\n{output[-2000:]}")
    return StageRun(stage, outcome, round(time.perf_counter() - start, 2), output)


# ---------------------------------------------------------------- one run, one DVC lock

class _OutcomeHandler(logging.Handler):
    """Collects DVC's messages (among them its per-stage decision) while a stage is
    reproduced; DVC's own handlers print them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def stage_output():
    """Everything written to file descriptors 1 and 2 while the block runs (the stage
    subprocess DVC starts inherits them), still shown live; yields a list that holds
    the captured text once the block ends."""
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    pipes = {fd: os.pipe() for fd in (1, 2)}
    chunks: list[bytes] = []
    lock = threading.Lock()

    def pump(read_fd: int, target_fd: int) -> None:
        pending = b""
        while data := os.read(read_fd, 65536):
            shown, pending = _without_hints(pending + data)  # whole lines, live progress bars
            os.write(target_fd, shown)
            with lock:
                chunks.append(data)
        os.write(target_fd, pending)
        os.close(read_fd)

    threads = [threading.Thread(target=pump, args=(pipes[fd][0], saved[fd]), daemon=True) for fd in (1, 2)]
    for fd in (1, 2):
        os.dup2(pipes[fd][1], fd)
        os.close(pipes[fd][1])
    for thread in threads:
        thread.start()
    try:
        yield captured
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)  # closes the pipe's last write end: the pump sees EOF
        for thread in threads:
            thread.join(timeout=10)
        for fd in (1, 2):
            os.close(saved[fd])
        captured.append(b"".join(chunks).decode("utf-8", errors="replace"))


class WorkspaceSession:
    """DVC's repository lock held for a whole pipeline run, stages reproduced one at a
    time through DVC's Python API under it. `dvc repro` takes the same lock, so a plain
    `dvc repro` (or `dvc checkout`, `dvc exp run`) started during the run is refused by
    DVC itself instead of restoring outputs and rewriting dvc.lock between our stages.
    (While a stage's command runs, DVC lends its repository lock out and guards the
    stage's deps and outs with its per-path lock instead; a stage started by anyone
    but this run is refused by stages/workspace_lock.guard_stage.)"""

    def __init__(self, workspace: str | Path, env: dict | None = None):
        self.workspace = Path(workspace)
        self.env = env or {}

    def __enter__(self) -> "WorkspaceSession":
        from dvc.repo import Repo, lock_repo
        self._cwd = os.getcwd()
        os.chdir(self.workspace)   # stage commands and relative paths resolve here
        self._environ = dict(os.environ)
        os.environ.update(stage_env(self.env))
        try:
            self.repo = Repo(str(self.workspace))
            self._locked = lock_repo(self.repo)
            self._locked.__enter__()
        except BaseException:
            self._restore_process()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._locked.__exit__(*exc)
            self.repo.close()
        finally:
            self._restore_process()

    def _restore_process(self) -> None:
        os.environ.clear()
        os.environ.update(self._environ)
        os.chdir(self._cwd)

    def repro(self, stage: str, force: bool = False) -> StageRun:
        """One stage: DVC skips it, restores it from the run-cache or runs it."""
        start = time.perf_counter()
        handler = _OutcomeHandler()
        dvc_logger = logging.getLogger("dvc")
        dvc_logger.addHandler(handler)
        # DVC's own handlers print its messages; a root handler (Prefect's console)
        # would print each one a second time.
        propagate, dvc_logger.propagate = dvc_logger.propagate, False
        try:
            with stage_output() as captured:
                try:
                    self.repo.reproduce(stage, single_item=True, force=force)
                except Exception as err:
                    failure = err
                else:
                    failure = None
                self.repo._reset()  # the next stage must see the dvc.lock this one wrote
        finally:
            dvc_logger.removeHandler(handler)
            dvc_logger.propagate = propagate
        # DVC's messages normally reach the descriptors too; where Python's streams were
        # redirected above them (pytest, notebooks) they come from its logger instead.
        missing = [line for line in handler.lines if line not in captured[0]]
        output = "\n".join(missing + [captured[0]])
        if failure is not None:
            tail = "\n".join(output.strip().splitlines()[-25:])
            raise StageFailed(stage, 1, f"{tail}\n{type(failure).__name__}: {failure}")
        outcome = parse_outcomes("\n".join(handler.lines)).get(stage)
        if outcome is None:
            raise StageFailed(stage, 0, "DVC said neither 'Running stage', 'didn't change' nor "
                                        f"'is cached' for this stage:\n{output[-2000:]}")
        return StageRun(stage, outcome, round(time.perf_counter() - start, 2), output)


_ACTIVE: dict[str, WorkspaceSession] = {}


@contextlib.contextmanager
def open_session(workspace: str | Path, env: dict | None = None):
    """A WorkspaceSession that Prefect tasks of this process find by workspace path
    (a session cannot be a task parameter: it holds a lock and a repository)."""
    key = str(Path(workspace).resolve())
    with WorkspaceSession(key, env) as session:
        _ACTIVE[key] = session
        try:
            yield session
        finally:
            _ACTIVE.pop(key, None)


def active_session(workspace: str | Path) -> WorkspaceSession:
    return _ACTIVE[str(Path(workspace).resolve())]
